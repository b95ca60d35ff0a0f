"""ELF64 executables for the aarch64 loader (System V gABI, "ELF-64 Object File Format").

Only what a boot loader needs: the ELF header's entry point and the
``PT_LOAD`` program headers, placed at their physical addresses
(``p_paddr``) as QEMU's ``load_elf`` does, with ``p_memsz - p_filesz``
bytes of zeros after each.  Every offset and size is checked against the
file before use.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kemu.errors import BootError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_AARCH64 = 183
PT_LOAD = 1
#: e_ident .. e_shstrndx (64 bytes) and one Elf64_Phdr (56 bytes).
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
MAX_SEGMENTS = 64


@dataclass(frozen=True)
class Segment:
    paddr: int
    data: bytes
    memsz: int


@dataclass(frozen=True)
class ElfImage:
    entry: int
    segments: tuple[Segment, ...]

    @property
    def low(self) -> int:
        return min(s.paddr for s in self.segments)

    @property
    def high(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def parse(data: bytes, what: str = "kernel") -> ElfImage:
    """The loadable segments of an aarch64 ELF64 little-endian executable."""
    if len(data) < EHDR.size:
        raise BootError(f"{what}: truncated ELF header")
    (ident, e_type, machine, _version, entry, phoff, _shoff, _flags, _ehsize, phentsize,
     phnum, _shentsize, _shnum, _shstrndx) = EHDR.unpack_from(data)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        raise BootError(f"{what}: not a 64-bit little-endian ELF")
    if machine != EM_AARCH64:
        raise BootError(f"{what}: ELF for machine {machine}, not aarch64 ({EM_AARCH64})")
    if e_type != ET_EXEC:
        raise BootError(f"{what}: ELF type {e_type} is not an executable (ET_EXEC)")
    if phentsize != PHDR.size or not 0 < phnum <= MAX_SEGMENTS:
        raise BootError(f"{what}: ELF program headers are malformed")
    if phoff + phnum * PHDR.size > len(data):
        raise BootError(f"{what}: ELF program headers lie beyond the file")
    segments = []
    for i in range(phnum):
        (p_type, _pflags, offset, _vaddr, paddr, filesz, memsz,
         _align) = PHDR.unpack_from(data, phoff + i * PHDR.size)
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz or offset + filesz > len(data):
            raise BootError(f"{what}: ELF segment {i} lies beyond the file")
        segments.append(Segment(paddr, data[offset:offset + filesz], memsz))
    if not segments:
        raise BootError(f"{what}: ELF has no loadable segment")
    return ElfImage(entry, tuple(segments))
