"""QMP's display commands (QEMU 7.2's names and errors): ``screendump``, ``query-vnc``,
``query-display-options``, ``set_password``, ``expire_password``, ``change-vnc-password``,
over the Python API's :class:`kemu.api.Machine` (its ``display`` and ``vnc``)."""

from __future__ import annotations

from typing import Any, Callable

from kemu.qmp.protocol import QmpError


def display_commands(vm) -> dict[str, tuple[Callable[[dict], Any], dict[str, type]]]:
    """The display part of the command table for ``vm``."""
    d = DisplayCommands(vm)
    return {
        "screendump": (d.screendump, {"filename": str, "device": str, "head": int,
                                      "format": str}),
        "query-vnc": (d.query_vnc, {}),
        "query-display-options": (d.query_display_options, {}),
        "set_password": (d.set_password, {"protocol": str, "password": str,
                                          "connected": str, "display": str}),
        "expire_password": (d.expire_password, {"protocol": str, "time": str,
                                                "display": str}),
        "change-vnc-password": (d.change_vnc_password, {"password": str}),
    }


class DisplayCommands:
    def __init__(self, vm) -> None:
        self.vm = vm

    def screendump(self, args: dict) -> None:
        """Write the screen as PPM (default) or PNG, as QEMU's screendump."""
        if "filename" not in args:
            raise QmpError("Parameter 'filename' is missing")
        if args.get("head", 0) != 0:
            raise QmpError(f"Head {args['head']} not found (the display has one head)")
        if "device" in args and args["device"] not in ("video0", "virtio-gpu"):
            raise QmpError(f"Device '{args['device']}' not found")
        self.vm.screendump(args["filename"], args.get("format", "ppm"))

    def query_vnc(self, _args: dict) -> dict:
        server = self.vm.vnc
        if server is None:
            return {"enabled": False}
        info = server.server_info()
        return {"enabled": True, **info,
                "clients": [server.client_info(c) for c in list(server.clients)]}

    def query_display_options(self, _args: dict) -> dict:
        return {"type": self.vm.config.extra.get("display", "default")}

    def _vnc_for_password(self, args: dict):
        protocol = args.get("protocol")
        if protocol is None:
            raise QmpError("Parameter 'protocol' is missing")
        if protocol != "vnc":
            raise QmpError(f"Invalid parameter 'protocol': {protocol} (kemu has vnc only)")
        if args.get("display") not in (None, "default"):
            raise QmpError(f"Display '{args['display']}' not found")
        server = self.vm.vnc
        if server is None:
            raise QmpError("VNC display not active")
        return server

    def set_password(self, args: dict) -> None:
        server = self._vnc_for_password(args)
        if "password" not in args:
            raise QmpError("Parameter 'password' is missing")
        if args.get("connected", "keep") != "keep":
            raise QmpError("connected must be keep for VNC")
        self._set_vnc_password(server, args["password"])

    @staticmethod
    def _set_vnc_password(server, password: str) -> None:
        if not server.options.password:
            raise QmpError("If you want use passwords please enable password auth "
                           "using '-vnc ${dpy},password'.")
        server.set_password(password)

    def expire_password(self, args: dict) -> None:
        server = self._vnc_for_password(args)
        if "time" not in args:
            raise QmpError("Parameter 'time' is missing")
        try:
            server.expire_password(args["time"])
        except ValueError as e:
            raise QmpError(str(e)) from None

    def change_vnc_password(self, args: dict) -> None:
        server = self.vm.vnc
        if server is None:
            raise QmpError("VNC display not active")
        if "password" not in args:
            raise QmpError("Parameter 'password' is missing")
        self._set_vnc_password(server, args["password"])
