"""QEMU's ``-vnc`` and ``-display`` options (:mod:`kemu.display.vnc` serves them)."""

from __future__ import annotations

from dataclasses import dataclass

from kemu.errors import ConfigError
from kemu.options.keyval import split_opts

VNC_BASE_PORT = 5900
SHARE_POLICIES = ("allow-exclusive", "force-shared", "ignore")


@dataclass
class VncOptions:
    """A parsed ``-vnc`` argument (``none``: :attr:`enabled` is False)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = VNC_BASE_PORT
    unix_path: str | None = None
    password: bool = False
    share: str = "allow-exclusive"
    connections: int = 32
    text: str = ""

    def describe(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"


def parse_vnc_option(text: str, option: str = "-vnc") -> VncOptions:
    """QEMU's ``-vnc`` syntax: ``[HOST]:DISPLAY | unix:PATH | none``, then ``,key=value``."""
    parts = split_opts(text)
    head, rest = parts[0], parts[1:]
    opts = VncOptions(text=text)
    if head == "none":
        opts.enabled = False
    elif head.startswith("unix:"):
        opts.unix_path = head[5:]
        if not opts.unix_path:
            raise ConfigError(f"{option} {text}: unix: needs a path")
    else:
        host, colon, display = head.rpartition(":")
        if not colon:
            raise ConfigError(f"{option} {text}: expected [HOST]:DISPLAY, unix:PATH or none")
        try:
            number = int(display)
        except ValueError:
            raise ConfigError(f"{option} {text}: display {display!r} is not a number") from None
        if not 0 <= number <= 65535 - VNC_BASE_PORT:
            raise ConfigError(f"{option} {text}: display {number} out of range")
        opts.port = VNC_BASE_PORT + number
        if host:
            opts.host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    for part in rest:
        key, eq, value = part.partition("=")
        if key in ("password", "share", "connections") and not eq:
            raise ConfigError(f"{option}: {key} needs a value")
        if key == "password":
            if value not in ("on", "off", "true", "false"):
                raise ConfigError(f"{option}: password={value}: expected on or off")
            opts.password = value in ("on", "true")
        elif key == "share":
            if value not in SHARE_POLICIES:
                raise ConfigError(f"{option}: share={value}: expected one of "
                                  f"{', '.join(SHARE_POLICIES)}")
            opts.share = value
        elif key == "connections":
            if not value.isdigit() or not 1 <= int(value) <= 1024:
                raise ConfigError(f"{option}: connections={value}: expected 1..1024")
            opts.connections = int(value)
        elif key == "to":
            raise ConfigError(f"{option}: to= (searching for a free port) is not supported "
                              "by kemu; give the display number")
        else:
            raise ConfigError(f"{option}: unsupported option {key!r} (kemu has password, "
                              "share, connections)")
    return opts


def parse_display_option(text: str) -> tuple[str, VncOptions | None]:
    """QEMU's ``-display none`` and ``-display vnc=[HOST]:N[,...]``: (type, VNC options)."""
    kind = split_opts(text)[0]
    if kind == "none":
        return "none", None
    if kind.startswith("vnc="):
        return "vnc", parse_vnc_option(text[4:], "-display vnc")
    raise ConfigError(f"-display {text}: kemu has no local window; use -display none, "
                      "-display vnc=:N or -vnc :N")
