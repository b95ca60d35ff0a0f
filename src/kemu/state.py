"""Saved state as plain data, and the snapshot stream that carries it.

The convention every device (and vCPU) follows, so that snapshots,
migration and fork fall out of it:

* ``save()`` returns the device's state as plain, versioned data: a
  dataclass (or dict) whose fields are ints, bools, strings, bytes, lists and
  dicts of those, or nested dataclasses, with a ``version`` field first.
  Nothing in it refers to host objects (fds, threads, callbacks).
* ``restore(state)`` takes what ``save()`` returned (the same dataclass type,
  rebuilt from its plain form by :func:`from_plain` using the type hint of
  ``save``'s return value) and refuses a ``version`` it does not know by
  raising :class:`StateError`.
* It is called with the machine paused and its I/O drained; the device
  re-derives whatever it caches (interrupt outputs, timers) from the state.

The stream (:func:`write_stream`, :func:`read_stream`) is a header and a
payload: ``KEMUSNAP``, the format version, a JSON header (the machine's
configuration fingerprint, sizes, the payload's SHA-256) and the JSON
payload, bytes carried as base64.  :func:`check_header` refuses, in one line,
a stream from a newer format or from another machine configuration, and a
truncated or corrupted one, before anything is started.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import struct
import typing
from pathlib import PurePath
from typing import Any, BinaryIO, Protocol

from kemu.errors import KemuError

MAGIC = b"KEMUSNAP"
#: Bumped when the stream's layout changes; older kemu refuses newer streams.
FORMAT_VERSION = 1
#: Bounds on what is read from an untrusted stream before checking it.
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 1 << 30

_PREFIX = struct.Struct("<8sIQ")     # magic, format version, header length
_LEN = struct.Struct("<Q")


class StateError(KemuError):
    """A snapshot or migration stream, or a device state in it, that kemu cannot load."""


class Stateful(Protocol):
    """What a device offers to snapshots: plain versioned state both ways."""

    def save(self) -> Any: ...

    def restore(self, state: Any) -> None: ...


# -- plain data ------------------------------------------------------------------------------
def to_plain(value: Any) -> Any:
    """``value`` as dicts, lists, ints, bools, strings, bytes and None only."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, PurePath):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    raise TypeError(f"not plain state: {type(value).__name__}")


def from_plain(cls: Any, data: Any) -> Any:
    """Rebuild a value of type ``cls`` (a dataclass, list[...], ...) from its plain form.

    Raises :class:`StateError` when ``data`` does not have that shape.
    """
    origin = typing.get_origin(cls)
    if dataclasses.is_dataclass(cls):
        if not isinstance(data, dict):
            raise StateError(f"{cls.__name__}: expected a mapping")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.name in data:
                kwargs[f.name] = from_plain(hints.get(f.name, Any), data[f.name])
            elif (f.default is dataclasses.MISSING
                  and f.default_factory is dataclasses.MISSING):
                raise StateError(f"{cls.__name__}: field {f.name} missing")
        return cls(**kwargs)
    if origin is dict:
        if not isinstance(data, dict):
            raise StateError(f"expected a mapping, got {type(data).__name__}")
        args = typing.get_args(cls)
        inner = args[1] if len(args) == 2 else Any
        return {k: from_plain(inner, v) for k, v in data.items()}
    if origin in (list, tuple) or cls in (list, tuple):
        if not isinstance(data, list):
            raise StateError(f"expected a list, got {type(data).__name__}")
        args = typing.get_args(cls)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return tuple(from_plain(a, v) for a, v in zip(args, data))
        inner = args[0] if args else Any
        out = [from_plain(inner, v) for v in data]
        return tuple(out) if origin is tuple or cls is tuple else out
    if origin is typing.Union or type(cls).__name__ == "UnionType":
        if data is None:
            return None
        for arg in typing.get_args(cls):
            if arg is type(None):
                continue
            try:
                return from_plain(arg, data)
            except (StateError, TypeError, ValueError):
                continue
        raise StateError(f"value does not fit {cls}")
    if isinstance(cls, type) and issubclass(cls, PurePath):
        if not isinstance(data, str):
            raise StateError("expected a path")
        return cls(data)
    if cls in (int, bool, str, bytes):
        if cls is int and isinstance(data, bool) or not isinstance(data, cls):
            raise StateError(f"expected {cls.__name__}, got {type(data).__name__}")
        return data
    return data     # Any, dict[...]: taken as it is


def state_type(device: Stateful) -> Any:
    """The type ``device.save()`` returns (from its annotation), or Any."""
    try:
        return typing.get_type_hints(type(device).save).get("return", Any)
    except Exception:
        return Any


def save_plain(device: Stateful) -> Any:
    return to_plain(device.save())


