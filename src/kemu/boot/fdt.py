"""Building flattened device trees (DTB) with libfdt's sequential writer.

libfdt's own Python binding (``pylibfdt``, from the dtc project) does the
encoding; this module adds a nested, typed way to describe nodes so boards
state their tree as data.  Property values are Python values:

* ``str`` -> a NUL-terminated string; ``list[str]`` -> a string list;
* ``int`` -> one 32-bit cell; ``Cells`` -> a list of 32-bit cells;
* ``bytes`` -> raw bytes; ``None`` -> an empty (boolean) property.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Union

import libfdt

from kemu.errors import BootError


@dataclass(frozen=True)
class Cells:
    values: tuple[int, ...]

    def __init__(self, *values: int) -> None:
        object.__setattr__(self, "values", tuple(values))

    def encode(self) -> bytes:
        return b"".join(struct.pack(">I", v & 0xFFFFFFFF) for v in self.values)


def u64_cells(value: int) -> tuple[int, int]:
    return (value >> 32) & 0xFFFFFFFF, value & 0xFFFFFFFF


def reg64(*pairs: tuple[int, int]) -> Cells:
    """A ``reg`` value with #address-cells = #size-cells = 2."""
    out: list[int] = []
    for addr, size in pairs:
        out += [*u64_cells(addr), *u64_cells(size)]
    return Cells(*out)


PropValue = Union[str, list, int, Cells, bytes, None]


@dataclass
class Node:
    name: str
    props: dict[str, PropValue] = field(default_factory=dict)
    children: list["Node"] = field(default_factory=list)

    def add(self, child: "Node") -> "Node":
        self.children.append(child)
        return child


def _encode(value: PropValue) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode() + b"\0"
    if isinstance(value, list):
        return b"".join(s.encode() + b"\0" for s in value)
    if isinstance(value, bool):
        raise TypeError("use None for boolean properties")
    if isinstance(value, int):
        return struct.pack(">I", value & 0xFFFFFFFF)
    if isinstance(value, Cells):
        return value.encode()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise TypeError(f"unsupported property value {value!r}")


def build(root: Node, boot_cpuid: int = 0) -> bytes:
    """Encode ``root`` (whose name must be empty) as a DTB."""
    # Generous room: FdtSw grows while adding, but as_fdt() (fdt_finish, which appends
    # the end tag) does not, and fails with FDT_ERR_NOSPACE on a tree that fills it.
    sw = libfdt.FdtSw(1 << 16)
    sw.finish_reservemap()

    def emit(node: Node) -> None:
        sw.begin_node(node.name)
        for name, value in node.props.items():
            sw.property(name, _encode(value))
        for child in node.children:
            emit(child)
        sw.end_node()

    try:
        emit(root)
        fdt = sw.as_fdt()
        fdt.pack()
    except libfdt.FdtException as e:  # pragma: no cover - our own trees are valid
        raise BootError(f"device tree: {e}") from None
    return bytes(fdt.as_bytearray())
