"""The qcow2 snapshot table (spec: "Snapshots"): read, listed, encoded.

Each entry: L1 table offset and size, the lengths of the id and name, the
date (seconds, nanoseconds), the VM clock (ns), the VM state size, the size
of extra data (QEMU writes 24 bytes: a 64-bit VM state size, the disk size,
the icount), then the id and name strings; every entry starts 8-aligned.
Extra data beyond the fields kemu knows is kept as it is (spec: "Unknown
fields must be ignored", and QEMU preserves them when it rewrites the table).

The table is rewritten whole, at a new place, by
:mod:`kemu.backends.qcow2.internal` (creating, applying and deleting
snapshots); :func:`list_snapshots` is what ``kemu img snapshot -l`` prints.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from pathlib import Path

from kemu.backends.block import ImageError
from kemu.backends.qcow2.check import SNAPSHOT_ENTRY
from kemu.backends.qcow2.header import (
    MAX_L1_BYTES, Header, header_probe_length, parse_header)
from kemu.backends.qcow2.io import HostFile

_EXTRA = struct.Struct(">QQQ")        # vm_state_size_large, disk_size, icount
#: A bound on one entry's extra data (QEMU: 1 KiB) and strings (QEMU: 64 KiB each).
MAX_EXTRA = 1024
MAX_ENTRY_TAIL = MAX_EXTRA + 2 * 65535
#: Byte offset of nb_snapshots (u32) and snapshots_offset (u64) in the header.
OFF_NB_SNAPSHOTS = 60
NO_ICOUNT = (1 << 64) - 1


@dataclass
class SnapshotEntry:
    """One snapshot table entry."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    #: The virtual disk's size when the snapshot was taken (None: not recorded).
    disk_size: int | None = None
    #: QEMU's record/replay instruction count (None: icount was off, stored as -1).
    icount: int | None = None
    #: Extra data past the 24 bytes kemu knows, kept verbatim.
    unknown_extra: bytes = b""

    def row(self) -> str:
        """One line as qemu-img snapshot -l prints it (bdrv_snapshot_dump)."""
        return format_row(self.id, self.name, self.vm_state_size, self.date_sec,
                          self.vm_clock_nsec, self.icount)

    def encode(self) -> bytes:
        ident, name = self.id.encode(), self.name.encode()
        if len(ident) > 0xFFFF or len(name) > 0xFFFF:
            raise ImageError("snapshot id or name longer than 65535 bytes")
        extra = _EXTRA.pack(self.vm_state_size, self.disk_size or 0,
                            NO_ICOUNT if self.icount is None else self.icount)
        extra += self.unknown_extra
        small_state = self.vm_state_size if self.vm_state_size <= 0xFFFFFFFF else 0
        return SNAPSHOT_ENTRY.pack(self.l1_table_offset, self.l1_size, len(ident), len(name),
                                   self.date_sec & 0xFFFFFFFF, self.date_nsec, self.vm_clock_nsec,
                                   small_state, len(extra)) + extra + ident + name


def format_row(ident: str, name: str, vm_state_size: int, date_sec: int,
               vm_clock_nsec: int, icount: int | None) -> str:
    from kemu.img import size_to_str
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(date_sec))
    secs = vm_clock_nsec // 1_000_000_000
    clock = (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}"
             f".{vm_clock_nsec // 1_000_000 % 1000:03d}")
    count = "" if icount is None else str(icount)
    return (f"{ident:<9} {name:<16} {size_to_str(vm_state_size):>8}"
            f"{date:>20}{clock:>13}{count:>11}")


HEADER_ROW = f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"
#: Kept for callers of the first, list-only version.
Snapshot = SnapshotEntry


def encode_table(entries: list[SnapshotEntry]) -> bytes:
    out = bytearray()
    for entry in entries:
        out += bytes(-len(out) % 8)
        out += entry.encode()
    return bytes(out)


def read_table(file: HostFile, h: Header) -> tuple[list[SnapshotEntry], int]:
    """The entries of the snapshot table and its size in bytes, each entry checked
    against the file (one :class:`ImageError` for a damaged table)."""
    entries: list[SnapshotEntry] = []
    pos = h.snapshots_offset
    for _ in range(h.nb_snapshots):
        pos += -(pos - h.snapshots_offset) % 8
        fixed = file.pread_exact(pos, SNAPSHOT_ENTRY.size, "snapshot table entry")
        (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state,
         extra_len) = SNAPSHOT_ENTRY.unpack(fixed)
        pos += SNAPSHOT_ENTRY.size
        if extra_len > MAX_EXTRA:
            raise ImageError(f"{file.path}: snapshot table entry has {extra_len} bytes of "
                             f"extra data (at most {MAX_EXTRA})")
        if l1_size > MAX_L1_BYTES // 8 or l1_off % h.cluster_size or \
                l1_off + l1_size * 8 > file.size:
            raise ImageError(f"{file.path}: snapshot L1 table at {l1_off:#x} ({l1_size} "
                             f"entries) is invalid")
        tail = file.pread_exact(pos, extra_len + id_len + name_len, "snapshot table entry")
        pos += len(tail)
        disk_size = icount = None
        known = min(extra_len, _EXTRA.size)
        raw = tail[:known] + bytes(_EXTRA.size - known)
        large, size, count = _EXTRA.unpack(raw)
        if extra_len >= 8:
            vm_state = large
        if extra_len >= 16:
            disk_size = size
        if extra_len >= 24 and count != NO_ICOUNT:
            icount = count
        ident = tail[extra_len:extra_len + id_len].decode(errors="replace")
        name = tail[extra_len + id_len:].decode(errors="replace")
        entries.append(SnapshotEntry(ident, name, l1_off, l1_size, date_sec, date_nsec,
                                     vm_clock, vm_state, disk_size, icount,
                                     tail[_EXTRA.size:extra_len] if extra_len > _EXTRA.size
                                     else b""))
    return entries, pos - h.snapshots_offset


def find(entries: list[SnapshotEntry], id_or_name: str) -> int:
    """Index of the snapshot with that id, else with that name (QEMU's
    find_snapshot_by_id_or_name), or -1."""
    for i, entry in enumerate(entries):
        if entry.id == id_or_name:
            return i
    for i, entry in enumerate(entries):
        if entry.name == id_or_name:
            return i
    return -1


def new_id(entries: list[SnapshotEntry]) -> str:
    """One more than the largest numeric id (QEMU's find_new_snapshot_id, strtoul)."""
    best = 0
    for entry in entries:
        digits = ""
        for ch in entry.id.lstrip():
            if not ch.isdigit():
                break
            digits += ch
        best = max(best, int(digits) if digits else 0)
    return str(best + 1)


def list_snapshots(path: str | Path, lock=None) -> list[SnapshotEntry]:
    file = HostFile(path, True, lock)
    try:
        h = parse_header(file.pread(0, min(header_probe_length(file.pread(0, 24)), file.size)),
                         file.size)
        return read_table(file, h)[0]
    finally:
        file.close()
