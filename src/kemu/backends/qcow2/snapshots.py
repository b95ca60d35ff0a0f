"""The qcow2 snapshot table (spec: "Snapshots"), read: what ``kemu img snapshot -l`` lists.

Each entry: L1 table offset and size, the lengths of the id and name, the
date (seconds, nanoseconds), the VM clock (ns), the VM state size, the size
of extra data (v3: a 64-bit VM state size, the disk size, the icount), then
the id and name strings, padded to 8 bytes.  Read-only: listing works on
images with snapshots made by qemu-img or QEMU's savevm.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from pathlib import Path

from kemu.backends.block import ImageError
from kemu.backends.qcow2.check import SNAPSHOT_ENTRY
from kemu.backends.qcow2.header import header_probe_length, parse_header
from kemu.backends.qcow2.io import HostFile

_EXTRA = struct.Struct(">QQQ")        # vm_state_size_large, disk_size, icount
#: A bound on one entry's extra data and strings (QEMU: 1 KiB extra, 64 KiB names).
MAX_ENTRY_TAIL = 1 << 17


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    icount: int | None

    def row(self) -> str:
        """One line as qemu-img snapshot -l prints it (bdrv_snapshot_dump)."""
        from kemu.img import size_to_str
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.date_sec))
        secs = self.vm_clock_nsec // 1_000_000_000
        clock = (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}"
                 f".{self.vm_clock_nsec // 1_000_000 % 1000:03d}")
        icount = "" if self.icount is None else str(self.icount)
        return (f"{self.id:<9} {self.name:<16} {size_to_str(self.vm_state_size):>8}"
                f"{date:>20}{clock:>13}{icount:>11}")


HEADER_ROW = f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"


def list_snapshots(path: str | Path, lock=None) -> list[Snapshot]:
    file = HostFile(path, True, lock)
    try:
        h = parse_header(file.pread(0, min(header_probe_length(file.pread(0, 24)), file.size)),
                         file.size)
        out = []
        pos = h.snapshots_offset
        for _ in range(h.nb_snapshots):
            fixed = file.pread_exact(pos, SNAPSHOT_ENTRY.size, "snapshot table entry")
            (_l1, _l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state,
             extra_len) = SNAPSHOT_ENTRY.unpack(fixed)
            pos += SNAPSHOT_ENTRY.size
            if extra_len + id_len + name_len > MAX_ENTRY_TAIL:
                raise ImageError(f"{path}: snapshot table entry too large")
            tail = file.pread_exact(pos, extra_len + id_len + name_len, "snapshot table entry")
            icount = None
            if extra_len >= 8:
                vm_state = struct.unpack_from(">Q", tail)[0]
            if extra_len >= 24:
                raw = _EXTRA.unpack_from(tail)[2]
                icount = None if raw == (1 << 64) - 1 else raw
            sid = tail[extra_len:extra_len + id_len].decode(errors="replace")
            name = tail[extra_len + id_len:].decode(errors="replace")
            out.append(Snapshot(sid, name, date_sec, date_nsec, vm_clock, vm_state, icount))
            pos += len(tail)
            pos += -pos % 8
        return out
    finally:
        file.close()
