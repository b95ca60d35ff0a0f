"""Host cluster management: refcount table, refcount blocks, allocation
(qcow2 spec, "Host cluster management").

A two-level structure maps every host cluster to a reference count of
``refcount_bits = 1 << refcount_order`` bits: the refcount table holds the
offsets of refcount blocks, each refcount block one cluster of packed
entries (big-endian for 8 bits and more; sub-byte entries fill a byte from
its least significant bit).

Consistency rules kept here so that a killed process leaves at worst
leaked clusters:

* increments may reach the disk at any time (an early increment is a leak);
* a new refcount block is written and synced before the table points at it;
* a grown refcount table is written and synced before the header switches
  to it, and the old table is released only after that;
* decrements are queued with :meth:`Refcounts.free` and applied by
  :meth:`Refcounts.apply_frees`, which the image calls only once the
  metadata that stopped referencing the clusters is on stable storage.
"""

from __future__ import annotations

import struct
import sys
from array import array

from kemu.backends.block import ImageError
from kemu.backends.qcow2.header import MAX_REFTABLE_BYTES, OFF_REFCOUNT_TABLE, OFFSET_MASK
from kemu.backends.qcow2.io import HostFile, TableCache

_LITTLE = sys.byteorder == "little"
_TYPECODES = {1: "B", 2: "H", 4: "I" if array("I").itemsize == 4 else "L", 8: "Q"}
#: Refcount table entries: bits 0-8 are reserved.
REFT_RESERVED = 0x1FF


def be_array(typecode: str, data: bytes) -> array:
    """A host-order array from big-endian bytes."""
    arr = array(typecode)
    arr.frombytes(data)
    if _LITTLE and arr.itemsize > 1:
        arr.byteswap()
    return arr


def be_bytes(arr: array) -> bytes:
    if _LITTLE and arr.itemsize > 1:
        arr = array(arr.typecode, arr)
        arr.byteswap()
    return arr.tobytes()


