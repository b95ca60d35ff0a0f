"""Guest RAM: anonymous mmap regions at guest-physical addresses.

This module knows nothing of devices or CPUs.  Every access is checked
against the regions, so a guest-controlled address can never reach host
memory outside guest RAM: a bad address raises :class:`MemoryAccessError`,
which device models turn into a device error for the guest.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Iterator

from kemu.errors import ConfigError, HostResourceError, MemoryAccessError

PAGE_SIZE = 4096
#: Zeros compared against in place (memcmp) by :meth:`GuestMemory.ram_is_zero`.
_ZERO_LEN = 1 << 20
_ZERO = ctypes.create_string_buffer(_ZERO_LEN)
_libc = ctypes.CDLL(None, use_errno=True)
_memcmp = _libc.memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
#: /proc/self/pagemap, opened on first use, and the process that opened it (after a
#: fork the descriptor still reads the parent's page table); -1: not readable here.
_pagemap: tuple[int, int] | None = None
#: Top bytes of pagemap entries (bit 63 present, 62 swapped, 61 a file's or shared page):
#: a page neither in memory nor swapped (anonymous memory never touched)...
_UNTOUCHED = bytes(b for b in range(256) if not b & 0xC0)
#: ...or, in a private file mapping, still the file's page (not copied on a write).
_FILE_PAGES = bytes(b for b in range(256) if not b & 0x40 and (not b & 0x80 or b & 0x20))


def _pages_only(address: int, size: int, kinds: bytes) -> bool:
    """Whether every page of this process's ``[address, address + size)`` is of
    ``kinds`` (top bytes of /proc/self/pagemap entries); False when unknown."""
    global _pagemap
    if _pagemap is None or _pagemap[0] != os.getpid():
        try:
            _pagemap = (os.getpid(), os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            _pagemap = (os.getpid(), -1)
    fd = _pagemap[1]
    if fd < 0:
        return False
    first, last = address // PAGE_SIZE, (address + size - 1) // PAGE_SIZE
    try:
        entries = os.pread(fd, (last - first + 1) * 8, first * 8)
    except OSError:
        return False
    return len(entries) == (last - first + 1) * 8 and \
        not entries[7::8].translate(None, kinds)


def _file_hole(fd: int, offset: int, size: int) -> bool:
    """Whether ``[offset, offset + size)`` of file ``fd`` is a hole (SEEK_DATA)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + size
    except OSError as e:
        return e.errno == errno.ENXIO          # no data from offset on


