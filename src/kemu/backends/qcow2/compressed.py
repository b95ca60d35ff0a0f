"""Compressed clusters (qcow2 spec, "Compressed Clusters Descriptor"):
raw deflate streams (no zlib header) packed back to back at byte
granularity; one host cluster may hold parts of several compressed
clusters and then has one reference per compressed cluster touching it.
"""

from __future__ import annotations

import zlib

from kemu.backends.block import ImageError
from kemu.backends.qcow2.io import HostFile
from kemu.backends.qcow2.mapping import COMPRESSED, compressed_extent
from kemu.backends.qcow2.refcount import Refcounts


class CompressedClusters:
    """Inflating (with a one-cluster cache) and storing compressed clusters."""

    def __init__(self, file: HostFile, cluster_bits: int) -> None:
        self.file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.refcounts: Refcounts | None = None
        self._cache: tuple[int, bytes] | None = None
        self._free = 0     # next free byte in the host cluster being filled, or 0

    def inflate(self, entry: int) -> bytes:
        """The guest cluster a compressed L2 entry describes.  Output is
        bounded by the cluster size; it must fill exactly one cluster."""
        if self._cache is not None and self._cache[0] == entry:
            return self._cache[1]
        offset, length = compressed_extent(entry, self.cluster_bits)
        where = f"{self.file.path}: compressed cluster at {offset:#x}"
        if offset >= self.file.size:
            raise ImageError(f"{where} lies beyond the end of the file")
        raw = self.file.pread(offset, min(length, self.file.size - offset))
        try:
            out = zlib.decompressobj(-15).decompress(raw, self.cluster_size)
        except zlib.error as e:
            raise ImageError(f"{where} is corrupt: {e}") from None
        if len(out) != self.cluster_size:
            raise ImageError(f"{where} does not inflate to a whole cluster")
        self._cache = (entry, out)
        return out

    def deflate(self, data: bytes) -> bytes | None:
        """``data`` (one cluster) compressed, or None if that saves nothing."""
        comp = zlib.compressobj(6, zlib.DEFLATED, -12)
        packed = comp.compress(data) + comp.flush()
        return packed if len(packed) < self.cluster_size else None

    def store(self, packed: bytes) -> int:
        """Write compressed bytes into the image; returns the L2 entry."""
        host = self._alloc_bytes(len(packed))
        self.file.pwrite(host, packed)
        x = 62 - (self.cluster_bits - 8)
        sectors = ((host + len(packed) - 1) >> 9) - (host >> 9)
        return COMPRESSED | (sectors << x) | host

    def _alloc_bytes(self, n: int) -> int:
        rc = self.refcounts
        assert rc is not None
        cb = self.cluster_bits
        free = self._free
        if free and (free >> cb) == ((free + n - 1) >> cb):
            rc.incref(free >> cb)
            start = free
        else:
            start = rc.alloc(1) << cb
        end = start + n
        self._free = 0 if end % self.cluster_size == 0 else end
        return start

    def reset(self) -> None:
        """Forget the partly filled host cluster (its refcount may drop to
        zero once queued frees are applied)."""
        self._free = 0
        self._cache = None