class RefcountBlock:
    """One refcount block, decoded (spec: "refcount block")."""

    __slots__ = ("order", "dirty", "_arr", "_raw")

    def __init__(self, order: int, data: bytes) -> None:
        self.order = order
        self.dirty = False
        if order >= 3:
            self._arr: array | None = be_array(_TYPECODES[1 << (order - 3)], data)
            self._raw = bytearray()
        else:
            self._arr = None
            self._raw = bytearray(data)

    def get(self, index: int) -> int:
        if self._arr is not None:
            return self._arr[index]
        bits = 1 << self.order
        bit = index * bits
        return (self._raw[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1)

    def set(self, index: int, value: int) -> None:
        self.dirty = True
        if self._arr is not None:
            self._arr[index] = value
            return
        bits = 1 << self.order
        bit = index * bits
        mask = ((1 << bits) - 1) << (bit & 7)
        self._raw[bit >> 3] = (self._raw[bit >> 3] & ~mask) | (value << (bit & 7))

    def find_free(self, start: int) -> int:
        """Index of the first zero entry at or after ``start``, or -1."""
        if self._arr is not None:
            try:
                return self._arr.index(0, start)
            except ValueError:
                return -1
        n = len(self._raw) * 8 >> self.order
        for i in range(start, n):
            if self.get(i) == 0:
                return i
        return -1

    def to_bytes(self) -> bytes:
        return be_bytes(self._arr) if self._arr is not None else bytes(self._raw)


class Refcounts:
    """Reference counts of the host clusters of one image file.

    ``metadata`` is the image's set of cluster indices holding metadata
    (header, L1, refcount table and blocks, L2 tables); it is shared with
    the image and kept up to date here for refcount structures.
    """

    def __init__(self, file: HostFile, cluster_bits: int, refcount_order: int,
                 table_offset: int, table_clusters: int, metadata: set[int],
                 cache_bytes: int = 1 << 20) -> None:
        self.file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = cs = 1 << cluster_bits
        self.order = refcount_order
        self.block_bits = cluster_bits + 3 - refcount_order   # log2(entries per block)
        self.max_refcount = (1 << (1 << refcount_order)) - 1 if refcount_order < 6 else (1 << 63) - 1
        self.metadata = metadata
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        raw = file.pread_exact(table_offset, table_clusters * cs, "refcount table")
        self.table = be_array("Q", raw)
        seen: set[int] = set()
        for i, entry in enumerate(self.table):
            if not entry:
                continue
            if entry & REFT_RESERVED:
                raise ImageError(f"refcount table entry {i} has reserved bits set ({entry:#x})")
            c = entry >> cluster_bits
            if c in metadata or c in seen:
                raise ImageError(f"refcount block {i} at {entry:#x} overlaps other metadata")
            if entry + cs > file.size:
                raise ImageError(f"refcount block {i} at {entry:#x} lies beyond the end of "
                                 f"the file")
            seen.add(c)
        metadata.update(seen)
        self.cache: TableCache[RefcountBlock] = TableCache(
            cache_bytes // cs, self._load_block, self._write_block)
        self.free_hint = 0
        #: Clusters past every allocation made through this object.
        self.alloc_end = 0
        self._pending: list[tuple[int, int]] = []
        self._last_write = 0       # file.writes after the last refcount write

    # -- blocks -------------------------------------------------------------

    def _load_block(self, offset: int) -> RefcountBlock:
        data = self.file.pread_exact(offset, self.cluster_size, "refcount block")
        return RefcountBlock(self.order, data)

    def _write_block(self, offset: int, block: RefcountBlock) -> None:
        self.file.pwrite(offset, block.to_bytes())
        block.dirty = False
        self._last_write = self.file.writes

    def _block(self, index: int) -> RefcountBlock | None:
        if index >= len(self.table) or not self.table[index]:
            return None
        return self.cache.get(self.table[index])

    def get(self, cluster: int) -> int:
        block = self._block(cluster >> self.block_bits)
        if block is None:
            return 0
        return block.get(cluster & ((1 << self.block_bits) - 1))

    def _adjust(self, cluster: int, delta: int) -> int:
        block = self._block(cluster >> self.block_bits)
        index = cluster & ((1 << self.block_bits) - 1)
        old = block.get(index) if block is not None else 0
        new = old + delta
        if block is None or new < 0 or new > self.max_refcount:
            raise ImageError(f"{self.file.path}: refcount of cluster {cluster} would go from "
                             f"{old} to {new}: image is corrupt")
        block.set(index, new)
        return new

    def incref(self, cluster: int) -> None:
        """One more reference to an already allocated cluster (compressed
        clusters sharing a host cluster)."""
        self._adjust(cluster, +1)

    def update(self, cluster: int, delta: int) -> int:
        """Change a refcount now (internal snapshots share and unshare clusters);
        the new count.  A decrement must come after the metadata that dropped
        the reference is on stable storage."""
        new = self._adjust(cluster, delta)
        if new == 0:
            self.free_hint = min(self.free_hint, cluster)
        return new

    # -- durability -----------------------------------------------------------

    def write_dirty(self) -> None:
        for offset, block in self.cache.dirty():
            self._write_block(offset, block)

    def make_durable(self) -> None:
        """Write dirty blocks and fsync if any refcount write is not yet on
        stable storage; called before metadata that depends on them."""
        self.write_dirty()
        if not self.file.durable(self._last_write):
            self.file.fsync()

    @property
    def has_dirty(self) -> bool:
        return any(True for _ in self.cache.dirty())

    # -- allocation -----------------------------------------------------------

    def _next_free(self, start: int) -> int:
        mask = (1 << self.block_bits) - 1
        while True:
            b = start >> self.block_bits
            block = self._block(b)
            if block is None:
                return start
            i = block.find_free(start & mask)
            if i >= 0:
                return (b << self.block_bits) + i
            start = (b + 1) << self.block_bits

    def _find_run(self, n: int) -> int:
        start = self.free_hint = self._next_free(self.free_hint)
        while True:
            c = self._next_free(start)
            for k in range(c + 1, c + n):
                if self.get(k):
                    start = k + 1
                    break
            else:
                return c

    def alloc(self, n: int = 1) -> int:
        """Allocate ``n`` contiguous free clusters (refcount 1 each) and
        return the index of the first."""
        while True:
            c = self._find_run(n)
            if (c + n) << self.cluster_bits > OFFSET_MASK:
                raise ImageError(f"{self.file.path}: image file would exceed the qcow2 "
                                 f"offset range")
            for k in range(c, c + n):
                if k in self.metadata:
                    raise ImageError(f"{self.file.path}: cluster {k} is metadata but has "
                                     f"refcount 0: image is corrupt")
            if self._ensure_blocks(c, n):
                break
        for k in range(c, c + n):
            self._adjust(k, +1)
        if c == self.free_hint:
            self.free_hint = c + n
        self.alloc_end = max(self.alloc_end, c + n)
        return c

    def unalloc(self, cluster: int) -> None:
        """Undo :meth:`alloc` of one cluster nothing references yet (its write failed)."""
        if self._adjust(cluster, -1) == 0:
            self.free_hint = min(self.free_hint, cluster)

    def _ensure_blocks(self, c: int, n: int) -> bool:
        """True if refcount blocks cover clusters c..c+n-1; otherwise create
        the first missing one (which uses a cluster) and return False."""
        for b in range(c >> self.block_bits, ((c + n - 1) >> self.block_bits) + 1):
            if b >= len(self.table):
                self._grow_table(b + 1)
                return False
            if not self.table[b]:
                self._create_block(b, max(c, b << self.block_bits))
                return False
        return True

    def _create_block(self, b: int, at: int) -> None:
        """A refcount block for block index ``b``, stored at cluster ``at``
        inside its own range so that it describes itself."""
        cs = self.cluster_size
        block = RefcountBlock(self.order, bytes(cs))
        block.set(at & ((1 << self.block_bits) - 1), 1)
        offset = at << self.cluster_bits
        self._write_block(offset, block)
        self.file.fsync()
        self.file.pwrite(self.table_offset + 8 * b, struct.pack(">Q", offset))
        self.table[b] = offset              # only once the host has it all
        self._last_write = self.file.writes
        self.metadata.add(at)
        self.cache.put(offset, block)
        self.alloc_end = max(self.alloc_end, at + 1)

    def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a larger place at the end of the image
        together with any new refcount blocks needed to count it."""
        cs, bb = self.cluster_size, self.block_bits
        old_n = len(self.table)
        # past the file, past every allocation, and past what the table
        # covers (beyond that, no refcount block: every cluster is free)
        end = max(-(-self.file.size // cs), self.alloc_end, old_n << bb)
        while True:
            nb, tc = 0, 0
            while True:
                total = nb + tc
                blocks = [b for b in range(end >> bb, ((end + max(total, 1) - 1) >> bb) + 1)
                          if b >= old_n or not self.table[b]]
                want = max(min_entries, old_n + old_n // 2, (max(blocks) + 1) if blocks else 0)
                new_tc = -(-want * 8 // cs)
                if (len(blocks), new_tc) == (nb, tc):
                    break
                nb, tc = len(blocks), new_tc
            if tc * cs > MAX_REFTABLE_BYTES:
                raise ImageError(f"{self.file.path}: refcount table would exceed "
                                 f"{MAX_REFTABLE_BYTES} bytes")
            busy = [k for k in range(end, end + nb + tc) if self.get(k) or k in self.metadata]
            if not busy:
                break
            end = busy[-1] + 1
        new_blocks = {b: RefcountBlock(self.order, bytes(cs)) for b in blocks}
        block_at = {b: end + i for i, b in enumerate(blocks)}
        table_at = end + nb
        table = array("Q", self.table)
        table.extend([0] * (tc * cs // 8 - old_n))
        for b in blocks:
            table[b] = block_at[b] << self.cluster_bits
        mask = (1 << bb) - 1
        for k in range(end, end + nb + tc):
            block = new_blocks.get(k >> bb)
            if block is not None:
                block.set(k & mask, 1)
            else:
                self._adjust(k, +1)
        for b, block in new_blocks.items():
            self._write_block(table[b], block)
        self.write_dirty()
        self.file.pwrite(table_at << self.cluster_bits, be_bytes(table))
        self.file.fsync()
        self.file.pwrite(OFF_REFCOUNT_TABLE, struct.pack(">QI", table_at << self.cluster_bits, tc))
        self.file.fsync()
        old_first = self.table_offset >> self.cluster_bits
        old_clusters = range(old_first, old_first + self.table_clusters)
        self.table = table
        self.table_offset = table_at << self.cluster_bits
        self.table_clusters = tc
        self.metadata.difference_update(old_clusters)
        self.metadata.update(range(end, end + nb + tc))
        for b, block in new_blocks.items():
            self.cache.put(table[b], block)
        self.alloc_end = max(self.alloc_end, end + nb + tc)
        # the header no longer points at the old table: release it
        for k in old_clusters:
            if self._adjust(k, -1) == 0:
                self.free_hint = min(self.free_hint, k)

    # -- freeing --------------------------------------------------------------

    def free(self, cluster: int, n: int = 1) -> None:
        """Queue dropping one reference from clusters cluster..cluster+n-1."""
        self._pending.append((cluster, n))

    @property
    def frees_pending(self) -> bool:
        return bool(self._pending)

    def apply_frees(self) -> None:
        """Apply the queued decrements; the caller guarantees that nothing
        on disk references the clusters any more.  A refcount that is
        already 0 (a corrupt image) is left alone."""
        pending, self._pending = self._pending, []
        for cluster, n in pending:
            for k in range(cluster, cluster + n):
                if self.get(k) == 0:
                    continue
                if self._adjust(k, -1) == 0:
                    self.free_hint = min(self.free_hint, k)