def restore_plain(device: Stateful, data: Any) -> None:
    """``device.restore`` from plain data; any failure is one :class:`StateError` line."""
    name = getattr(device, "name", type(device).__name__)
    try:
        device.restore(from_plain(state_type(device), data))
    except StateError as e:
        raise StateError(f"{name}: {e}") from None
    except KemuError as e:
        raise StateError(f"{name}: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise StateError(f"{name}: saved state does not fit this device ({e})") from None


def check_version(what: str, version: int, known: int = 1) -> None:
    if version != known:
        raise StateError(f"{what}: state version {version} is not one kemu knows ({known})")


# -- JSON with bytes ------------------------------------------------------------------------
def _default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$b": base64.b64encode(bytes(value)).decode()}
    raise TypeError(f"not plain state: {type(value).__name__}")


def _hook(obj: dict) -> Any:
    if len(obj) == 1 and "$b" in obj:
        return base64.b64decode(obj["$b"], validate=True)
    return obj


def dumps(value: Any) -> bytes:
    return json.dumps(to_plain(value), default=_default, separators=(",", ":")).encode()


def loads(data: bytes) -> Any:
    return json.loads(data, object_hook=_hook)


# -- the stream -------------------------------------------------------------------------------
def encode_stream(header: dict, payload: Any, *, body: bytes | None = None) -> bytes:
    """The stream of ``header`` and ``payload`` (``body``: the payload already
    through :func:`dumps`, when one payload goes out under several headers)."""
    if body is None:
        body = dumps(payload)
    head = dict(header, payload_size=len(body), payload_sha256=hashlib.sha256(body).hexdigest())
    head_bytes = dumps(head)
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head_bytes)) + head_bytes + \
        _LEN.pack(len(body)) + body


def write_stream(f: BinaryIO, header: dict, payload: Any) -> None:
    f.write(encode_stream(header, payload))


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise StateError(f"{what}: truncated (expected {n} bytes, got {len(data)})")
    return data


def read_header(f: BinaryIO, what: str = "snapshot") -> dict:
    """The stream's header, checked for magic and format version."""
    prefix = f.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size:
        raise StateError(f"{what}: truncated or empty (no kemu snapshot header)")
    magic, version, head_len = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise StateError(f"{what}: not a kemu snapshot (bad magic)")
    if version > FORMAT_VERSION:
        raise StateError(f"{what}: snapshot format {version} is newer than this kemu's "
                         f"({FORMAT_VERSION})")
    if version < 1 or head_len > MAX_HEADER:
        raise StateError(f"{what}: corrupted header")
    try:
        header = loads(_read_exact(f, head_len, what))
    except (ValueError, UnicodeDecodeError):
        raise StateError(f"{what}: corrupted header") from None
    if not isinstance(header, dict):
        raise StateError(f"{what}: corrupted header")
    return header


def read_payload(f: BinaryIO, header: dict, what: str = "snapshot") -> Any:
    """The payload after :func:`read_header`, checked against the header's SHA-256."""
    (size,) = _LEN.unpack(_read_exact(f, _LEN.size, what))
    if size != header.get("payload_size") or size > MAX_PAYLOAD:
        raise StateError(f"{what}: corrupted (payload size does not match its header)")
    body = _read_exact(f, size, what)
    if hashlib.sha256(body).hexdigest() != header.get("payload_sha256"):
        raise StateError(f"{what}: corrupted (payload checksum mismatch)")
    try:
        return loads(body)
    except (ValueError, UnicodeDecodeError):
        raise StateError(f"{what}: corrupted payload") from None


def check_header(header: dict, expected: dict, what: str = "snapshot") -> None:
    """Refuse a stream made for another machine configuration, naming the first difference."""
    saved = header.get("machine")
    if not isinstance(saved, dict):
        raise StateError(f"{what}: corrupted header (no machine configuration)")
    for key, value in expected.items():
        if saved.get(key) != value:
            raise StateError(f"{what}: made for another machine ({key} is {saved.get(key)!r}, "
                             f"this machine has {value!r})")


def _ram_text(layout: list) -> str:
    def size(n: int) -> str:
        for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
            if n % (1 << shift) == 0:
                return f"{n >> shift} {unit}"
        return f"{n} bytes"
    return " + ".join(f"{size(s)} at {b:#x}" for b, s in layout)


def check_ram(saved: Any, memory, what: str = "snapshot") -> None:
    """Refuse RAM saved for another layout: ``saved`` is a header's ``memory``
    (``size`` and ``regions``, ``[[base, size], ...]``: the regions end to end
    are the saved RAM offsets); ``memory`` the machine's :class:`GuestMemory`.
    A header without ``regions`` (made before machines had several) stands
    for one region at the machine's own base."""
    own = memory.ram_layout()
    try:
        size = int(saved["size"])
        regions = saved.get("regions")
        if regions is None:
            regions = [[own[0][0], size]] if own else []
        layout = [[int(b), int(s)] for b, s in regions]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise StateError(f"{what}: corrupted header (memory)") from None
    if sum(s for _, s in layout) != size:
        raise StateError(f"{what}: corrupted header (memory regions)")
    if layout != own:
        raise StateError(f"{what}: made for RAM {_ram_text(layout) or 'none'}, this machine "
                         f"has {_ram_text(own)}")
