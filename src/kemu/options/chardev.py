"""``-chardev BACKEND,id=ID,...``, ``-mon chardev=ID,mode=control|readline`` and
``-serial chardev:ID``: character devices and what uses them.

Backends: ``socket`` (``path=`` a UNIX socket, ``host=``/``port=`` TCP, or
``fd=N`` a socket the parent process opened and passed, as libvirt passes
its monitor socket), with ``server=on|off`` and ``wait=on|off``; ``pty``;
``file`` (``path=``, ``append=``); ``stdio``; ``null``.
"""

from __future__ import annotations

import os
import stat

from kemu.errors import ConfigError, StartupError
from kemu.machines.config import ChardevConfig, MachineConfig
from kemu.options.keyval import parse_bool, parse_keyval
from kemu.options.sockets import SocketAddress

#: backend -> the properties it takes (beyond id=).
CHARDEV_BACKENDS: dict[str, set[str]] = {
    "socket": {"path", "host", "port", "fd", "server", "wait", "nowait", "to", "ipv4",
               "ipv6", "nodelay", "reconnect", "abstract", "tight", "telnet", "websocket"},
    "pty": {"path"},
    "file": {"path", "append"},
    "stdio": {"signal"},
    "null": set(),
}
#: Accepted for every backend (QEMU's common chardev options), not acted on.
_COMMON = {"logfile", "logappend", "mux"}


def parse_chardev(text: str, option: str = "-chardev") -> ChardevConfig:
    props = parse_keyval(text, option, "backend")
    backend = props.pop("backend", "")
    where = f"{option} {text}"
    if backend not in CHARDEV_BACKENDS:
        raise ConfigError(f"{where}: '{backend}' is not a valid char driver name"
                          f" (kemu has {', '.join(sorted(CHARDEV_BACKENDS))})")
    cd_id = props.pop("id", "")
    if not cd_id:
        raise ConfigError(f"{where}: chardev: no id specified")
    for key in props:
        if key not in CHARDEV_BACKENDS[backend] | _COMMON:
            raise ConfigError(f"{where}: Invalid parameter '{key}'")
    if props.get("mux", "off") != "off" and parse_bool(props["mux"], "mux"):
        raise ConfigError(f"{where}: mux=on: kemu does not multiplex chardevs")
    for key in ("telnet", "websocket", "reconnect"):
        if key in props and props[key] not in ("off", "0"):
            raise ConfigError(f"{where}: {key}={props[key]}: not supported by kemu")
    if backend == "file" and not props.get("path"):
        raise ConfigError(f"{where}: chardev: file: no filename given")
    cd = ChardevConfig(backend, cd_id, props)
    if backend == "socket":
        socket_address(cd, where)      # checked now: one line at parse time
    return cd



def socket_address(cd: ChardevConfig, where: str = "-chardev") -> SocketAddress:
    """A socket chardev's address, in the form -qmp and -monitor use."""
    p = cd.props
    server = parse_bool(p.get("server", "off"), "server")
    wait = server and ("nowait" not in p) and parse_bool(p.get("wait", "on"), "wait")
    if "fd" in p:
        try:
            fd = int(p["fd"])
            mode = os.fstat(fd).st_mode
        except ValueError:
            raise ConfigError(f"{where}: fd={p['fd']}: not a number") from None
        except OSError:
            raise StartupError(f"{where}: fd={p['fd']}: Bad file descriptor") from None
        if not stat.S_ISSOCK(mode):
            raise StartupError(f"{where}: fd={fd}: not a socket")
        return SocketAddress("fd", fd=fd, server=server, wait=wait)
    if "path" in p:
        return SocketAddress("unix", path=p["path"], server=server, wait=wait)
    if "port" in p:
        try:
            port = int(p["port"])
        except ValueError:
            raise ConfigError(f"{where}: port={p['port']}: not a number") from None
        return SocketAddress("tcp", host=p.get("host") or "127.0.0.1", port=port,
                             server=server, wait=wait)
    raise ConfigError(f"{where}: chardev: socket: no address given (path=, host=/port= "
                      "or fd=)")


def parse_mon(text: str, config: MachineConfig) -> None:
    """``-mon chardev=ID[,mode=control|readline][,pretty=on|off]``."""
    props = parse_keyval(text, "-mon", "chardev")
    where = f"-mon {text}"
    cd_id = props.pop("chardev", "")
    mode = props.pop("mode", "readline")
    props.pop("id", None)
    props.pop("pretty", None)
    if props:
        raise ConfigError(f"{where}: Invalid parameter '{next(iter(props))}'")
    cd = config.chardevs.get(cd_id)
    if cd is None:
        raise StartupError(f"{where}: chardev \"{cd_id}\" not found")
    if mode not in ("control", "readline"):
        raise ConfigError(f"{where}: unknown monitor mode \"{mode}\"")
    if cd.backend == "stdio":
        if mode == "readline":
            config.extra["monitor_stdio"] = True
            config.extra.setdefault("monitors", []).append("stdio")
            return
        raise ConfigError(f"{where}: QMP on stdio is not supported by kemu")
    if cd.backend != "socket":
        raise ConfigError(f"{where}: kemu runs monitors on socket chardevs "
                          f"(chardev {cd_id} is {cd.backend})")
    address = socket_address(cd, where)
    if mode == "control":
        config.extra.setdefault("qmp", []).append(address)
    else:
        config.extra.setdefault("monitor_sockets", []).append(address)
        config.extra.setdefault("monitors", []).append(address.describe())
    config.extra.setdefault("monitor_chardevs", {})[cd_id] = mode


def serial_shorthand(value: str, config: MachineConfig) -> str | None:
    """QEMU's ``-serial file:PATH`` and ``-serial pty`` (qemu_chr_new's legacy
    spellings): an implicit chardev ``serial0``; the ``chardev:ID`` setting it
    becomes, or None for a spelling that is not one of these."""
    if value.startswith("file:") and value[5:]:
        cd = ChardevConfig("file", "serial0", {"path": value[5:]})
    elif value == "pty":
        cd = ChardevConfig("pty", "serial0", {})
    else:
        return None
    if cd.id in config.chardevs:
        raise ConfigError(f"-serial {value}: a chardev with id {cd.id} exists already")
    config.chardevs[cd.id] = cd
    return f"chardev:{cd.id}"


def serial_chardev(value: str, config: MachineConfig) -> str:
    """``-serial chardev:ID``: the serial port's backend (``pty``, ``file``, ...).

    Returns what the serial setting becomes: ``"stdio"``, ``"none"`` or
    ``"chardev:ID"`` (run_machine opens the chardev)."""
    cd_id = value.split(":", 1)[1]
    cd = config.chardevs.get(cd_id)
    if cd is None:
        raise StartupError(f"-serial {value}: chardev \"{cd_id}\" not found")
    if cd.backend == "stdio":
        return "stdio"
    if cd.backend == "null":
        return "none"
    if cd.backend == "socket":
        raise ConfigError(f"-serial {value}: kemu's serial port takes pty, file, stdio or "
                          "null chardevs")
    config.extra["serial_chardev"] = cd_id
    return value
