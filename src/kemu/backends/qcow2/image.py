"""A qcow2 image as a block backend (qcow2 spec, "Cluster mapping",
"Compressed Clusters Descriptor", "Host cluster management").

Guest offsets map through the L1/L2 tables (:mod:`.mapping`); a guest
cluster is unallocated (read from the backing file, or zeros), a zero
cluster (version 3 bit 0), a standard cluster at a host offset, or a
compressed cluster (:mod:`.compressed`).  Host clusters are reference
counted (:mod:`.refcount`).

Writes keep the refcounts exact (no lazy refcounts, no dirty bit) and
order metadata so that a process killed at any point leaves an image
without corruption, only possibly leaked clusters:

1. new data clusters are allocated (refcount increment, cached) and their
   whole content written at once (copy-on-write of partial clusters from
   the old content or the backing file);
2. L2 tables and refcount blocks are written back on eviction or flush;
   before an L2 table is written, every refcount block is written and
   fsynced (:meth:`Refcounts.make_durable`);
3. on flush, the L1 entries pointing at new L2 tables are written after the
   L2 tables are synced;
4. clusters that lost a reference are released (refcount decrement) only
   after the metadata that dropped them is synced.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from kemu.backends.block import (ImageError, file_identity, inactive_error, inactive_lock,
                                 open_image)
from kemu.backends.qcow2.compressed import CompressedClusters
from kemu.backends.qcow2.header import (
    INCOMPAT_CORRUPT, INCOMPAT_DIRTY, OFF_AUTOCLEAR, OFF_SIZE, OFFSET_MASK, Header,
    header_probe_length, l1_entries_needed, parse_header)
from kemu.backends.qcow2.io import HostFile
from kemu.backends.locking import Permissions
from kemu.backends.qcow2.mapping import (
    COMPRESSED, COMPRESSED_KIND, COPIED, NORMAL, UNALLOCATED, ZERO, ZERO_ALLOC, ZERO_PLAIN,
    ClusterMap, compressed_clusters)
from kemu.backends.qcow2.refcount import Refcounts

#: Bytes of refcount blocks kept in memory.
REFCOUNT_CACHE_BYTES = 1 << 20


def resolve_backing(image: Path, name: str) -> Path:
    """Where the backing file ``name`` of ``image`` is: relative names are
    relative to the directory of the image (as QEMU resolves them)."""
    if "://" in name or name.startswith(("json:", "nbd:")):
        raise ImageError(f"unsupported backing file {name!r}")
    path = Path(name)
    return path if path.is_absolute() else Path(image).parent / path


class Qcow2Image:
    """A qcow2 image file, readable and (unless ``read_only``) writable."""

    format = "qcow2"

    def __init__(self, file: HostFile, header: Header, *, chain=(),
                 open_backing: bool = True, locking: str = "auto",
                 backing_image=None) -> None:
        self.file = file
        self.path = file.path
        self.read_only = file.read_only
        self._lock = threading.RLock()
        self._closed = False
        #: Handed over to a migration: no writes, metadata not trusted (see
        #: :mod:`kemu.backends.block`); :meth:`activate` reads it all again.
        self.inactive = False
        self._active_lock: Permissions | None = file.lock
        self.backing = None
        self._load_metadata(header)
        h = header
        if backing_image is not None:
            # Already open, locked by the caller (-snapshot's overlays).
            self.backing = backing_image
        elif not open_backing and not self.read_only:
            raise ImageError("an image opened without its backing file must be read-only")
        elif h.backing_file is not None and open_backing:
            self.backing = self._open_backing(chain, locking)

    def _load_metadata(self, header: Header) -> None:
        """Everything cached from the image's metadata, (re)built from ``header``: the
        L1 table and the L2 table cache, the refcount table and block cache, the
        metadata cluster set, compressed cluster state."""
        self.header = h = header
        self.size = header.size
        self.cluster_bits = cb = header.cluster_bits
        self.cluster_size = 1 << cb
        self.l2_bits = cb - 3
        self.version = header.version
        #: Cluster indices holding metadata: never written as guest data.
        self.metadata: set[int] = {0}
        self.metadata.update(range(h.refcount_table_offset >> cb,
                                   (h.refcount_table_offset >> cb) + h.refcount_table_clusters))
        self.map = ClusterMap(self.file, header, self.metadata)
        self.refcounts: Refcounts | None = None
        if not self.read_only:
            self.refcounts = Refcounts(self.file, cb, h.refcount_order, h.refcount_table_offset,
                                       h.refcount_table_clusters, self.metadata,
                                       REFCOUNT_CACHE_BYTES)
            self.map.refcounts = self.refcounts
        self.compressed = CompressedClusters(self.file, cb)
        self.compressed.refcounts = self.refcounts

    # -- opening ----------------------------------------------------------------

    @staticmethod
    def _read_header(file: HostFile) -> Header:
        header = parse_header(
            file.pread(0, min(header_probe_length(file.pread(0, 24)), file.size)), file.size)
        if not file.read_only and header.incompatible_features & INCOMPAT_DIRTY:
            raise ImageError("image has the dirty bit set (lazy refcounts); repair "
                             "it with 'qemu-img check -r all' or open it read-only")
        if not file.read_only and header.incompatible_features & INCOMPAT_CORRUPT:
            raise ImageError("image is marked corrupt; it can only be opened read-only")
        return header

    def _clear_autoclear(self) -> None:
        # autoclear features (e.g. persistent bitmaps) are not kept up to date
        # by kemu: clearing the bits marks them stale
        if not self.read_only and self.header.autoclear_features:
            self.file.pwrite(OFF_AUTOCLEAR, struct.pack(">Q", 0))
            self.file.fsync()
            self.header.autoclear_features = 0

    def inactivate(self) -> None:
        """Write every cached table back, sync, and drop the write locks (QEMU's
        bdrv_inactivate): another process may take the image over."""
        with self._lock:
            if self.inactive or self._closed:
                return
            self.flush()
            self.file.relock(inactive_lock(self._active_lock, True), None)
            self.inactive = True

    def activate(self) -> None:
        """Take the locks back, then drop every cached table and read the header,
        L1 table and refcount table again (QEMU's bdrv_activate / qcow2's
        invalidate_cache): another process may have written the image meanwhile.
        On failure the image stays inactive."""
        with self._lock:
            if not self.inactive or self._closed:
                return
            self.file.relock(self._active_lock, inactive_lock(self._active_lock, True))
            try:
                self.file.refresh_size()
                try:
                    header = self._read_header(self.file)
                    self._load_metadata(header)
                except ImageError as e:
                    msg = str(e)
                    raise ImageError(msg if msg.startswith(str(self.path))
                                     else f"{self.path}: {msg}") from None
                self._clear_autoclear()
            except BaseException:
                self.file.relock(inactive_lock(self._active_lock, True), self._active_lock)
                raise
            self.inactive = False

    @classmethod
    def open(cls, path: str | Path, read_only: bool = False, *, chain=(),
             backing: bool = True, lock: Permissions | None = None,
             locking: str = "auto", backing_image=None,
             inactive: bool = False) -> "Qcow2Image":
        """Open the image at ``path`` and its backing chain (read-only).
        ``backing=False`` skips the backing file (reads of unallocated
        clusters then return zeros): for inspecting an image alone.
        ``lock``/``locking``: QEMU's lock bytes to take on the file
        (:mod:`kemu.backends.locking`); the backing chain is locked as
        QEMU locks backing files.  ``backing_image``: an open backend to use
        as the backing file instead of opening the header's (closed with
        this image).  ``inactive``: opened for an incoming migration, without write
        locks, until :meth:`activate`."""
        file = HostFile(path, read_only, inactive_lock(lock, inactive), locking)
        try:
            try:
                header = cls._read_header(file)
                identity = file_identity(path)
                image = cls(file, header, chain=chain + (identity,), open_backing=backing,
                            locking=locking, backing_image=backing_image)
            except ImageError as e:
                msg = str(e)
                raise ImageError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
            if inactive:
                image.inactive, image._active_lock = True, lock
            else:
                image._clear_autoclear()
            return image
        except BaseException:
            file.close()
            raise

    def resize(self, size: int) -> None:
        """Grow the virtual disk to ``size`` bytes (QMP block_resize) within the clusters
        the L1 table already maps: the header's size field, nothing else changes."""
        with self._lock:
            if self.read_only:
                raise ImageError(f"{self.path}: the image is read-only")
            if self.inactive:
                raise inactive_error(self.path)
            if size < self.size:
                raise ImageError(f"{self.path}: kemu does not shrink qcow2 images")
            if self.backing is not None:
                raise ImageError(f"{self.path}: kemu does not resize a qcow2 image with a "
                                 "backing file")
            if self.header.nb_snapshots:
                raise ImageError(f"{self.path}: kemu does not resize a qcow2 image with "
                                 "internal snapshots")
            if l1_entries_needed(size, self.cluster_bits) > self.header.l1_size:
                raise ImageError(f"{self.path}: growing to {size} bytes needs a larger L1 "
                                 "table, which kemu does not allocate yet")
            self.file.pwrite(OFF_SIZE, struct.pack(">Q", size))
            self.file.fsync()
            self.header.size = self.size = size

    def _open_backing(self, chain, locking: str):
        name = self.header.backing_file
        assert name is not None
        path = resolve_backing(self.path, name)
        fmt = self.header.backing_format
        if fmt is not None and fmt not in ("raw", "qcow2"):
            raise ImageError(f"unsupported backing file format {fmt!r}")
        try:
            return open_image(path, fmt, read_only=True, chain=chain, locking=locking,
                              backing=True)
        except ImageError as e:
            raise ImageError(f"could not open backing file: {e}") from None

    # -- helpers ---------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageError(f"{self.path}: access of {length} bytes at {offset} is beyond "
                             f"the end of the image ({self.size} bytes)")

    def _check_writable(self) -> None:
        if self.read_only or self.refcounts is None:
            raise ImageError(f"{self.path}: image is read-only")
        if self._closed:
            raise ImageError(f"{self.path}: image is closed")
        if self.inactive:
            raise inactive_error(self.path)

    # -- reading ----------------------------------------------------------------

    def _runs(self, offset: int, length: int):
        """(guest offset, length, kind, host offset or L2 entry) over the
        range, merging neighbouring clusters of the same kind (standard
        clusters only when contiguous on the host)."""
        cb, cs = self.cluster_bits, self.cluster_size
        pos, end = offset, offset + length
        cur: list[int] | None = None
        while pos < end:
            n = min(cs - (pos & (cs - 1)), end - pos)
            entry = self.map.entry(pos >> cb)
            kind, host = self.map.classify(entry)
            if kind == ZERO_ALLOC:
                kind = ZERO_PLAIN
            if kind == NORMAL:
                host += pos & (cs - 1)
            elif kind == COMPRESSED_KIND:
                host = entry
            if (cur is not None and kind == cur[2] and kind != COMPRESSED_KIND
                    and (kind != NORMAL or cur[3] + cur[1] == host)):
                cur[1] += n
            else:
                if cur is not None:
                    yield cur
                cur = [pos, n, kind, host]
            pos += n
        if cur is not None:
            yield cur

    def _read_backing(self, offset: int, length: int) -> bytes:
        backing = self.backing
        if backing is None or offset >= backing.size:
            return bytes(length)
        n = min(length, backing.size - offset)
        data = backing.read(offset, n)
        return data if n == length else data + bytes(length - n)

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        start = offset & (self.cluster_size - 1)
        with self._lock:
            if start + length <= self.cluster_size:      # one cluster: the common case
                entry = self.map.entry(offset >> self.cluster_bits)
                kind, host = self.map.classify(entry)
                if kind == NORMAL:
                    return self._read_run(offset, length, kind, host + start)
                return self._read_run(offset, length, kind,
                                      entry if kind == COMPRESSED_KIND else host)
            parts = [self._read_run(*run) for run in self._runs(offset, length)]
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def _read_run(self, pos: int, n: int, kind: int, host: int) -> bytes:
        if kind == NORMAL:
            data = self.file.pread(host, n)
            return data if len(data) == n else data + bytes(n - len(data))
        if kind == UNALLOCATED and self.backing is not None:
            return self._read_backing(pos, n)
        if kind == COMPRESSED_KIND:
            start = pos & (self.cluster_size - 1)
            return self.compressed.inflate(host)[start:start + n]
        return bytes(n)

    # -- writing ----------------------------------------------------------------

    def _release(self, entry: int) -> None:
        """Queue releasing the host clusters an L2 entry referenced."""
        rc = self.refcounts
        assert rc is not None
        if entry & COMPRESSED:
            clusters = compressed_clusters(entry, self.cluster_bits)
            rc.free(clusters.start, len(clusters))
        elif entry & OFFSET_MASK:
            rc.free((entry & OFFSET_MASK) >> self.cluster_bits)

    def _old_content(self, ci: int, entry: int, kind: int) -> bytes:
        """The current content of guest cluster ``ci`` (for copy-on-write)."""
        cs = self.cluster_size
        if kind == UNALLOCATED:
            return self._read_backing(ci << self.cluster_bits, cs)
        if kind == COMPRESSED_KIND:
            return self.compressed.inflate(entry)
        if kind == NORMAL:
            data = self.file.pread(entry & OFFSET_MASK, cs)
            return data + bytes(cs - len(data))
        return bytes(cs)

    def _prepare(self, ci: int, start: int, chunk: memoryview
                 ) -> tuple[int, bytes | memoryview, "_Remap | None"]:
        """Make guest cluster ``ci`` writable for ``chunk`` at ``start`` in
        it; returns (host offset, bytes to write there, the L2 change to make
        once they are written, if any).  Nothing points at a new cluster
        before its data is on the host: a failed write (a full disk) leaves
        the guest cluster as it was."""
        rc = self.refcounts
        assert rc is not None
        cb, cs = self.cluster_bits, self.cluster_size
        l2_off = self.map.owned_l2(ci)
        entry = self.map.l2_cache.get(l2_off).entries[ci & ((1 << self.l2_bits) - 1)]
        kind, host = self.map.classify(entry)
        if kind in (NORMAL, ZERO_ALLOC):
            if (host >> cb) in self.metadata:
                raise ImageError(f"{self.path}: data cluster at {host:#x} overlaps metadata: "
                                 f"image is corrupt")
            refs = 1 if entry & COPIED else rc.get(host >> cb)
            if refs == 0:
                raise ImageError(f"{self.path}: data cluster at {host:#x} has refcount 0: "
                                 f"image is corrupt")
            if refs == 1:
                if kind == NORMAL:
                    if not entry & COPIED:
                        self.map.set_entry(ci, entry | COPIED, l2_off)
                    return host + start, chunk, None
                buf = bytearray(cs)          # preallocated zero cluster: now data
                buf[start:start + len(chunk)] = chunk
                return host, buf, _Remap(ci, l2_off, host | COPIED, None, None)
        new_cluster = rc.alloc(1)
        new = new_cluster << cb
        reads_zero = kind in (ZERO_PLAIN, ZERO_ALLOC) or (kind == UNALLOCATED
                                                          and self.backing is None)
        try:
            if len(chunk) == cs:
                host, data = new, chunk
            elif reads_zero and new >= self.file.size:
                # a cluster past the end of the file reads as zeros already:
                # write only the new bytes (the rest stays a hole)
                host, data = new + start, chunk
            else:      # copy-on-write: the old content around the new bytes
                buf = bytearray(self._old_content(ci, entry, kind))
                buf[start:start + len(chunk)] = chunk
                host, data = new, buf
        except BaseException:
            rc.unalloc(new_cluster)
            raise
        release = entry if kind in (NORMAL, ZERO_ALLOC, COMPRESSED_KIND) else None
        return host, data, _Remap(ci, l2_off, new | COPIED, release, new_cluster)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        self._write(offset, view)

    def _write(self, offset: int, view: memoryview) -> None:
        """Write at a guest offset the L1 table maps (also past the virtual
        size: the VM state area of internal snapshots)."""
        cs = self.cluster_size
        start = offset & (cs - 1)
        with self._lock:
            if start + len(view) <= cs:
                # fast path: an owned standard cluster, written in place
                entry = self.map.entry(offset >> self.cluster_bits)
                if entry & (COPIED | COMPRESSED | ZERO) == COPIED and \
                        self.map.l1[offset >> (self.cluster_bits + self.l2_bits)] & COPIED:
                    kind, host = self.map.classify(entry)
                    if kind == NORMAL and (host >> self.cluster_bits) not in self.metadata:
                        self.file.pwrite(host + start, view)
                        return
            batch = _WriteBatch(self.file)
            remaps: list[_Remap] = []
            pos = 0
            try:
                while pos < len(view):
                    g = offset + pos
                    n = min(cs - (g & (cs - 1)), len(view) - pos)
                    host, buf, remap = self._prepare(g >> self.cluster_bits, g & (cs - 1),
                                                     view[pos:pos + n])
                    if remap is not None:
                        remaps.append(remap)
                    batch.add(host, buf)
                    pos += n
                batch.flush()
            except BaseException:
                # the guest gets an error; its clusters still map what they did
                for remap in remaps:
                    if remap.new_cluster is not None:
                        self.refcounts.unalloc(remap.new_cluster)
                raise
            for remap in remaps:
                self.map.set_entry(remap.ci, remap.entry, remap.l2_offset)
                if remap.release is not None:
                    self._release(remap.release)

    def write_compressed(self, offset: int, data: bytes) -> None:
        """Write one whole, still unallocated guest cluster compressed (used
        by ``kemu img convert -c``); a normal write when that saves nothing."""
        self._check_writable()
        cs = self.cluster_size
        if offset % cs or not (len(data) == cs or offset + len(data) == self.size):
            raise ImageError("compressed writes must cover one whole cluster")
        self._check_range(offset, len(data))
        packed = self.compressed.deflate(bytes(data) + bytes(cs - len(data)))
        with self._lock:
            ci = offset >> self.cluster_bits
            if packed is None or self.map.classify(self.map.entry(ci))[0] != UNALLOCATED:
                self.write(offset, data)
                return
            l2_off = self.map.owned_l2(ci)
            self.map.set_entry(ci, self.compressed.store(packed), l2_off)

    def discard(self, offset: int, length: int) -> None:
        """Release the whole clusters in the range (partial clusters are left
        alone): they become unallocated, or zero clusters in version 3
        images with a backing file so that the backing data stays hidden."""
        self._check_writable()
        self._check_range(offset, length)
        with self._lock:
            for ci, _start, _n in self._whole_clusters(offset, length):
                entry = self.map.entry(ci)
                kind, _ = self.map.classify(entry)
                if kind in (UNALLOCATED, ZERO_PLAIN):
                    continue
                self.map.set_entry(ci, ZERO if (self.version >= 3 and self.backing is not None) else 0)
                self._release(entry)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        cs = self.cluster_size
        with self._lock:
            pos, end = offset, offset + length
            while pos < end:
                ci, start = pos >> self.cluster_bits, pos & (cs - 1)
                n = min(cs - start, end - pos)
                entry = self.map.entry(ci)
                kind, _ = self.map.classify(entry)
                reads_zero = kind == ZERO_PLAIN or (kind == UNALLOCATED and self.backing is None)
                whole = start == 0 and (n == cs or pos + n == self.size)
                if reads_zero:
                    pass
                elif whole and self.version >= 3:
                    self.map.set_entry(ci, ZERO)
                    if kind != UNALLOCATED:
                        self._release(entry)
                else:
                    self.write(pos, bytes(n))
                pos += n

    def _whole_clusters(self, offset: int, length: int):
        cs = self.cluster_size
        first = -(-offset // cs)
        end = offset + length
        last = (self.size >> self.cluster_bits) + (1 if self.size % cs else 0) \
            if end == self.size else end >> self.cluster_bits
        for ci in range(first, last):
            yield ci, 0, cs

    # -- flush and close ---------------------------------------------------------

    def flush(self) -> None:
        """Make every completed write durable, metadata in dependency order."""
        if self.read_only or self._closed or self.inactive:
            return
        rc = self.refcounts
        assert rc is not None
        with self._lock:
            rc.make_durable()
            self.map.write_dirty_l2()
            if self.map.l1_dirty:
                self.file.fsync()
                self.map.write_l1()
            if not self.file.durable(self.file.writes):
                self.file.fsync()
            if rc.frees_pending:
                rc.apply_frees()
                self.compressed.reset()
                rc.make_durable()

    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.read_only:
                self.flush()
        finally:
            self._closed = True
            if self.backing is not None:
                self.backing.close()
            self.file.close()

    def __enter__(self) -> "Qcow2Image":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class _Remap:
    """An L2 change a write makes once its data is on the host."""

    ci: int
    l2_offset: int
    entry: int
    #: The old L2 entry whose clusters lose a reference, if any.
    release: int | None
    #: The cluster allocated for the write (given back if the write fails).
    new_cluster: int | None


class _WriteBatch:
    """Collects (host offset, bytes) writes of one request and issues
    neighbouring ones as a single pwrite."""

    def __init__(self, file: HostFile) -> None:
        self.file = file
        self.start = -1
        self.parts: list = []
        self.length = 0

    def add(self, host: int, data) -> None:
        if self.parts and host == self.start + self.length:
            self.parts.append(data)
            self.length += len(data)
            return
        self.flush()
        self.start, self.parts, self.length = host, [data], len(data)

    def flush(self) -> None:
        if self.parts:
            data = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
            self.file.pwrite(self.start, data)
            self.parts, self.length = [], 0


