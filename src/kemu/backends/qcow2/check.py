"""Consistency check of a qcow2 image, as ``qemu-img check`` does it.

Every reference to a host cluster is counted from the metadata (header,
L1 tables of the image and of its snapshots, L2 tables, data and
compressed clusters, refcount table and blocks, snapshot table) and
compared with the stored refcounts (qcow2 spec, "Host cluster management"):
a stored refcount below the number of references is a corruption (a
cluster could be freed while in use), above it a leak (wasted space).
The COPIED flag (bit 63) of active L1 and L2 entries must be set exactly
when the cluster's refcount is 1.

The work is bounded by the file size: each L2 table is read once however
many times it is referenced.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kemu.backends.block import ImageError
from kemu.backends.qcow2.header import (
    MAX_L1_BYTES, OFFSET_MASK, Header, header_probe_length, parse_header)
from kemu.backends.qcow2.mapping import COMPRESSED, COPIED, L1E_RESERVED, compressed_extent
from kemu.backends.qcow2.io import HostFile
from kemu.backends.qcow2.refcount import REFT_RESERVED, RefcountBlock, be_array

if TYPE_CHECKING:
    from kemu.backends.locking import Permissions

#: Snapshot table entry, fixed part (spec: "Snapshots").
SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")
L2E_RESERVED = 0x3F00_0000_0000_01FE
MAX_MESSAGES = 1000


@dataclass
class CheckResult:
    filename: str
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    messages: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        """qemu-img check's exit status: 0 clean, 1 check failed,
        2 corruptions, 3 leaks only."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        return 3 if self.leaks else 0

    def note(self, message: str) -> None:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(message)

    def to_json(self) -> dict:
        """qemu-img's ``--output=json`` object (zero counts left out)."""
        out: dict = {"image-end-offset": self.image_end_offset}
        if self.compressed_clusters:
            out["compressed-clusters"] = self.compressed_clusters
        if self.total_clusters:
            out["total-clusters"] = self.total_clusters
        out["check-errors"] = self.check_errors
        if self.leaks:
            out["leaks"] = self.leaks
        if self.corruptions:
            out["corruptions"] = self.corruptions
        if self.allocated_clusters:
            out["allocated-clusters"] = self.allocated_clusters
        out.update({"filename": self.filename, "format": "qcow2"})
        if self.fragmented_clusters:
            out["fragmented-clusters"] = self.fragmented_clusters
        return out

    def format_human(self) -> str:
        lines = list(self.messages)
        if lines:
            lines.append("")
        if self.corruptions:
            lines += [f"{self.corruptions} errors were found on the image.",
                      "Data may be corrupted, or further writes to the image may corrupt it."]
        if self.leaks:
            if self.corruptions:
                lines.append("")
            lines += [f"{self.leaks} leaked clusters were found on the image.",
                      "This means waste of disk space, but no harm to data."]
        if self.check_errors:
            lines.append(f"{self.check_errors} internal errors have occurred during the check.")
        if not (self.corruptions or self.leaks or self.check_errors):
            lines.append("No errors were found on the image.")
        if self.total_clusters and self.allocated_clusters:
            # fragmented and compressed are shares of the allocated clusters
            t, a = self.total_clusters, self.allocated_clusters
            lines.append(f"{a}/{t} = {100 * a / t:.2f}% allocated, "
                         f"{100 * self.fragmented_clusters / max(a, 1):.2f}% fragmented, "
                         f"{100 * self.compressed_clusters / max(a, 1):.2f}% compressed clusters")
        lines.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(lines) + "\n"


