"""Internal snapshots of an open qcow2 image: create, apply, delete, and the
VM state area (qcow2 spec, "Snapshots"; the way QEMU's qcow2 driver keeps them,
so that qemu-img and QEMU read kemu's snapshots and kemu reads theirs).

A snapshot is a copy of the active L1 table plus a table entry.  Host
clusters are shared, not copied: a refcount counts the paths to a cluster
(each L1 table referencing an L2 table adds one to the L2 table and one to
every cluster that L2 table references), so taking a snapshot adds one along
every path of the active L1 table; the COPIED flag (bit 63) of active
entries is then clear and the next guest write copies the cluster
(:meth:`Qcow2Image._prepare`, :meth:`ClusterMap.owned_l2`).

The VM state is stored like guest data at guest offsets past the disk: from
the first L1 entry that maps no guest cluster (``vm_state_offset``).  It is
written through the active L1 table (grown as needed) before the snapshot
copies that table; once the snapshot holds it, the active table drops those
entries again (as QEMU does: kept there, the next snapshot would copy them).

Ordering for a host that dies half-way (at worst leaked clusters): refcount
increments reach the disk before the tables that use them; the header
switches to a new L1 table or snapshot table only once it is on disk; old
references are dropped only after the metadata that held them is replaced.
"""

from __future__ import annotations

import os
import struct
import time
from array import array
from typing import TYPE_CHECKING, Iterable

from kemu.backends.block import ImageError
from kemu.backends.qcow2.header import MAX_L1_BYTES, OFFSET_MASK, l1_entries_needed
from kemu.backends.qcow2.mapping import (
    COMPRESSED, COMPRESSED_KIND, COPIED, L1E_RESERVED, NORMAL, compressed_clusters)
from kemu.backends.qcow2.refcount import be_array, be_bytes
from kemu.backends.qcow2.snapshots import (
    OFF_NB_SNAPSHOTS, SnapshotEntry, encode_table, find, new_id, read_table)

if TYPE_CHECKING:
    from kemu.backends.qcow2.image import Qcow2Image

#: Byte offset of l1_size (u32) and l1_table_offset (u64) in the header.
OFF_L1 = 36


def vm_state_offset(img: "Qcow2Image", disk_size: int | None = None) -> int:
    """Guest offset where the VM state starts (QEMU's qcow2_vm_state_offset)."""
    size = img.size if disk_size is None else disk_size
    return l1_entries_needed(size, img.cluster_bits) << (img.cluster_bits + img.l2_bits)


def snapshots(img: "Qcow2Image") -> list[SnapshotEntry]:
    with img._lock:
        return read_table(img.file, img.header)[0]


def find_snapshot(img: "Qcow2Image", id_or_name: str) -> int:
    """Index of the snapshot with that id, else that name; -1 if none."""
    return find(snapshots(img), id_or_name)


# -- helpers -------------------------------------------------------------------------------
def _clusters(offset: int, length: int, cb: int) -> range:
    if length <= 0:
        return range(0)
    return range(offset >> cb, ((offset + length - 1) >> cb) + 1)


def _read_l1(img: "Qcow2Image", offset: int, size: int) -> array:
    """A snapshot's L1 table, every entry checked (offsets only, flags dropped)."""
    if size * 8 > MAX_L1_BYTES:
        raise ImageError(f"{img.path}: snapshot L1 table too large ({size} entries)")
    table = be_array("Q", img.file.pread_exact(offset, size * 8, "snapshot L1 table"))
    for i, entry in enumerate(table):
        off = entry & OFFSET_MASK
        if entry & L1E_RESERVED or off % img.cluster_size or \
                (off and off + img.cluster_size > img.file.size):
            raise ImageError(f"{img.path}: snapshot L1 entry {i} is invalid ({entry:#x})")
        table[i] = off
    return table


