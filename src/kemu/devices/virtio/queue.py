"""Split virtqueues, device side (VIRTIO 1.2, section 2.7 "Split Virtqueues").

A split virtqueue is three areas of guest RAM written by the driver
(section 2.7, table "Virtqueue Part Sizes"):

========================  =========  ===================================
Descriptor Table          align 16   ``16 * QueueSize``
Available Ring (driver)   align 2    ``6 + 2 * QueueSize``
Used Ring (device)        align 4    ``6 + 8 * QueueSize``
========================  =========  ===================================

All fields are little-endian (VIRTIO_F_VERSION_1, section 6).

Everything in those areas is written by the guest and is untrusted here.
:meth:`Virtqueue.pop` walks one descriptor chain, checks every descriptor
and returns it as a :class:`DescriptorChain` of ``(addr, length, writable)``
segments that all lie inside guest RAM, or raises :class:`VirtqueueError`.
The rules enforced, beyond the spec's MUSTs for drivers, are kemu's bounds:

* queue size a power of two, at most :data:`MAX_QUEUE_SIZE` (2.7, 4.2.2);
* rings aligned and inside guest RAM when the queue is enabled;
* the available index never runs ahead of the device by more than the
  queue size (2.7.6), every head and ``next`` index inside its table;
* at most ``QueueSize`` buffer descriptors per chain, counting the entries
  of an indirect table and not the descriptor pointing to it (2.7.5.3.1:
  "A driver MUST NOT create a descriptor chain longer than the Queue
  Size"); this also stops descriptor loops;
* indirect tables only if VIRTIO_F_INDIRECT_DESC was negotiated, with a
  length that is a non-zero multiple of 16, inside RAM, not nested, and not
  combined with VIRTQ_DESC_F_NEXT (2.7.5.3.1);
* device-writable descriptors only after all device-readable ones
  (2.7.4.2: "The driver MUST place any device-writable descriptor elements
  after any device-readable descriptor elements");
* every non-empty buffer wholly inside one region of guest RAM;
* at most :data:`MAX_CHAIN_BYTES` (64 MiB) of buffers per chain, so no
  guest request can make the VMM allocate more than that.

A device turns a :class:`VirtqueueError` into a device error: the transport
sets DEVICE_NEEDS_RESET (section 2.1.2) and stops using the queues.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from kemu.errors import KemuError, MemoryAccessError
from kemu.memory import GuestMemory

# Descriptor flags (2.7.5).
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# Available ring flags (2.7.6) and used ring flags (2.7.8).
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# Reserved (device-independent) feature bits this queue implements (section 6).
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

#: Largest queue size of a split virtqueue (4.2.2 QueueNum, 2.7 "Queue Size").
MAX_QUEUE_SIZE = 32768
#: Bound on the total buffer length of one chain (kemu's choice, not the spec's).
MAX_CHAIN_BYTES = 64 << 20

DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")       # struct virtq_desc: addr, len, flags, next
_USED_ELEM = struct.Struct("<II")    # struct virtq_used_elem: id, len


class VirtioError(KemuError):
    """A virtio protocol violation by the guest driver; becomes a device error."""


class VirtqueueError(VirtioError):
    """A malformed virtqueue: bad ring addresses, descriptors or indices."""


class Segment(NamedTuple):
    """One guest buffer of a chain, already checked to lie inside guest RAM."""

    addr: int
    length: int
    writable: bool


def _gather(memory: GuestMemory, segs: tuple[Segment, ...], offset: int, size: int) -> bytes:
    out = bytearray()
    for seg in segs:
        if len(out) >= size:
            break
        if offset >= seg.length:
            offset -= seg.length
            continue
        take = min(seg.length - offset, size - len(out))
        out += memory.read(seg.addr + offset, take)
        offset = 0
    return bytes(out)


def _scatter(memory: GuestMemory, segs: tuple[Segment, ...], offset: int, data: bytes) -> int:
    done = 0
    for seg in segs:
        if done >= len(data):
            break
        if offset >= seg.length:
            offset -= seg.length
            continue
        take = min(seg.length - offset, len(data) - done)
        memory.write(seg.addr + offset, data[done:done + take])
        done += take
        offset = 0
    return done


@dataclass(frozen=True)
class DescriptorChain:
    """One request popped from the available ring (2.7.5, 2.6.4 Message Framing).

    ``readable`` are the device-readable buffers, ``writable`` the
    device-writable ones that follow them; devices treat each side as one
    byte stream and never rely on how it is split (VIRTIO_F_ANY_LAYOUT is
    implied by VIRTIO_F_VERSION_1).
    """

    head: int
    readable: tuple[Segment, ...]
    writable: tuple[Segment, ...]

    @property
    def segments(self) -> list[tuple[int, int, bool]]:
        return [tuple(s) for s in self.readable + self.writable]

    @property
    def readable_len(self) -> int:
        return sum(s.length for s in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(s.length for s in self.writable)

    def read(self, memory: GuestMemory, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of the readable stream from ``offset`` (shorter at its end)."""
        return _gather(memory, self.readable, offset, size)

    def write(self, memory: GuestMemory, offset: int, data: bytes) -> int:
        """Write ``data`` into the writable stream at ``offset``; returns bytes written."""
        return _scatter(memory, self.writable, offset, data)


