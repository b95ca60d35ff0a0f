"""The QMP wire protocol as a sans-I/O state machine (QEMU's qmp-spec).

Bytes in, messages out: :meth:`QmpSession.feed` takes what a client sent
and returns the responses to write back, running commands through a
dispatcher.  The session refuses every command but ``qmp_capabilities``
until capabilities are negotiated (spec section "Capabilities
Negotiation"), answers ``{"return": ...}`` or ``{"error": {"class",
"desc"}}`` with the client's ``id``, and formats events with a timestamp.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable

MAX_MESSAGE = 1 << 20    # bytes of unparsed input a client may have pending


class QmpError(Exception):
    """A command failure reported to the client as ``{"error": ...}``."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


@dataclass
class Response:
    data: dict
    close: bool = False    # close the connection after sending this


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(", ", ": ")).encode() + b"\r\n"


def greeting(version: tuple[int, int, int], package: str) -> dict:
    major, minor, micro = version
    return {"QMP": {"version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                                "package": package},
                    "capabilities": []}}


def event(name: str, data: dict | None = None) -> dict:
    now = time.time()
    msg: dict[str, Any] = {"event": name,
                           "timestamp": {"seconds": int(now),
                                         "microseconds": int((now % 1) * 1_000_000)}}
    if data is not None:
        msg["data"] = data
    return msg


class QmpSession:
    """One client connection's protocol state."""

    def __init__(self, dispatch: Callable[[str, dict], Any],
                 commands: Callable[[], set[str]]) -> None:
        self._dispatch = dispatch
        self._commands = commands
        self._buffer = ""
        self._decoder = json.JSONDecoder()
        self.negotiated = False

    def feed(self, data: bytes) -> list[Response]:
        out: list[Response] = []
        try:
            self._buffer += data.decode("utf-8")
        except UnicodeDecodeError:
            self._buffer = ""
            return [Response(_error("JSON parse error, invalid UTF-8 sequence"))]
        while True:
            text = self._buffer.lstrip()
            if not text:
                self._buffer = ""
                break
            try:
                msg, end = self._decoder.raw_decode(text)
            except json.JSONDecodeError as e:
                newline = text.find("\n")
                if newline < 0:
                    # No complete line yet: wait for more, within bounds.
                    self._buffer = text
                    if len(text) > MAX_MESSAGE:
                        self._buffer = ""
                        out.append(Response(_error("JSON parse error, message too long"),
                                            close=True))
                    break
                # A complete line that is not JSON: report it and drop it.
                out.append(Response(_error(f"JSON parse error, {e.msg}")))
                self._buffer = text[newline + 1:]
                continue
            self._buffer = text[end:]
            out.append(Response(self._handle(msg)))
        return out

    def _handle(self, msg: Any) -> dict:
        if not isinstance(msg, dict):
            return _error("QMP input must be a JSON object")
        ident = msg.get("id")
        resp = self._execute(msg)
        if "id" in msg:
            resp["id"] = ident
        return resp

    def _execute(self, msg: dict) -> dict:
        name = msg.get("execute")
        if name is None:
            return _error("QMP input lacks member 'execute'")
        if not isinstance(name, str):
            return _error("QMP input member 'execute' must be a string")
        args = msg.get("arguments", {})
        if not isinstance(args, dict):
            return _error("QMP input member 'arguments' must be an object")
        for key in msg:
            if key not in ("execute", "arguments", "id"):
                return _error(f"QMP input member '{key}' is unexpected")
        if not self.negotiated:
            if name != "qmp_capabilities":
                return _error("Expecting capabilities negotiation with 'qmp_capabilities'",
                              "CommandNotFound")
            if args.get("enable", []) not in ([],):
                return _error("Parameter 'enable' is unexpected: no capability to enable")
            self.negotiated = True
            return {"return": {}}
        if name == "qmp_capabilities":
            return _error("Capabilities negotiation is already complete, command ignored",
                          "CommandNotFound")
        if name not in self._commands():
            return _error(f"The command {name} has not been found", "CommandNotFound")
        try:
            result = self._dispatch(name, args)
        except QmpError as e:
            return _error(e.desc, e.cls)
        return {"return": {} if result is None else result}


def _error(desc: str, cls: str = "GenericError") -> dict:
    return {"error": {"class": cls, "desc": desc}}
