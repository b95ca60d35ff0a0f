"""``-dtb FILE``: the user's device tree, with what QEMU's arm_load_dtb changes in it.

QEMU 7.2 (compared with qemu-system-aarch64 by tests/unit/test_arm64_boot.py)
takes the root's ``#address-cells`` / ``#size-cells`` (the file must have
them), replaces every ``device_type = "memory"`` node by ``memory@<base>``
with the machine's RAM, sets ``/chosen`` ``bootargs`` (when -append is given)
and ``linux,initrd-start`` / ``linux,initrd-end`` (one cell each), and lets
the board add its own nodes (virt adds ``psci``).  Edits go through libfdt.
"""

from __future__ import annotations

import libfdt

from kemu.boot.fdt import Node, _encode
from kemu.errors import BootError

#: Room for the edits beyond the file's own size.
SLACK = 64 << 10


def _cells(value: int, n: int) -> bytes:
    return value.to_bytes(4 * n, "big")


def _graft(fdt: libfdt.Fdt, parent: int, node: Node) -> None:
    offset = fdt.add_subnode(parent, node.name)
    for name, value in node.props.items():
        fdt.setprop(offset, name, _encode(value))
    for child in node.children:
        _graft(fdt, offset, child)


def _root_cells(fdt: libfdt.Fdt, name: str, what: str) -> int:
    try:
        value = fdt.getprop(0, name).as_uint32()
    except libfdt.FdtException:
        raise BootError(f"{what}: the root node has no {name}") from None
    if value not in (1, 2):
        raise BootError(f"{what}: {name} = {value} (expected 1 or 2)")
    return value


def _memory_node(fdt: libfdt.Fdt) -> int | None:
    """The first node with ``device_type = "memory"``, if any."""
    offset, depth = fdt.next_node(0, 0, libfdt.QUIET_NOTFOUND)
    while offset >= 0 and depth > 0:
        dtype = fdt.getprop(offset, "device_type", libfdt.QUIET_NOTFOUND)
        if not isinstance(dtype, int) and bytes(dtype) == b"memory\0":
            return offset
        offset, depth = fdt.next_node(offset, depth, libfdt.QUIET_NOTFOUND)
    return None


def apply_boot_fixups(dtb: bytes, what: str, ram_base: int, ram_size: int, bootargs: str,
                      initrd: tuple[int, int] | None, extra: list[Node]) -> bytes:
    """``dtb`` with RAM, /chosen and the board's ``extra`` nodes set as QEMU sets them."""
    try:
        fdt = libfdt.Fdt(bytearray(dtb))
        fdt.resize(fdt.totalsize() + SLACK)
        acells = _root_cells(fdt, "#address-cells", what)
        scells = _root_cells(fdt, "#size-cells", what)
        if ram_base >> (32 * acells) or ram_size >> (32 * scells):
            raise BootError(f"{what}: its #address-cells/#size-cells cannot hold the RAM")
        while (memory := _memory_node(fdt)) is not None:
            fdt.del_node(memory)
        mem = fdt.add_subnode(0, f"memory@{ram_base:x}")
        fdt.setprop(mem, "reg", _cells(ram_base, acells) + _cells(ram_size, scells))
        fdt.setprop_str(mem, "device_type", "memory")
        chosen = fdt.path_offset("/chosen", libfdt.QUIET_NOTFOUND)
        if chosen < 0:
            chosen = fdt.add_subnode(0, "chosen")
        if bootargs:
            fdt.setprop_str(chosen, "bootargs", bootargs)
        if initrd is not None:
            fdt.setprop_u32(chosen, "linux,initrd-start", initrd[0] & 0xFFFFFFFF)
            fdt.setprop_u32(chosen, "linux,initrd-end", initrd[1] & 0xFFFFFFFF)
        for node in extra:
            existing = fdt.subnode_offset(0, node.name, libfdt.QUIET_NOTFOUND)
            if existing >= 0:
                fdt.del_node(existing)
            _graft(fdt, 0, node)
        fdt.pack()
    except libfdt.FdtException as e:
        raise BootError(f"{what}: bad device tree: {e}") from None
    return bytes(fdt.as_bytearray())