def _update_paths(img: "Qcow2Image", l1: Iterable[int], delta: int) -> None:
    """Add ``delta`` to every cluster reachable from the L1 entries ``l1``
    (L2 tables and what they reference); L2 tables freed are forgotten."""
    rc, m, cb = img.refcounts, img.map, img.cluster_bits
    done: list[int] = []
    try:
        for entry in l1:
            off = entry & OFFSET_MASK
            if not off:
                continue
            entries = m.l2_cache.get(off).entries
            rc.update(off >> cb, delta)
            done.append(off >> cb)
            for e in entries:
                if e & COMPRESSED:
                    for c in compressed_clusters(e, cb):
                        rc.update(c, delta)
                        done.append(c)
                elif e & OFFSET_MASK:
                    c = (e & OFFSET_MASK) >> cb
                    rc.update(c, delta)
                    done.append(c)
    except BaseException:
        # a refcount out of range (a full count, a damaged image): undo, nothing changed
        for c in reversed(done):
            rc.update(c, -delta)
        raise
    if delta < 0:
        for entry in l1:
            off = entry & OFFSET_MASK
            if off and rc.get(off >> cb) == 0:
                m.l2_cache.drop(off)


def _fix_copied(img: "Qcow2Image") -> None:
    """Set the COPIED flag of active L1 and L2 entries exactly where the
    refcount is 1 (QEMU: qcow2_update_snapshot_refcount with addend 0)."""
    rc, m, cb = img.refcounts, img.map, img.cluster_bits
    for i, entry in enumerate(m.l1):
        off = entry & OFFSET_MASK
        if not off:
            continue
        want = off | (COPIED if rc.get(off >> cb) == 1 else 0)
        if want != entry:
            m.l1[i] = want
            m.l1_dirty.add(i)
        table = m.l2_cache.get(off)
        entries = table.entries
        for j, e in enumerate(entries):
            host = e & OFFSET_MASK
            if e & COMPRESSED or not host:
                continue
            w = (e & ~COPIED) | (COPIED if rc.get(host >> cb) == 1 else 0)
            if w != e:
                entries[j] = w
                table.dirty = True


def _rebuild_metadata(img: "Qcow2Image", table: list[SnapshotEntry], table_size: int) -> None:
    """The image's set of metadata clusters after the tables moved."""
    cb, h, rc, m = img.cluster_bits, img.header, img.refcounts, img.map
    md = img.metadata
    md.clear()
    md.add(0)
    md.update(_clusters(rc.table_offset, rc.table_clusters << cb, cb))
    md.update(e >> cb for e in rc.table if e)
    md.update(_clusters(m.l1_offset, len(m.l1) * 8, cb))
    md.update((e & OFFSET_MASK) >> cb for e in m.l1 if e & OFFSET_MASK)
    for sn in table:
        md.update(_clusters(sn.l1_table_offset, sn.l1_size * 8, cb))
    if h.nb_snapshots:
        md.update(_clusters(h.snapshots_offset, table_size, cb))


def _write_table(img: "Qcow2Image", entries: list[SnapshotEntry], old_size: int) -> int:
    """The snapshot table rewritten at a new place, the header switched to it,
    the old one freed; returns the new table's size."""
    rc, f, h, cb = img.refcounts, img.file, img.header, img.cluster_bits
    data = encode_table(entries)
    new_off = 0
    if entries:
        new_off = rc.alloc(-(-len(data) >> cb)) << cb
        rc.make_durable()
        f.pwrite(new_off, data)
    f.fsync()
    f.pwrite(OFF_NB_SNAPSHOTS, struct.pack(">IQ", len(entries), new_off))
    f.fsync()
    old_off, old_nb = h.snapshots_offset, h.nb_snapshots
    h.nb_snapshots, h.snapshots_offset = len(entries), new_off
    if old_nb:
        for k in _clusters(old_off, old_size, cb):
            rc.update(k, -1)
    return len(data)


def _grow_l1(img: "Qcow2Image", entries: int) -> None:
    """Move the active L1 table to a new place with ``entries`` entries."""
    m, rc, f, h, cb = img.map, img.refcounts, img.file, img.header, img.cluster_bits
    if entries <= len(m.l1):
        return
    if entries * 8 > MAX_L1_BYTES:
        raise ImageError(f"{img.path}: the L1 table would exceed {MAX_L1_BYTES} bytes")
    img.flush()
    new = array("Q", m.l1)
    new.extend([0] * (entries - len(m.l1)))
    first = rc.alloc(-(-(entries * 8) >> cb))
    rc.make_durable()
    f.pwrite(first << cb, be_bytes(new))
    f.fsync()
    f.pwrite(OFF_L1, struct.pack(">IQ", entries, first << cb))
    f.fsync()
    old = _clusters(m.l1_offset, len(m.l1) * 8, cb)
    m.l1, m.l1_offset = new, first << cb
    h.l1_size, h.l1_table_offset = entries, first << cb
    img.metadata.difference_update(old)
    img.metadata.update(_clusters(m.l1_offset, entries * 8, cb))
    for k in old:
        rc.update(k, -1)
    rc.make_durable()


