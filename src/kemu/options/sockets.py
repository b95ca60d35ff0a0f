"""Socket chardev addresses as ``-qmp`` and ``-monitor`` take them."""

from __future__ import annotations

from dataclasses import dataclass

from kemu.errors import ConfigError
from kemu.options.keyval import split_opts


@dataclass(frozen=True)
class SocketAddress:
    """A socket chardev as ``-qmp`` and ``-monitor`` take it: ``unix:PATH`` or
    ``tcp:HOST:PORT`` with ``server=on|off`` and ``wait=on|off``."""

    kind: str            # "unix", "tcp", or "fd" (a socket the parent passed, QEMU's fd=N)
    path: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    wait: bool = False
    #: Listen (server=on); else connect out to the address, as QEMU does.
    server: bool = True
    fd: int = -1

    def describe(self) -> str:
        """QEMU's chardev filename (``info chardev``, the waiting message)."""
        where = {"unix": f"unix:{self.path}", "fd": f"fd:{self.fd}"}.get(
            self.kind, f"tcp:{self.host}:{self.port}")
        return f"disconnected:{where}{',server=on' if self.server else ''}"


def parse_socket_option(text: str, option: str) -> SocketAddress:
    """QEMU's ``unix:PATH[,server=on][,wait=off]`` or ``tcp:[HOST]:PORT,...``.

    As in QEMU, ``server`` alone means ``server=on`` and ``nowait`` means
    ``wait=off``; a server waits for a first client unless ``wait=off``;
    without ``server=on`` kemu connects out to the address (a client
    chardev: the peer listens).  An IPv6 host is written in brackets
    (``tcp:[::1]:4444``); no host means 127.0.0.1, never every interface.
    """
    head, *opts = split_opts(text)
    props = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        props[key] = value or "on"
    for key, value in props.items():
        if key not in ("server", "wait", "nowait"):
            raise ConfigError(f"{option} {text}: unsupported parameter {key!r}")
        if value not in ("on", "off"):
            raise ConfigError(f"{option} {text}: {key}={value}: expected on or off")
    server = props.get("server", "off") == "on"
    wait = server and props.get("wait", "off" if "nowait" in props else "on") == "on"
    if head.startswith("unix:"):
        if not head[5:]:
            raise ConfigError(f"{option} {text}: no socket path")
        return SocketAddress("unix", path=head[5:], wait=wait, server=server)
    if head.startswith("tcp:"):
        host, _, port = head[4:].rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            port_number = int(port)
        except ValueError:
            raise ConfigError(f"{option} {text}: invalid port {port!r}") from None
        if not 0 <= port_number <= 65535:
            raise ConfigError(f"{option} {text}: port {port_number} out of range")
        return SocketAddress("tcp", host=host or "127.0.0.1", port=port_number, wait=wait,
                             server=server)
    raise ConfigError(f"{option} {text}: expected unix:PATH or tcp:HOST:PORT")


def parse_qmp_option(text: str) -> SocketAddress:
    """QEMU's ``-qmp`` argument (see :func:`parse_socket_option`)."""
    return parse_socket_option(text, "-qmp")
