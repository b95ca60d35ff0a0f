"""QMP ``dump-guest-memory`` (paging=false, format elf): guest RAM as an ELF64 core file,
laid out as QEMU writes it for aarch64 (what crash(8) and gdb read).

The file: the ELF header; program headers, a PT_NOTE first, then one PT_LOAD per RAM
region with ``p_paddr`` its guest-physical address (``p_vaddr`` 0: no paging); the notes,
an NT_PRSTATUS ("CORE") per vCPU with x0-x30, sp, pc, pstate in the aarch64
``struct elf_prstatus`` (``pr_pid`` the vCPU index + 1, as QEMU); then RAM.
kemu writes no NT_PRFPREG (FP/SIMD) notes.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO, Sequence

from kemu.errors import KemuError

EM_AARCH64 = 183
ET_CORE = 4
PT_LOAD, PT_NOTE = 1, 4
PF_RWX = 7
NT_PRSTATUS = 1

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
NHDR = struct.Struct("<III")
#: aarch64 struct elf_prstatus: 32 bytes (info, cursig, sigpend, sighold), pr_pid,
#: 76 bytes (ppid, pgrp, sid, times), pr_reg (34 u64), pr_fpvalid, padding: 392 bytes.
PRSTATUS = struct.Struct("<32sI76s34QI4x")
REGISTERS = [f"x{i}" for i in range(31)] + ["sp", "pc", "pstate"]
CHUNK = 1 << 20


def _note(name: bytes, kind: int, desc: bytes) -> bytes:
    name += b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)     # noqa: E731 - 4-byte alignment
    return NHDR.pack(len(name), len(desc), kind) + pad(name) + pad(desc)


def prstatus(index: int, regs: dict[str, int]) -> bytes:
    return _note(b"CORE", NT_PRSTATUS,
                 PRSTATUS.pack(b"", index + 1, b"",
                               *(regs.get(r, 0) & (2**64 - 1) for r in REGISTERS), 0))


def write_core(out: BinaryIO, ram: Sequence[tuple[int, object]],
               cpus: Sequence[dict[str, int]]) -> None:
    """``ram``: (guest-physical base, buffer) per region; ``cpus``: each vCPU's registers."""
    notes = b"".join(prstatus(i, regs) for i, regs in enumerate(cpus))
    count = 1 + len(ram)
    offset = EHDR.size + count * PHDR.size
    ident = b"\x7fELF" + bytes([2, 1, 1])          # ELFCLASS64, little-endian, EV_CURRENT
    out.write(EHDR.pack(ident, ET_CORE, EM_AARCH64, 1, 0, EHDR.size, 0, 0, EHDR.size,
                        PHDR.size, count, 0, 0, 0))
    out.write(PHDR.pack(PT_NOTE, 0, offset, 0, 0, len(notes), len(notes), 0))
    data = offset + len(notes)
    for base, buf in ram:
        size = len(memoryview(buf))
        out.write(PHDR.pack(PT_LOAD, PF_RWX, data, 0, base, size, size, 0))
        data += size
    out.write(notes)
    for _base, buf in ram:
        view = memoryview(buf)
        for start in range(0, len(view), CHUNK):
            out.write(view[start:start + CHUNK])


def open_target(protocol: str, fds: dict[str, int]) -> BinaryIO:
    """``file:PATH`` (created or truncated) or ``fd:NAME`` (a descriptor from getfd,
    consumed), as QEMU's dump-guest-memory takes them."""
    if protocol.startswith("file:"):
        try:
            fd = os.open(protocol[5:], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as e:
            raise DumpError(f"dump-guest-memory: cannot open {protocol[5:]}: "
                            f"{e.strerror}") from None
    elif protocol.startswith("fd:"):
        fd = fds.pop(protocol[3:], -1)
        if fd < 0:
            raise DumpError(f"File descriptor named '{protocol[3:]}' not found")
    else:
        raise DumpError("Parameter 'protocol' must start with 'file:' or 'fd:'")
    return os.fdopen(fd, "wb", buffering=CHUNK)


class DumpError(KemuError):
    """A dump that cannot be written: one line for the QMP client."""
