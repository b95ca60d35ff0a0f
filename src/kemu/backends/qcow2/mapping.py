"""Cluster mapping: guest clusters to host clusters (qcow2 spec, "Cluster
mapping", "Compressed Clusters Descriptor").

The L1 table (kept in memory, one entry per L2 table) holds L2 table
offsets in bits 9-55 and the COPIED flag (bit 63: refcount is exactly 1);
each L2 table is one cluster of 64-bit entries, one per guest cluster:

* bit 62 set: compressed, see :func:`compressed_extent`;
* otherwise bits 9-55 are the host cluster offset (0: unallocated) and
  bit 0 (version 3) means "reads as zeros", with or without a host
  cluster kept allocated;
* bit 63 is COPIED, as in the L1 table.

:class:`ClusterMap` owns the L1 table and the LRU cache of L2 tables, and
makes an L2 table private (allocated, or copied away from a snapshot)
before it is modified.
"""

from __future__ import annotations

import struct
from array import array

from kemu.backends.block import ImageError
from kemu.backends.qcow2.header import OFFSET_MASK, Header
from kemu.backends.qcow2.io import HostFile, TableCache
from kemu.backends.qcow2.refcount import Refcounts, be_array, be_bytes

COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
L1E_RESERVED = 0x7F00_0000_0000_01FF

# what an L2 entry says about its guest cluster
UNALLOCATED, ZERO_PLAIN, ZERO_ALLOC, NORMAL, COMPRESSED_KIND = range(5)

#: Bytes of L2 tables kept in memory.
L2_CACHE_BYTES = 4 << 20