def _begin(img: "Qcow2Image") -> tuple[list[SnapshotEntry], int]:
    img._check_writable()
    img.flush()
    return read_table(img.file, img.header)


def _begin_on(img: "Qcow2Image", id_or_name: str) -> tuple[list[SnapshotEntry], int, int]:
    """:func:`_begin`, and the index of the snapshot named (by id, else by name)."""
    entries, size = _begin(img)
    i = find(entries, id_or_name)
    if i < 0:
        raise ImageError(f"snapshot '{id_or_name}' not found in {img.path}")
    return entries, size, i


def _finish(img: "Qcow2Image") -> None:
    _fix_copied(img)
    img.flush()
    entries, size = read_table(img.file, img.header)
    _rebuild_metadata(img, entries, size)
    img.compressed.reset()


# -- the operations -----------------------------------------------------------------------------
def create(img: "Qcow2Image", name: str, *, vm_state_size: int = 0, vm_clock_nsec: int = 0,
           ident: str | None = None, date: float | None = None,
           icount: int | None = None) -> SnapshotEntry:
    """Take a snapshot of the active disk state (and of a VM state already written
    with :func:`write_vmstate`, ``vm_state_size`` bytes of it); QEMU's
    qcow2_snapshot_create.  ``icount``: None is stored as -1 (QEMU's savevm
    without record/replay); qemu-img's own snapshots have 0."""
    with img._lock:
        if img.refcounts is not None and img.refcounts.max_refcount < 2:
            raise ImageError("-22 (Invalid argument): an image with refcount_bits=1 cannot "
                             "share clusters with a snapshot")
        entries, size = _begin(img)
        ident = ident or new_id(entries)
        if any(e.id == ident for e in entries):
            raise ImageError(f"{img.path}: a snapshot with id {ident} already exists")
        m, rc, cb = img.map, img.refcounts, img.cluster_bits
        n = len(m.l1)
        copy = array("Q", (e & OFFSET_MASK for e in m.l1))
        sn_off = rc.alloc(-(-(n * 8) >> cb)) << cb if n else 0
        _update_paths(img, m.l1, +1)
        rc.make_durable()
        if n:
            img.file.pwrite(sn_off, be_bytes(copy))
        _fix_copied(img)
        img.flush()
        now = time.time() if date is None else date
        entry = SnapshotEntry(ident, name, sn_off, n, int(now), int(now % 1 * 1e9),
                              vm_clock_nsec, vm_state_size, img.size, icount)
        _write_table(img, entries + [entry], size)
        _finish(img)
        if vm_state_size:
            clear_vmstate(img)
        return entry


def clear_vmstate(img: "Qcow2Image") -> None:
    """Drop the VM state area from the active L1 table (a snapshot keeps its copy)."""
    with img._lock:
        img._check_writable()
        img.flush()
        m = img.map
        first = l1_entries_needed(img.size, img.cluster_bits)
        dropped = [m.l1[i] for i in range(first, len(m.l1)) if m.l1[i] & OFFSET_MASK]
        if not dropped:
            return
        for i in range(first, len(m.l1)):
            if m.l1[i]:
                m.l1[i] = 0
                m.l1_dirty.add(i)
        m.write_l1()
        img.file.fsync()
        _update_paths(img, dropped, -1)
        _finish(img)


def write_vmstate(img: "Qcow2Image", pos: int, data) -> None:
    """Write VM state bytes at ``pos`` in the active table's VM state area."""
    view = memoryview(data).cast("B")
    if not len(view):
        return
    with img._lock:
        img._check_writable()
        offset = vm_state_offset(img) + pos
        need = ((offset + len(view) - 1) >> (img.cluster_bits + img.l2_bits)) + 1
        _grow_l1(img, need)
        img._write(offset, view)


