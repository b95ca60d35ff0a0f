"""The QMP wire protocol as a sans-I/O state machine (QEMU's docs/interop/qmp-spec).

Bytes in, messages out: :meth:`QmpSession.feed` takes what a client sent
and returns the responses to write back, running commands through a
dispatcher; no sockets, no threads, so tests feed it made-up bytes.

What the spec asks, section by section:

- "Server Greeting": :func:`greeting` is ``{"QMP": {"version": {"qemu":
  {"major", "minor", "micro"}, "package"}, "capabilities": []}}``.
- "Capabilities Negotiation": every command but ``qmp_capabilities`` is
  refused with ``CommandNotFound`` until it has run; after that,
  ``qmp_capabilities`` itself is refused the same way.
- "Issuing Commands": ``{"execute", "arguments"?, "id"?}``, nothing else;
  the ``id`` comes back verbatim in the response.
- "Commands Responses": ``{"return": ...}`` or ``{"error": {"class",
  "desc"}}``; input that is not a JSON object, or not JSON at all, gets a
  ``GenericError`` (without ``id``: there is none to copy).
- "Asynchronous events": :func:`event` is ``{"event", "data"?,
  "timestamp": {"seconds", "microseconds"}}``.
- "Forcing the JSON parser into known-good state": as in QEMU, a malformed
  message is answered with an error and the parser goes on with the next
  one; bytes that are not UTF-8 (a client's 0xFF reset byte among them)
  drop what is pending.

Messages are JSON texts one after another, not lines: they may be split
across reads, span lines or share one (see :class:`QmpSession`).
"""

from __future__ import annotations

import codecs
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

MAX_MESSAGE = 1 << 20    # bytes of unparsed input a client may have pending
MAX_NESTING = 1024       # QEMU's json-streamer: "JSON nesting depth limit exceeded"


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


def event(name: str, data: dict | None = None, timestamp: float | None = None) -> dict:
    """An event message ("Asynchronous events"); ``timestamp`` defaults to now (time.time())."""
    now = time.time() if timestamp is None else timestamp
    msg: dict[str, Any] = {"event": name,
                           "timestamp": {"seconds": int(now),
                                         "microseconds": int((now % 1) * 1_000_000)}}
    if data is not None:
        msg["data"] = data
    return msg


#: Where a JSON value's nesting can change, outside and inside strings.
_STRUCTURE = re.compile(r'["{}\[\]]')
_IN_STRING = re.compile(r'["\\]')


class QmpSession:
    """One client connection's protocol state.

    Input is split into messages as QEMU's JSON streamer does: an object or
    array ends where its braces balance (strings and escapes understood, so
    a message may span reads and lines); anything else at the top level is
    taken up to the end of its line.  A message that is not valid JSON gets
    a ``JSON parse error`` and the session goes on with the next one.
    Pending input is bounded by :data:`MAX_MESSAGE`: beyond it the client
    gets an error and the connection is closed (:attr:`Response.close`).
    """

    def __init__(self, dispatch: Callable[[str, dict], Any],
                 commands: Callable[[], set[str]]) -> None:
        self._dispatch = dispatch
        self._commands = commands
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._buffer = ""
        # Scan state of the object or array being received.
        self._depth = 0
        self._in_string = False
        self._pos = 0
        self._too_deep = False    # the message being received nests beyond MAX_NESTING
        self.negotiated = False

    def feed(self, data: bytes) -> list[Response]:
        """Take bytes from the client; returns the responses to send, in order."""
        out: list[Response] = []
        try:
            self._buffer += self._utf8.decode(data)
        except UnicodeDecodeError:
            # As after a lexical error in QEMU: drop what is pending, resynchronize.
            self._utf8.reset()
            self._reset_scan("")
            self._too_deep = False
            return [Response(_error("JSON parse error, invalid UTF-8 sequence"))]
        while (text := self._next_message()) is not None:
            if self._too_deep:
                self._too_deep = False
                out.append(Response(_error("JSON parse error, nesting depth limit exceeded")))
                continue
            try:
                msg = json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                                 parse_constant=_parse_constant)
            except json.JSONDecodeError as e:
                out.append(Response(_error(f"JSON parse error, {e.msg}")))
                continue
            except (ValueError, RecursionError) as e:
                out.append(Response(_error(f"JSON parse error, {e}"[:200])))
                continue
            out.append(Response(self._handle(msg)))
        if len(self._buffer) > MAX_MESSAGE:
            self._reset_scan("")
            self._too_deep = False
            out.append(Response(_error("JSON parse error, message too long"), close=True))
        return out

    def _reset_scan(self, rest: str) -> None:
        self._buffer = rest
        self._depth = 0
        self._in_string = False
        self._pos = 0

    def _next_message(self) -> str | None:
        """Cut the next complete message off the buffer, or None if there is none yet."""
        buf = self._buffer
        if self._depth == 0:
            buf = self._buffer = buf.lstrip()
            if not buf:
                return None
            if buf[0] not in "{[":
                # A scalar or garbage at the top level: one message per line.
                newline = buf.find("\n")
                if newline < 0:
                    return None
                self._buffer = buf[newline + 1:]
                return buf[:newline]
            self._pos = 0
        pos = self._pos
        while True:
            if self._in_string:
                m = _IN_STRING.search(buf, pos)
                if m is None:
                    self._pos = len(buf)
                    return None
                if m.group() == "\\":
                    if m.end() >= len(buf):        # the escaped character is still to come
                        self._pos = m.start()
                        return None
                    pos = m.end() + 1
                    continue
                self._in_string = False
                pos = m.end()
                continue
            m = _STRUCTURE.search(buf, pos)
            if m is None:
                self._pos = len(buf)
                return None
            c, pos = m.group(), m.end()
            if c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
                if self._depth > MAX_NESTING:
                    self._too_deep = True
            else:
                self._depth -= 1
                if self._depth == 0:
                    self._reset_scan(buf[pos:])
                    return buf[:pos]

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


def _parse_int(text: str) -> int | float:
    """A JSON integer as QEMU's parser takes it: an int when it fits 64 bits, else a
    double; one beyond a double's range (100 000 digits) is an error, not Python's
    unbounded int (whose conversion is refused past 4 300 digits anyway)."""
    if len(text) <= 21:
        value = int(text)
        if -(1 << 63) <= value < (1 << 64):
            return value
    return _parse_float(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number too large")
    return value


def _parse_constant(text: str) -> float:
    raise ValueError(f"invalid literal {text}")   # NaN and Infinity are not JSON


def _error(desc: str, cls: str = "GenericError") -> dict:
    return {"error": {"class": cls, "desc": desc}}