@dataclass
class QueueState:
    """A queue's registers and indices, as plain data for snapshots."""

    version: int
    size: int
    ready: bool
    desc_addr: int
    driver_addr: int
    device_addr: int
    next_avail: int
    next_used: int
    signalled_used: int
    signalled_valid: bool
    features: int


class Virtqueue:
    """The device side of one split virtqueue over :class:`GuestMemory`.

    The transport writes :attr:`size` and the three area addresses, then
    calls :meth:`enable` (QueueReady=1), :meth:`set_features` after feature
    negotiation, and :meth:`reset`.  The device calls :meth:`pop`,
    :meth:`push` and :meth:`should_notify`.
    """

    def __init__(self, memory: GuestMemory, max_size: int, index: int = 0) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"virtqueue max size {max_size} is not a power of two <= 32768")
        self.memory = memory
        self.max_size = max_size
        self.index = index
        self.features = 0
        self.reset()

    # -- configuration (driven by the transport) ---------------------------------------
    def reset(self) -> None:
        """Back to the state after device reset (QueueNum defaults to the maximum)."""
        self.size = self.max_size
        self.ready = False
        self.desc_addr = self.driver_addr = self.device_addr = 0
        self.next_avail = 0
        self.next_used = 0
        self.inuse = 0
        self._signalled_used = 0
        self._signalled_valid = False

    def set_features(self, features: int) -> None:
        """Apply the negotiated feature bits (EVENT_IDX, INDIRECT_DESC)."""
        self.features = features

    @property
    def event_idx(self) -> bool:
        return bool(self.features >> VIRTIO_F_EVENT_IDX & 1)

    @property
    def indirect(self) -> bool:
        return bool(self.features >> VIRTIO_F_INDIRECT_DESC & 1)

    def check_layout(self) -> None:
        """Validate size, alignment and placement of the three areas (2.7, 2.7.1)."""
        size = self.size
        if not 1 <= size <= self.max_size or size & (size - 1):
            raise VirtqueueError(
                f"queue {self.index}: size {size} is not a power of two in 1..{self.max_size}")
        for what, addr, align, length in (
                ("descriptor table", self.desc_addr, 16, DESC_SIZE * size),
                ("driver area", self.driver_addr, 2, 6 + 2 * size),
                ("device area", self.device_addr, 4, 6 + 8 * size)):
            if addr % align:
                raise VirtqueueError(
                    f"queue {self.index}: {what} at {addr:#x} is not {align}-byte aligned")
            if not self.memory.contains(addr, length):
                raise VirtqueueError(
                    f"queue {self.index}: {what} at {addr:#x}+{length:#x} is outside guest RAM")

    def enable(self) -> None:
        """QueueReady=1: check the layout and start from index 0 (2.7.6, 2.7.8)."""
        self.check_layout()
        self.next_avail = 0
        self.next_used = 0
        self.inuse = 0
        self._signalled_used = 0
        self._signalled_valid = False
        self.ready = True

    def disable(self) -> None:
        self.ready = False

    # -- ring accessors ------------------------------------------------------------------
    def _u16(self, addr: int) -> int:
        return self.memory.read_int(addr, 2)

    def avail_flags(self) -> int:
        return self._u16(self.driver_addr)

    def avail_idx(self) -> int:
        return self._u16(self.driver_addr + 2)

    def used_event(self) -> int:
        return self._u16(self.driver_addr + 4 + 2 * self.size)

    def _set_avail_event(self, value: int) -> None:
        self.memory.write_int(self.device_addr + 4 + 8 * self.size, 2, value)

    # -- device operations ---------------------------------------------------------------
    def pending(self) -> int:
        """Number of chains the driver made available that the device has not popped."""
        n = (self.avail_idx() - self.next_avail) & 0xFFFF
        if n > self.size:
            raise VirtqueueError(
                f"queue {self.index}: available index moved by {n} > queue size {self.size}")
        return n

    def pop(self) -> DescriptorChain | None:
        """Take the next available chain, validated, or ``None`` if there is none.

        With VIRTIO_F_EVENT_IDX the device's ``avail_event`` is kept at the
        next index it will read, so the driver notifies for any new buffer
        (2.7.10); after publishing it the ring is checked once more so that a
        buffer added concurrently is not missed.
        """
        if not self.ready:
            return None
        try:
            n = self.pending()
            if n == 0 and self.event_idx:
                self._set_avail_event(self.next_avail)
                n = self.pending()
            if n == 0:
                return None
            slot = self.driver_addr + 4 + 2 * (self.next_avail % self.size)
            head = self._u16(slot)
            self.next_avail = (self.next_avail + 1) & 0xFFFF
            self.inuse += 1
            if self.event_idx:
                self._set_avail_event(self.next_avail)
            return self._walk(head)
        except MemoryAccessError as exc:  # checked layouts make this unreachable; belt and braces
            raise VirtqueueError(f"queue {self.index}: {exc}") from None

    def _walk(self, head: int) -> DescriptorChain:
        """Follow one chain from ``head`` (2.7.5 and 2.7.5.3 Indirect Descriptors)."""
        q = self.index
        if head >= self.size:
            raise VirtqueueError(f"queue {q}: head index {head} >= queue size {self.size}")
        table, table_len, idx = self.desc_addr, self.size, head
        in_indirect = False
        readable: list[Segment] = []
        writable: list[Segment] = []
        total = 0
        read = self.memory.read
        while True:
            if idx >= table_len:
                raise VirtqueueError(f"queue {q}: descriptor index {idx} >= table size {table_len}")
            addr, length, flags, nxt = _DESC.unpack(read(table + DESC_SIZE * idx, DESC_SIZE))
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError(f"queue {q}: indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if in_indirect:
                    raise VirtqueueError(f"queue {q}: nested indirect descriptor")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError(f"queue {q}: indirect descriptor with VIRTQ_DESC_F_NEXT")
                if length == 0 or length % DESC_SIZE:
                    raise VirtqueueError(f"queue {q}: indirect table length {length} is not a non-zero multiple of 16")
                if not self.memory.contains(addr, length):
                    raise VirtqueueError(f"queue {q}: indirect table at {addr:#x}+{length:#x} is outside guest RAM")
                table, table_len, idx = addr, length // DESC_SIZE, 0
                in_indirect = True
                continue
            if len(readable) + len(writable) >= self.size:
                raise VirtqueueError(f"queue {q}: chain from head {head} is longer than the queue size "
                                     f"{self.size} (loop?)")
            if flags & VIRTQ_DESC_F_WRITE:
                seg_list = writable
            elif writable:
                raise VirtqueueError(f"queue {q}: device-readable descriptor after a device-writable one")
            else:
                seg_list = readable
            if length:
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise VirtqueueError(f"queue {q}: chain from head {head} exceeds {MAX_CHAIN_BYTES} bytes")
                if not self.memory.contains(addr, length):
                    raise VirtqueueError(f"queue {q}: buffer at {addr:#x}+{length:#x} is outside guest RAM")
            seg_list.append(Segment(addr, length, bool(flags & VIRTQ_DESC_F_WRITE)))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            idx = nxt
        return DescriptorChain(head, tuple(readable), tuple(writable))

    def push(self, chain: DescriptorChain, written: int) -> None:
        """Return ``chain`` to the driver through the used ring (2.7.8).

        ``written`` is the number of bytes the device wrote into the chain's
        writable buffers (starting at the first of them).
        """
        if not 0 <= written <= chain.writable_len:
            raise ValueError(f"used length {written} exceeds writable length {chain.writable_len}")
        elem = self.device_addr + 4 + 8 * (self.next_used % self.size)
        try:
            self.memory.write(elem, _USED_ELEM.pack(chain.head, written))
            self.next_used = (self.next_used + 1) & 0xFFFF
            self.memory.write_int(self.device_addr + 2, 2, self.next_used)
            self.inuse = max(0, self.inuse - 1)
        except MemoryAccessError as exc:
            raise VirtqueueError(f"queue {self.index}: {exc}") from None

    def should_notify(self) -> bool:
        """Whether the driver wants a used buffer notification now (2.7.7.2).

        Without VIRTIO_F_EVENT_IDX: unless VIRTQ_AVAIL_F_NO_INTERRUPT is set.
        With it: if ``used_event`` was crossed since the last notification,
        i.e. ``(u16)(new - used_event - 1) < (u16)(new - old)``.
        """
        try:
            if not self.event_idx:
                return not self.avail_flags() & VIRTQ_AVAIL_F_NO_INTERRUPT
            old, new = self._signalled_used, self.next_used
            valid = self._signalled_valid
            self._signalled_used, self._signalled_valid = new, True
            event = self.used_event()
        except MemoryAccessError as exc:
            raise VirtqueueError(f"queue {self.index}: {exc}") from None
        return not valid or ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    def set_notification(self, enabled: bool) -> None:
        """Ask the driver to send (or not) available buffer notifications (2.7.10).

        Only meaningful without VIRTIO_F_EVENT_IDX; with it, :meth:`pop`
        keeps ``avail_event`` current instead.
        """
        if self.ready and not self.event_idx:
            self.memory.write_int(self.device_addr, 2, 0 if enabled else VIRTQ_USED_F_NO_NOTIFY)

    # -- snapshots -----------------------------------------------------------------------
    def save(self) -> QueueState:
        """The queue with the chains the device holds unused (``inuse``: receive
        buffers waiting for data, requests held by an error policy) given back:
        ``next_avail`` is rewound over them, so the restored device takes them
        again from the available ring (they are the latest ones taken, as
        QEMU's virtqueue_rewind assumes)."""
        return QueueState(1, self.size, self.ready, self.desc_addr, self.driver_addr,
                          self.device_addr, (self.next_avail - self.inuse) & 0xFFFF,
                          self.next_used,
                          self._signalled_used, self._signalled_valid, self.features)

    def restore(self, state: QueueState) -> None:
        if state.version != 1:
            raise VirtqueueError(f"unsupported virtqueue state version {state.version}")
        self.size = state.size
        self.desc_addr, self.driver_addr = state.desc_addr, state.driver_addr
        self.device_addr = state.device_addr
        self.features = state.features
        self.ready = False
        if state.ready:
            self.check_layout()
            self.ready = True
        self.next_avail, self.next_used = state.next_avail & 0xFFFF, state.next_used & 0xFFFF
        self.inuse = 0
        self._signalled_used, self._signalled_valid = state.signalled_used, state.signalled_valid