@dataclass
class RamRegion:
    """One contiguous block of guest RAM: an anonymous mapping, or a host file's
    pages (QEMU's memory-backend-file: ``path``, from ``offset``); ``shared``
    (share=on) makes the guest's writes visible to other processes mapping
    the same memory (MAP_SHARED), else they stay private to kemu.  ``backing``
    (an open fd of at least ``offset + size`` bytes, opened read-only is
    enough) is a snapshot's memory file mapped private from ``offset``: its
    pages are shared until the guest writes one, which then gets a private
    copy (restored and forked machines)."""

    base: int
    size: int
    name: str = "ram"
    path: str | None = None
    offset: int = 0
    shared: bool = False
    backing: int | None = None
    _map: mmap.mmap = field(init=False, repr=False)
    #: ``backing``'s file, kept to find its holes (:meth:`known_zero`)
    _file: int | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % PAGE_SIZE or self.base % PAGE_SIZE:
            raise ConfigError(f"RAM region {self.name}: base and size must be page aligned")
        share = mmap.MAP_SHARED if self.shared else mmap.MAP_PRIVATE
        if self.path is not None:
            self._map = self._map_file(share)
            return
        try:
            if self.backing is not None:
                self._map = mmap.mmap(self.backing, self.size, flags=mmap.MAP_PRIVATE,
                                      prot=mmap.PROT_READ | mmap.PROT_WRITE,
                                      offset=self.offset)
                self._file = os.dup(self.backing)
                return
            self._map = mmap.mmap(-1, self.size, flags=share | mmap.MAP_ANONYMOUS)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                # As QEMU does for guest RAM: transparent huge pages where the host
                # offers them (THP "madvise" mode, the common default): a fault maps
                # 2 MiB, and KVM can map the guest's memory with large pages.
                self._map.madvise(mmap.MADV_HUGEPAGE)
        except OSError as e:
            # As QEMU: "cannot set up guest memory 'mach-virt.ram': Cannot allocate memory"
            # (pages are reserved as the host's overcommit policy says; QEMU does the same).
            raise HostResourceError(f"cannot set up guest memory '{self.name}' "
                                    f"({self.size >> 20} MiB): {e.strerror or e}") from None

    def _map_file(self, share: int) -> mmap.mmap:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise HostResourceError(f"cannot set up guest memory '{self.name}': "
                                    f"{self.path}: {e.strerror or e}") from None
        try:
            if os.fstat(fd).st_size < self.offset + self.size:
                os.ftruncate(fd, self.offset + self.size)
            return mmap.mmap(fd, self.size, flags=share, offset=self.offset)
        except OSError as e:
            raise HostResourceError(f"cannot set up guest memory '{self.name}': "
                                    f"{self.path}: {e.strerror or e}") from None
        finally:
            os.close(fd)

    @property
    def anonymous(self) -> bool:
        """Private anonymous memory: a page never touched is zeros (no file behind it)."""
        return self.path is None and self.backing is None and not self.shared

    def known_zero(self, offset: int, size: int) -> bool:
        """Whether ``[offset, offset + size)`` of the region is zeros by what the host's
        page table says, nothing read (reading would map a page for each one):
        anonymous pages never touched; or, mapped from a snapshot's memory file,
        pages not written since, where the file has a hole.  False: not known."""
        if self.anonymous:
            return _pages_only(self.host_address + offset, size, _UNTOUCHED)
        if self._file is not None:
            return (_file_hole(self._file, self.offset + offset, size)
                    and _pages_only(self.host_address + offset, size, _FILE_PAGES))
        return False

    @property
    def end(self) -> int:
        return self.base + self.size

    @property
    def host_address(self) -> int:
        """Host virtual address of the first byte (for KVM slots and Unicorn)."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    @property
    def buffer(self) -> mmap.mmap:
        return self._map

    def close(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None
        try:
            self._map.close()
        except BufferError:
            # Still exported to an accelerator; the mapping goes with the process.
            pass


class GuestMemory:
    """The guest-physical address space's RAM, as a list of regions.

    Saved and moved RAM (snapshots, savevm, migration) is addressed by *RAM
    offset*: the regions laid end to end in guest-physical order (QEMU's
    ram_addr space), so one region's RAM offset is its own offset and a
    machine split around a hole is one flat range all the same.  The
    ``ram_*`` methods take RAM offsets; every one is checked.
    """

    def __init__(self, regions: list[RamRegion] | None = None) -> None:
        self._regions: list[RamRegion] = []
        self._ram_starts: list[int] = []
        #: While tracked (:meth:`track_writes`): the guest-physical page numbers the
        #: VMM wrote through :meth:`write` (device DMA), which an accelerator's dirty
        #: log does not see.
        self.written: set[int] | None = None
        for region in regions or []:
            self.add(region)

    def add(self, region: RamRegion) -> RamRegion:
        for other in self._regions:
            if region.base < other.end and other.base < region.end:
                raise ConfigError(f"RAM region {region.name} overlaps {other.name}")
        self._regions.append(region)
        self._regions.sort(key=lambda r: r.base)
        self._ram_starts = []
        offset = 0
        for r in self._regions:
            self._ram_starts.append(offset)
            offset += r.size
        return region

    @property
    def regions(self) -> tuple[RamRegion, ...]:
        return tuple(self._regions)

    @property
    def size(self) -> int:
        return sum(r.size for r in self._regions)

    # -- RAM offsets (the regions end to end) -------------------------------------------------
    def ram_spans(self) -> list[tuple[int, RamRegion]]:
        """(RAM offset, region) of each region, in guest-physical order."""
        return list(zip(self._ram_starts, self._regions))

    def ram_layout(self) -> list[list[int]]:
        """``[[base, size], ...]``: the regions as a saved state's header describes them."""
        return [[r.base, r.size] for r in self._regions]

    def ram_to_gpa(self, offset: int) -> int:
        """The guest-physical address of RAM offset ``offset``."""
        i = bisect.bisect_right(self._ram_starts, offset) - 1
        if i < 0 or offset >= self._ram_starts[i] + self._regions[i].size:
            raise MemoryAccessError(f"RAM offset {offset:#x} is outside guest RAM")
        return self._regions[i].base + offset - self._ram_starts[i]

    def gpa_to_ram(self, addr: int) -> int:
        """The RAM offset of guest-physical address ``addr``."""
        for start, region in zip(self._ram_starts, self._regions):
            if region.base <= addr < region.end:
                return start + addr - region.base
        raise MemoryAccessError(f"guest address {addr:#x} is outside guest RAM")

    def ram_pieces(self, offset: int, size: int) -> Iterator[tuple[int, RamRegion, int, int]]:
        """``(position in the range, region, offset in the region, length)`` of each
        piece of RAM offsets ``[offset, offset + size)`` (one per region it spans)."""
        if offset < 0 or size < 0 or offset + size > self.size:
            raise MemoryAccessError(f"RAM range {offset:#x}+{size:#x} is outside guest RAM")
        i = max(0, bisect.bisect_right(self._ram_starts, offset) - 1)
        done = 0
        while done < size:
            start, region = self._ram_starts[i], self._regions[i]
            off = offset + done - start
            n = min(size - done, region.size - off)
            yield done, region, off, n
            done += n
            i += 1

    def ram_views(self, offset: int, size: int) -> Iterator[tuple[int, memoryview]]:
        """``(position in the range, writable view)`` over RAM offsets ``[offset, offset + size)``."""
        for pos, region, off, n in self.ram_pieces(offset, size):
            yield pos, memoryview(region.buffer)[off:off + n]

    def ram_read(self, offset: int, size: int) -> bytes:
        pieces = [r.buffer[off:off + n] for _, r, off, n in self.ram_pieces(offset, size)]
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def ram_write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write at a RAM offset (restores and migration: not recorded in :attr:`written`)."""
        data = memoryview(data).cast("B")
        for pos, region, off, n in self.ram_pieces(offset, len(data)):
            region.buffer[off:off + n] = data[pos:pos + n]

    def ram_is_zero(self, offset: int, size: int) -> bool:
        """Whether RAM offsets ``[offset, offset + size)`` are all zeros: known so by the
        page table (:meth:`RamRegion.known_zero`), else compared in place (memcmp,
        no copy)."""
        for _, region, off, n in self.ram_pieces(offset, size):
            if region.known_zero(off, n):
                continue
            address = region.host_address + off
            for at in range(0, n, _ZERO_LEN):
                if _memcmp(address + at, _ZERO, min(_ZERO_LEN, n - at)):
                    return False
        return True

    def _find(self, addr: int, size: int) -> tuple[RamRegion, int]:
        if size < 0:
            raise MemoryAccessError(f"negative access size {size}")
        for region in self._regions:
            if region.base <= addr and addr + size <= region.end:
                return region, addr - region.base
        raise MemoryAccessError(
            f"guest access of {size} bytes at {addr:#x} is outside guest RAM")

    def contains(self, addr: int, size: int = 1) -> bool:
        try:
            self._find(addr, size)
        except MemoryAccessError:
            return False
        return True

    def view(self, addr: int, size: int) -> memoryview:
        """A writable view of ``size`` bytes at ``addr`` (checked, no copy)."""
        region, off = self._find(addr, size)
        return memoryview(region.buffer)[off:off + size]

    def read(self, addr: int, size: int) -> bytes:
        region, off = self._find(addr, size)
        return region.buffer[off:off + size]

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        region, off = self._find(addr, len(data))
        region.buffer[off:off + len(data)] = data
        written = self.written
        if written is not None and data:
            written.update(range(addr // PAGE_SIZE, (addr + len(data) - 1) // PAGE_SIZE + 1))

    def track_writes(self, enabled: bool) -> None:
        """Start (or stop) recording the pages :meth:`write` touches in :attr:`written`."""
        self.written = set() if enabled else None

    def take_written(self) -> set[int]:
        """The pages written since the last call (call it with device activity held)."""
        written = self.written
        if written is None:
            return set()
        self.written = set()
        return written

    def read_int(self, addr: int, size: int) -> int:
        """Little-endian unsigned integer of ``size`` bytes."""
        return int.from_bytes(self.read(addr, size), "little")

    def write_int(self, addr: int, size: int, value: int) -> None:
        self.write(addr, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def read_obj(self, addr: int, fmt: struct.Struct) -> tuple:
        return fmt.unpack(self.read(addr, fmt.size))

    def write_obj(self, addr: int, fmt: struct.Struct, *values: object) -> None:
        self.write(addr, fmt.pack(*values))

    def close(self) -> None:
        for region in self._regions:
            region.close()