def apply(img: "Qcow2Image", id_or_name: str) -> SnapshotEntry:
    """Make the snapshot's disk state the active one (QEMU's qcow2_snapshot_goto)."""
    with img._lock:
        entries, _size, i = _begin_on(img, id_or_name)
        sn = entries[i]
        if sn.disk_size is not None and sn.disk_size != img.size:
            raise ImageError(f"{img.path}: snapshot '{id_or_name}' was taken at a disk size "
                             f"of {sn.disk_size} bytes, the disk has {img.size}; kemu does "
                             "not apply snapshots of another size")
        table = _read_l1(img, sn.l1_table_offset, sn.l1_size)
        _grow_l1(img, sn.l1_size)
        m, rc = img.map, img.refcounts
        table.extend([0] * (len(m.l1) - len(table)))
        _update_paths(img, table, +1)
        rc.make_durable()
        old = m.l1
        img.file.pwrite(m.l1_offset, be_bytes(table))
        img.file.fsync()
        m.l1 = table
        m.l1_dirty.clear()
        _update_paths(img, old, -1)
        _finish(img)
        return sn


def delete(img: "Qcow2Image", id_or_name: str) -> SnapshotEntry:
    """Remove a snapshot and release what only it referenced (qcow2_snapshot_delete)."""
    with img._lock:
        entries, size, i = _begin_on(img, id_or_name)
        sn = entries.pop(i)
        table = _read_l1(img, sn.l1_table_offset, sn.l1_size)
        _write_table(img, entries, size)
        _update_paths(img, table, -1)
        for k in _clusters(sn.l1_table_offset, sn.l1_size * 8, img.cluster_bits):
            img.refcounts.update(k, -1)
        _finish(img)
        return sn


class VmStateReader:
    """Reads a snapshot's VM state area through the snapshot's own L1 table
    (before anything is applied: a state is checked whole before it is used)."""

    def __init__(self, img: "Qcow2Image", sn: SnapshotEntry) -> None:
        self.img = img
        self.size = sn.vm_state_size
        self.base = vm_state_offset(img, sn.disk_size)
        self.l1 = _read_l1(img, sn.l1_table_offset, sn.l1_size)
        self._l2: dict[int, array] = {}

    def _entry(self, ci: int) -> int:
        img = self.img
        i = ci >> img.l2_bits
        off = self.l1[i] if i < len(self.l1) else 0
        if not off:
            return 0
        table = self._l2.get(off)
        if table is None:
            if len(self._l2) > 64:
                self._l2.clear()
            table = be_array("Q", img.file.pread_exact(off, img.cluster_size, "L2 table"))
            self._l2[off] = table
        return table[ci & ((1 << img.l2_bits) - 1)]

    def read(self, pos: int, length: int) -> bytes:
        """``length`` bytes at ``pos`` in the VM state (zeros where nothing was written)."""
        out = bytearray(length)
        self.read_into(pos, memoryview(out))
        return bytes(out)

    def read_into(self, pos: int, out: memoryview) -> None:
        """Fill ``out`` (a writable buffer: guest RAM) from ``pos`` in the VM state."""
        length = len(out)
        if pos < 0 or pos + length > self.size:
            raise ImageError(f"{self.img.path}: VM state read past its end "
                             f"({pos}+{length} > {self.size})")
        img = self.img
        cs, cb = img.cluster_size, img.cluster_bits
        offset, end = self.base + pos, self.base + pos + length
        run = None                         # [host, out position, length]: one pread

        def flush(run) -> None:
            if run is not None:
                view = out[run[1]:run[1] + run[2]]
                got = os.preadv(img.file.fd, [view], run[0])
                if got < run[2]:
                    view[got:] = bytes(run[2] - got)
        with img._lock:
            while offset < end:
                n = min(cs - (offset & (cs - 1)), end - offset)
                at = offset - self.base - pos
                entry = self._entry(offset >> cb)
                kind, host = img.map.classify(entry)
                if kind == NORMAL:
                    host += offset & (cs - 1)
                    if run is not None and run[0] + run[2] == host:
                        run[2] += n
                        offset += n
                        continue
                    flush(run)
                    run = [host, at, n]
                else:
                    flush(run)
                    run = None
                    if kind == COMPRESSED_KIND:
                        start = offset & (cs - 1)
                        out[at:at + n] = img.compressed.inflate(entry)[start:start + n]
                    else:
                        out[at:at + n] = bytes(n)
                offset += n
            flush(run)