def compressed_extent(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, byte count) of a compressed cluster descriptor: the
    offset is in bits 0..x-1 with x = 62 - (cluster_bits - 8), followed by
    the number of 512-byte sectors used beyond the one holding the offset."""
    x = 62 - (cluster_bits - 8)
    offset = entry & ((1 << x) - 1)
    sectors = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return offset, sectors * 512 - (offset & 511)


def compressed_clusters(entry: int, cluster_bits: int) -> range:
    """The host clusters a compressed cluster's sectors touch (each holds
    one reference per compressed cluster using it)."""
    offset, length = compressed_extent(entry, cluster_bits)
    first = (offset & ~511) >> cluster_bits
    return range(first, ((offset + length - 1) >> cluster_bits) + 1)


class L2Table:
    """One decoded L2 table; ``dirty`` until written back."""

    __slots__ = ("entries", "dirty")

    def __init__(self, entries: array, dirty: bool = False) -> None:
        self.entries = entries
        self.dirty = dirty


class ClusterMap:
    """The active L1 table and its L2 tables.

    ``metadata`` (cluster indices holding metadata) gets the L1 and L2
    clusters.  Writing needs :attr:`refcounts` to be set.
    """

    def __init__(self, file: HostFile, header: Header, metadata: set[int]) -> None:
        self.file = file
        self.cluster_bits = cb = header.cluster_bits
        self.cluster_size = cs = 1 << cb
        self.l2_bits = cb - 3
        self.l1_offset = header.l1_table_offset
        self.metadata = metadata
        self.refcounts: Refcounts | None = None
        if header.l1_size:
            metadata.update(range(header.l1_table_offset >> cb,
                                  ((header.l1_table_offset + header.l1_size * 8 - 1) >> cb) + 1))
        self.l1 = be_array("Q", file.pread_exact(header.l1_table_offset, header.l1_size * 8,
                                                 "L1 table"))
        self.l1_dirty: set[int] = set()
        l2s: set[int] = set()
        for i, entry in enumerate(self.l1):
            if not entry:
                continue
            off = entry & OFFSET_MASK
            if entry & L1E_RESERVED or off % cs or off == 0:
                raise ImageError(f"L1 entry {i} is invalid ({entry:#x})")
            if off + cs > file.size:
                raise ImageError(f"L2 table {i} at {off:#x} lies beyond the end of the file")
            if (off >> cb) in metadata:
                raise ImageError(f"L2 table {i} at {off:#x} overlaps other metadata")
            if (off >> cb) in l2s and not file.read_only:
                raise ImageError(f"L2 table at {off:#x} is used twice by the L1 table")
            l2s.add(off >> cb)
        metadata |= l2s
        self.l2_cache: TableCache[L2Table] = TableCache(
            L2_CACHE_BYTES // cs, self._load_l2, self._writeback_l2)

    # -- lookups -------------------------------------------------------------

    def _load_l2(self, offset: int) -> L2Table:
        return L2Table(be_array("Q", self.file.pread_exact(offset, self.cluster_size, "L2 table")))

    def entry(self, ci: int) -> int:
        """The L2 entry of guest cluster ``ci`` (0 if it has no L2 table)."""
        off = self.l1[ci >> self.l2_bits] & OFFSET_MASK
        if not off:
            return 0
        return self.l2_cache.get(off).entries[ci & ((1 << self.l2_bits) - 1)]

    def classify(self, entry: int) -> tuple[int, int]:
        """(kind, host offset) of an L2 entry; a standard cluster must be
        aligned and start inside the file."""
        if entry & COMPRESSED:
            return COMPRESSED_KIND, 0
        host = entry & OFFSET_MASK
        if entry & ZERO:
            return (ZERO_ALLOC if host else ZERO_PLAIN), host
        if not host:
            return UNALLOCATED, 0
        if host & (self.cluster_size - 1):
            raise ImageError(f"{self.file.path}: data cluster offset {host:#x} is not aligned")
        if host >= self.file.size:
            raise ImageError(f"{self.file.path}: data cluster at {host:#x} lies beyond the "
                             f"end of the file")
        return NORMAL, host

    def allocated_clusters(self) -> int:
        """Guest clusters with data in this image (not the backing file)."""
        count = 0
        for entry in self.l1:
            off = entry & OFFSET_MASK
            if off:
                count += sum(1 for e in self.l2_cache.get(off).entries
                             if e & COMPRESSED or (e & OFFSET_MASK and not e & ZERO))
        return count

    # -- modification ----------------------------------------------------------

    def owned_l2(self, ci: int) -> int:
        """Offset of the L2 table covering guest cluster ``ci``, allocated or
        copied first so that the active L1 table is its only user."""
        rc = self.refcounts
        assert rc is not None
        cb = self.cluster_bits
        l1i = ci >> self.l2_bits
        entry = self.l1[l1i]
        off = entry & OFFSET_MASK
        if off and entry & COPIED:
            return off
        refs = rc.get(off >> cb) if off else 0
        if off and refs == 1:
            self.l1[l1i] = off | COPIED
            self.l1_dirty.add(l1i)
            return off
        if off and refs == 0:
            raise ImageError(f"{self.file.path}: L2 table at {off:#x} has refcount 0: "
                             f"image is corrupt")
        new_cluster = rc.alloc(1)
        new = new_cluster << cb
        if off:   # shared with a snapshot: copy it, drop our reference once synced
            entries = array("Q", self.l2_cache.get(off).entries)
            rc.free(off >> cb)
        else:
            entries = array("Q", bytes(self.cluster_size))
        self.metadata.add(new_cluster)
        self.l2_cache.put(new, L2Table(entries, dirty=True))
        self.l1[l1i] = new | COPIED
        self.l1_dirty.add(l1i)
        return new

    def set_entry(self, ci: int, value: int, l2_offset: int | None = None) -> None:
        """Set the L2 entry of guest cluster ``ci`` (in the cache)."""
        if l2_offset is None:
            l2_offset = self.owned_l2(ci)
        table = self.l2_cache.get(l2_offset)
        table.entries[ci & ((1 << self.l2_bits) - 1)] = value
        table.dirty = True

    # -- write-back ------------------------------------------------------------

    def _writeback_l2(self, offset: int, table: L2Table) -> None:
        """Write one L2 table; the refcounts of everything it references
        reach stable storage first."""
        if self.refcounts is not None:
            self.refcounts.make_durable()
        self.file.pwrite(offset, be_bytes(table.entries))
        table.dirty = False

    def write_dirty_l2(self) -> None:
        for offset, table in self.l2_cache.dirty():
            self._writeback_l2(offset, table)

    def write_l1(self) -> None:
        """Write the changed L1 entries (their L2 tables must be synced)."""
        if not self.l1_dirty:
            return
        dirty = sorted(self.l1_dirty)
        lo, hi = dirty[0], dirty[-1] + 1
        if hi - lo <= 4 * len(dirty) + 64:
            self.file.pwrite(self.l1_offset + 8 * lo, be_bytes(self.l1[lo:hi]))
        else:
            for i in dirty:
                self.file.pwrite(self.l1_offset + 8 * i, struct.pack(">Q", self.l1[i]))
        # forgotten only once written: a failed write (a full disk) is retried
        self.l1_dirty.difference_update(dirty)