class _Checker:
    def __init__(self, file: HostFile, h: Header, result: CheckResult) -> None:
        self.file, self.h, self.r = file, h, result
        self.cb = h.cluster_bits
        self.cs = h.cluster_size
        self.nclusters = -(-file.size // self.cs)
        self.refs = array("Q", bytes(8 * self.nclusters))
        self.per_block_bits = self.cb + 3 - h.refcount_order
        self.blocks: dict[int, RefcountBlock | None] = {}
        raw = file.pread_exact(h.refcount_table_offset, h.refcount_table_clusters * self.cs,
                               "refcount table")
        self.reftable = be_array("Q", raw)

    def corrupt(self, message: str) -> None:
        self.r.corruptions += 1
        self.r.note(message)

    def inc(self, offset: int, length: int, what: str, times: int = 1) -> bool:
        first, last = offset >> self.cb, (offset + max(length, 1) - 1) >> self.cb
        if last >= self.nclusters:
            self.corrupt(f"ERROR {what} at {offset:#x} lies beyond the end of the image")
            return False
        for k in range(first, last + 1):
            self.refs[k] += times
        return True

    def stored(self, cluster: int) -> int:
        b = cluster >> self.per_block_bits
        if b >= len(self.reftable):
            return 0
        block = self.blocks.get(b, False)
        if block is False:
            block = None
            off = self.reftable[b] & ~REFT_RESERVED
            if off and off % self.cs == 0 and off + self.cs <= self.file.size:
                block = RefcountBlock(self.h.refcount_order,
                                      self.file.pread_exact(off, self.cs, "refcount block"))
            self.blocks[b] = block
        if block is None:
            return 0
        return block.get(cluster & ((1 << self.per_block_bits) - 1))

    def read_l1(self, offset: int, size: int, what: str) -> array | None:
        if size * 8 > MAX_L1_BYTES or offset % self.cs or offset + size * 8 > self.file.size:
            self.corrupt(f"ERROR {what} at {offset:#x} ({size} entries) is invalid")
            return None
        if size and not self.inc(offset, size * 8, what):
            return None
        return be_array("Q", self.file.pread_exact(offset, size * 8, what))

    def run(self) -> None:
        h, cs, r = self.h, self.cs, self.r
        self.inc(0, cs, "header")
        self.inc(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
        for i, entry in enumerate(self.reftable):
            if not entry:
                continue
            off = entry & ~REFT_RESERVED
            if entry & REFT_RESERVED or off % cs:
                self.corrupt(f"ERROR refcount block {i} is not cluster aligned; refcount "
                             f"table entry corrupted")
            else:
                self.inc(off, cs, f"refcount block {i}")
        # L1 tables -> how many times each L2 table is referenced
        l2_refs: dict[int, int] = {}
        active_l2: set[int] = set()
        l1 = self.read_l1(h.l1_table_offset, h.l1_size, "L1 table")
        tables = [(l1, True, 1)] if l1 is not None else []
        tables += [(t, False, times) for t, times in self.snapshot_l1_tables()]
        for table, active, times in tables:
            for i, entry in enumerate(table):
                if not entry:
                    continue
                off = entry & OFFSET_MASK
                if entry & L1E_RESERVED:
                    self.corrupt(f"ERROR L1 entry {i} has reserved bits set ({entry:#x})")
                if off % cs or not off:
                    self.corrupt(f"ERROR L2 table offset {off:#x} is not cluster aligned; "
                                 f"L1 entry corrupted")
                    continue
                l2_refs[off] = l2_refs.get(off, 0) + times
                if active:
                    active_l2.add(off)
                    if bool(entry & COPIED) != (self.stored(off >> self.cb) == 1):
                        self.corrupt(f"ERROR OFLAG_COPIED L2 cluster: l1_index={i} "
                                     f"l1_entry={entry:x} refcount={self.stored(off >> self.cb)}")
        self.next_host = 0
        for off, times in l2_refs.items():     # active L1 order first
            if not self.inc(off, cs, "L2 table", times):
                continue
            self.walk_l2(off, times, off in active_l2)
        r.total_clusters = -(-h.size // cs)
        self.compare()

    def snapshot_l1_tables(self) -> list[tuple[array, int]]:
        """The L1 tables of the internal snapshots (spec: "Snapshots"), each
        distinct table read once, with how many snapshots use it."""
        h = self.h
        if not h.nb_snapshots:
            return []
        uses: dict[tuple[int, int], int] = {}
        pos = h.snapshots_offset
        for _ in range(h.nb_snapshots):
            fixed = self.file.pread(pos, SNAPSHOT_ENTRY.size)
            if len(fixed) < SNAPSHOT_ENTRY.size:
                self.corrupt("ERROR snapshot table runs past the end of the file")
                break
            l1_off, l1_size, id_len, name_len, *_rest, extra = SNAPSHOT_ENTRY.unpack(fixed)
            pos += SNAPSHOT_ENTRY.size + extra + id_len + name_len
            pos += -pos % 8
            uses[(l1_off, l1_size)] = uses.get((l1_off, l1_size), 0) + 1
        self.inc(h.snapshots_offset, pos - h.snapshots_offset, "snapshot table")
        out, budget = [], max(self.file.size, 1 << 20)
        for (l1_off, l1_size), times in uses.items():
            budget -= l1_size * 8
            if budget < 0:
                raise ImageError("snapshot L1 tables add up to more than the file size")
            table = self.read_l1(l1_off, l1_size, "snapshot L1 table")
            if table is not None:
                if l1_size:
                    self.inc(l1_off, l1_size * 8, "snapshot L1 table", times - 1)
                out.append((table, times))
        return out

    def walk_l2(self, off: int, times: int, active: bool) -> None:
        cb, cs, r = self.cb, self.cs, self.r
        entries = be_array("Q", self.file.pread_exact(off, cs, "L2 table"))
        for i, entry in enumerate(entries):
            if not entry:
                continue
            if entry & COMPRESSED:
                coff, length = compressed_extent(entry, cb)
                start = coff & ~511
                if entry & COPIED:
                    self.corrupt(f"ERROR compressed cluster {coff:#x} has the COPIED flag set")
                if self.inc(start, coff + length - start, "compressed cluster", times) and active:
                    # compressed clusters count as fragmented (as in qemu-img)
                    r.allocated_clusters += 1
                    r.compressed_clusters += 1
                    r.fragmented_clusters += 1
                continue
            host = entry & OFFSET_MASK
            if not host:
                continue
            if host % cs:
                self.corrupt(f"ERROR offset={host:x}: data cluster is not properly aligned; "
                             f"L2 entry corrupted")
                continue
            if not self.inc(host, cs, "data cluster", times):
                continue
            if active:
                if bool(entry & COPIED) != (self.stored(host >> cb) == 1):
                    self.corrupt(f"ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} "
                                 f"refcount={self.stored(host >> cb)}")
                r.allocated_clusters += 1
                if self.next_host and host != self.next_host:
                    r.fragmented_clusters += 1
                self.next_host = host + cs

    def compare(self) -> None:
        highest = -1
        for k in range(self.nclusters):
            computed, stored = self.refs[k], self.stored(k)
            if computed or stored:
                highest = k
            if computed == stored:
                continue
            if stored < computed:
                self.corrupt(f"ERROR cluster {k} refcount={stored} reference={computed}")
            else:
                self.r.leaks += 1
                self.r.note(f"Leaked cluster {k} refcount={stored} reference={computed}")
        self.r.image_end_offset = (highest + 1) * self.cs


def check_qcow2(path: str | Path, lock: "Permissions | None" = None) -> CheckResult:
    """Check the image at ``path``; raises :class:`ImageError` only when the
    header itself cannot be used.  ``lock``: QEMU's lock bytes to hold meanwhile
    (:mod:`kemu.backends.locking`)."""
    file = HostFile(path, True, lock)
    try:
        try:
            h = parse_header(file.pread(0, min(header_probe_length(file.pread(0, 24)), file.size)),
                             file.size)
        except ImageError as e:
            raise ImageError(f"{path}: {e}") from None
        result = CheckResult(str(path))
        checker = _Checker(file, h, result)
        try:
            checker.run()
        except ImageError as e:
            result.check_errors += 1
            result.note(f"ERROR {e}")
        return result
    finally:
        file.close()
