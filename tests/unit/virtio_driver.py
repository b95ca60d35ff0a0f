"""A guest-side virtio-mmio driver for unit tests (in the manner of QEMU's libqos).

It plays the guest: allocates queues in a :class:`GuestMemory`, walks the
initialization sequence of VIRTIO 1.2 section 3.1.1 through the MMIO
registers (4.2.3), builds descriptor chains (direct or indirect), kicks
queues and reads the used ring.  Raw helpers (:meth:`DriverQueue.write_desc`,
:meth:`DriverQueue.publish`, :meth:`DriverQueue.set_avail_idx`) let tests
write malformed rings.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kemu.devices.virtio import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
)
from kemu.devices.virtio import mmio as r
from kemu.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from kemu.errors import MemoryAccessError
from kemu.memory import GuestMemory, RamRegion

RAM_BASE = 0x4000_0000
DESC = struct.Struct("<QIHH")


class GuardedMemory(GuestMemory):
    """Guest RAM that records every access attempted outside it.

    Device code is expected to validate guest addresses before touching
    memory, so in tests :attr:`violations` must stay empty: nothing reaches
    the (already refusing) bounds check with a bad address.
    """

    def __init__(self, regions: list[RamRegion] | None = None) -> None:
        self.violations: list[tuple[int, int]] = []
        super().__init__(regions)

    def _find(self, addr: int, size: int):
        try:
            return super()._find(addr, size)
        except MemoryAccessError:
            self.violations.append((addr, size))
            raise

    def contains(self, addr: int, size: int = 1) -> bool:
        return size >= 0 and any(reg.base <= addr and addr + size <= reg.end
                                 for reg in self.regions)


def make_memory(size: int = 1 << 20, base: int = RAM_BASE) -> GuardedMemory:
    return GuardedMemory([RamRegion(base, size)])


class Allocator:
    """A bump allocator over guest RAM."""

    def __init__(self, memory: GuestMemory, start: int | None = None) -> None:
        region = memory.regions[0]
        self.memory = memory
        self.next = region.base if start is None else start
        self.end = region.end

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise MemoryError("test guest RAM exhausted")
        self.next = addr + size
        self.memory.write(addr, bytes(size))
        return addr


@dataclass
class Buf:
    """One buffer of a chain, as the driver sees it."""

    addr: int
    length: int
    writable: bool = False


@dataclass
class DriverQueue:
    """The driver side of one split virtqueue."""

    driver: VirtioMmioDriver  # or any driver with kick(), alloc and memory
    index: int
    size: int
    desc: int
    avail: int
    used: int
    avail_idx: int = 0
    last_used: int = 0
    free: list[int] = field(default_factory=list)

    @property
    def memory(self) -> GuestMemory:
        return self.driver.memory

    # raw ring access
    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int,
                   table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.memory.write(base + 16 * i, DESC.pack(addr & (2**64 - 1), length & 0xFFFFFFFF,
                                                   flags & 0xFFFF, nxt & 0xFFFF))

    def publish(self, head: int) -> None:
        """Put ``head`` in the available ring and bump its index."""
        self.memory.write_int(self.avail + 4 + 2 * (self.avail_idx % self.size), 2, head)
        self.set_avail_idx(self.avail_idx + 1)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.memory.write_int(self.avail + 2, 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_int(self.avail, 2, flags)

    def set_used_event(self, value: int) -> None:
        self.memory.write_int(self.avail + 4 + 2 * self.size, 2, value)

    def avail_event(self) -> int:
        return self.memory.read_int(self.used + 4 + 8 * self.size, 2)

    def used_flags(self) -> int:
        return self.memory.read_int(self.used, 2)

    def used_idx(self) -> int:
        return self.memory.read_int(self.used + 2, 2)

    # chains
    def add(self, bufs: list[Buf], indirect: bool = False, kick: bool = True) -> int:
        """Build a chain of ``bufs`` (readable ones first), publish it, optionally kick."""
        if not self.free:
            self.free = list(range(self.size))
        if indirect:
            table = self.driver.alloc.alloc(16 * len(bufs), 16)
            for i, b in enumerate(bufs):
                last = i == len(bufs) - 1
                flags = (VIRTQ_DESC_F_WRITE if b.writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
                self.write_desc(i, b.addr, b.length, flags, i + 1, table)
            head = self.free.pop(0)
            self.write_desc(head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
        else:
            ids = [self.free.pop(0) for _ in bufs]
            for n, (i, b) in enumerate(zip(ids, bufs)):
                last = n == len(bufs) - 1
                flags = (VIRTQ_DESC_F_WRITE if b.writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
                self.write_desc(i, b.addr, b.length, flags, 0 if last else ids[n + 1])
            head = ids[0]
        self.publish(head)
        if kick:
            self.kick()
        return head

    def kick(self) -> None:
        self.driver.kick(self.index)

    def get_used(self) -> list[tuple[int, int]]:
        """New used elements ``(id, len)`` since the last call."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            elem = self.used + 4 + 8 * (self.last_used % self.size)
            out.append(struct.unpack("<II", self.memory.read(elem, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


PAGE = 4096
LEGACY_GUEST_PAGE_SIZE, LEGACY_QUEUE_ALIGN, LEGACY_QUEUE_PFN = 0x028, 0x03C, 0x040


class VirtioDriver:
    """What every transport's test driver shares (it has ``negotiate``,
    ``setup_queue``, ``set_status``, ``memory`` and ``alloc``)."""

    def init(self, nqueues: int = 1, features: int | None = None, mask: int = ~0,
             size: int | None = None) -> list[DriverQueue]:
        """The whole of 3.1.1: negotiate, set up ``nqueues`` queues, DRIVER_OK."""
        assert self.negotiate(features, mask), "FEATURES_OK refused"
        qs = [self.setup_queue(i, size) for i in range(nqueues)]
        self.driver_ok()
        return qs

    def driver_ok(self) -> None:
        self.set_status(STATUS_DRIVER_OK)

    def buffer(self, data: bytes | int, writable: bool = False) -> Buf:
        """Allocate a buffer holding ``data`` (or ``data`` zero bytes)."""
        size = data if isinstance(data, int) else len(data)
        addr = self.alloc.alloc(max(size, 1), 8)
        if not isinstance(data, int):
            self.memory.write(addr, data)
        return Buf(addr, size, writable)


class VirtioMmioDriver(VirtioDriver):
    """Drives a :class:`~kemu.devices.virtio.mmio.VirtioMmioTransport` like a guest."""

    def __init__(self, transport, memory: GuestMemory, alloc: Allocator | None = None,
                 legacy: bool = False) -> None:
        #: Speak the legacy interface (4.2.4): Version 1, QueuePFN, no FEATURES_OK.
        self.legacy = legacy
        self.t = transport
        self.memory = memory
        self.alloc = alloc or Allocator(memory)
        self.queues: dict[int, DriverQueue] = {}

    def r32(self, offset: int) -> int:
        return self.t.read(offset, 4)

    def w32(self, offset: int, value: int) -> None:
        self.t.write(offset, 4, value)

    @property
    def status(self) -> int:
        return self.r32(r.STATUS)

    def set_status(self, bits: int) -> None:
        self.w32(r.STATUS, self.status | bits)

    def device_features(self) -> int:
        self.w32(r.DEVICE_FEATURES_SEL, 0)
        lo = self.r32(r.DEVICE_FEATURES)
        self.w32(r.DEVICE_FEATURES_SEL, 1)
        return lo | self.r32(r.DEVICE_FEATURES) << 32

    def negotiate(self, features: int | None = None, mask: int = ~0) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, write features, FEATURES_OK; True if accepted."""
        self.w32(r.STATUS, 0)
        assert self.r32(r.MAGIC_VALUE) == r.MAGIC
        assert self.r32(r.VERSION) == (1 if self.legacy else 2)
        self.set_status(STATUS_ACKNOWLEDGE)
        self.set_status(STATUS_DRIVER)
        if features is None:
            features = self.device_features() & mask
        if self.legacy:     # 32 feature bits, no FEATURES_OK; the page size once
            self.w32(r.DRIVER_FEATURES_SEL, 0)
            self.w32(r.DRIVER_FEATURES, features & 0xFFFFFFFF)
            self.w32(LEGACY_GUEST_PAGE_SIZE, PAGE)
            return True
        for sel in (0, 1):
            self.w32(r.DRIVER_FEATURES_SEL, sel)
            self.w32(r.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.set_status(STATUS_FEATURES_OK)
        return bool(self.status & STATUS_FEATURES_OK)

    def setup_queue(self, index: int, size: int | None = None) -> DriverQueue:
        if self.legacy:
            return self.setup_legacy_queue(index, size)
        self.w32(r.QUEUE_SEL, index)
        assert self.r32(r.QUEUE_READY) == 0
        qmax = self.r32(r.QUEUE_NUM_MAX)
        assert qmax, f"queue {index} not available"
        size = size or qmax
        desc = self.alloc.alloc(16 * size, 16)
        avail = self.alloc.alloc(6 + 2 * size, 2)
        used = self.alloc.alloc(6 + 8 * size, 4)
        self.w32(r.QUEUE_NUM, size)
        for lo, addr in ((r.QUEUE_DESC_LOW, desc), (r.QUEUE_DRIVER_LOW, avail),
                         (r.QUEUE_DEVICE_LOW, used)):
            self.w32(lo, addr & 0xFFFFFFFF)
            self.w32(lo + 4, addr >> 32)
        self.w32(r.QUEUE_READY, 1)
        q = DriverQueue(self, index, size, desc, avail, used)
        self.queues[index] = q
        return q

    def setup_legacy_queue(self, index: int, size: int | None = None,
                           align: int = PAGE) -> DriverQueue:
        """QueueNum, QueueAlign, QueuePFN: the ring in contiguous pages (2.7.2)."""
        self.w32(r.QUEUE_SEL, index)
        assert self.r32(LEGACY_QUEUE_PFN) == 0
        qmax = self.r32(r.QUEUE_NUM_MAX)
        assert qmax, f"queue {index} not available"
        size = size or qmax
        avail_off = 16 * size
        used_off = (avail_off + 6 + 2 * size + align - 1) & ~(align - 1)
        base = self.alloc.alloc(used_off + 6 + 8 * size, PAGE)
        self.w32(r.QUEUE_NUM, size)
        self.w32(LEGACY_QUEUE_ALIGN, align)
        self.w32(LEGACY_QUEUE_PFN, base // PAGE)
        q = DriverQueue(self, index, size, base, base + avail_off, base + used_off)
        self.queues[index] = q
        return q

    def kick(self, index: int) -> None:
        self.w32(r.QUEUE_NOTIFY, index)


    def interrupt_status(self) -> int:
        return self.r32(r.INTERRUPT_STATUS)

    def ack(self, bits: int | None = None) -> int:
        isr = self.interrupt_status()
        self.w32(r.INTERRUPT_ACK, isr if bits is None else bits)
        return isr

    def config(self, offset: int, size: int) -> int:
        return self.t.read(r.CONFIG + offset, size)

