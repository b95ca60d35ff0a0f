"""Kernel module dependency resolution without depmod.

Distribution kernel packages ship modules.dep only after their postinst ran
depmod, so the guest builder reads each module's ``.modinfo`` ELF section
(NUL-separated ``key=value`` strings; ``depends=`` lists the modules it needs)
and orders the modules so dependencies load first.
"""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

from kemu.errors import GuestBuildError


def _normal(name: str) -> str:
    return name.replace("-", "_")


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        data = lzma.decompress(data)
    return data


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The ``.modinfo`` key/value pairs of an ELF64 little-endian module."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise GuestBuildError("kernel module is not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    sections = []
    for i in range(shnum):
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * shentsize)
        sections.append((name, offset, size))
    _n, stroff, _s = sections[shstrndx]
    info: dict[str, list[str]] = {}
    for name, offset, size in sections:
        end = elf.index(b"\0", stroff + name)
        if elf[stroff + name:end] == b".modinfo":
            for item in elf[offset:offset + size].split(b"\0"):
                if b"=" in item:
                    k, v = item.decode(errors="replace").split("=", 1)
                    info.setdefault(k, []).append(v)
    return info


def index(modules_dir: Path) -> dict[str, Path]:
    """Module name -> path, for every ``.ko`` / ``.ko.xz`` under ``modules_dir``."""
    found: dict[str, Path] = {}
    for path in modules_dir.rglob("*.ko*"):
        name = path.name.split(".ko")[0]
        found[_normal(name)] = path
    return found


def load_order(modules_dir: Path, wanted: list[str]) -> list[Path]:
    """``wanted`` and their dependencies, dependencies first.

    Names absent from the kernel (built in, or not shipped) are skipped.
    """
    available = index(modules_dir)
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = _normal(name)
        if name in seen or name not in available:
            return
        if name in chain:
            raise GuestBuildError(f"kernel module dependency loop: {' -> '.join(chain)}")
        path = available[name]
        for dep in modinfo(read_module(path)).get("depends", [""])[0].split(","):
            if dep:
                visit(dep, chain + (name,))
        seen.add(name)
        order.append(path)

    for name in wanted:
        visit(name, ())
    return order
