"""The virtio-mmio transport, version 2 (VIRTIO 1.2, section 4.2 "Virtio Over MMIO").

One :class:`VirtioMmioTransport` is one 0x200-byte register window in front
of one :class:`~kemu.devices.virtio.VirtioDevice`, or of nothing: with no
device it reads DeviceID 0, which drivers skip silently (4.2.3.1.1), so a
board can fill unused slots.

Registers are 32-bit wide and aligned (4.2.2); other accesses to them read
as 0 and are ignored.  The configuration space at 0x100 takes any width.

Interrupts: the transport drives its :class:`IrqLine` high while
InterruptStatus is non-zero (bit 0 used buffer, bit 1 configuration change)
and low once the driver has acknowledged every bit (4.2.3.4).

A transport is modern (Version 2: VIRTIO_F_VERSION_1 is required at
FEATURES_OK, and the legacy-only registers GuestPageSize, QueueAlign and
QueuePFN or DRIVER_OK without FEATURES_OK put the device in
DEVICE_NEEDS_RESET) or, with ``legacy=True`` (QEMU's
``virtio-mmio.force-legacy=on``), legacy: Version 1 and the registers of
4.2.4 (see :mod:`.mmio_legacy`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from kemu.devices.base import IrqLine
from kemu.devices.virtio import (
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VirtioDevice,
    VirtioError,
)
from kemu.devices.virtio import mmio_legacy as legacy_if
from kemu.devices.virtio.queue import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    QueueState,
    Virtqueue,
)
from kemu.errors import MemoryAccessError
from kemu.memory import GuestMemory

log = logging.getLogger(__name__)

MMIO_SIZE = 0x200

# Register offsets (4.2.2, table "MMIO Device Register Layout").
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
LEGACY_GUEST_PAGE_SIZE = 0x028   # 4.2.4, legacy only
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
LEGACY_QUEUE_ALIGN = 0x03C       # legacy only
LEGACY_QUEUE_PFN = 0x040         # legacy only
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

MAGIC = 0x74726976                 # "virt"
MMIO_VERSION = 2
VENDOR_KEMU = 0x554D454B           # "KEMU" read as little-endian bytes

VIRTIO_MMIO_INT_VRING = 1 << 0
VIRTIO_MMIO_INT_CONFIG = 1 << 1

#: Device-independent features every transport instance offers (section 6).
TRANSPORT_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX)

_QUEUE_ADDR_REGS = {
    QUEUE_DESC_LOW: ("desc_addr", 0), QUEUE_DESC_HIGH: ("desc_addr", 32),
    QUEUE_DRIVER_LOW: ("driver_addr", 0), QUEUE_DRIVER_HIGH: ("driver_addr", 32),
    QUEUE_DEVICE_LOW: ("device_addr", 0), QUEUE_DEVICE_HIGH: ("device_addr", 32),
}


@dataclass
class VirtioMmioState:
    """Transport registers and queues as plain data (device state is the device's)."""

    version: int
    status: int
    driver_features: int
    device_features_sel: int
    driver_features_sel: int
    queue_sel: int
    interrupt_status: int
    config_generation: int
    shm_sel: int
    queues: list[QueueState] = field(default_factory=list)
    #: Legacy interface (4.2.4): GuestPageSize, and QueueAlign / QueuePFN per queue.
    guest_page_size: int = 0
    queue_align: list[int] = field(default_factory=list)
    queue_pfn: list[int] = field(default_factory=list)


class _Session:
    """The :class:`~kemu.devices.virtio.VirtioSession` of one activation."""

    def __init__(self, transport: VirtioMmioTransport) -> None:
        self._transport = transport
        self.memory = transport.memory
        self.features = transport.driver_features
        self.queues: Sequence[Virtqueue] = tuple(transport.queues)
        self.active = True

    def signal_used(self, queue_index: int) -> None:
        if self.active:
            self._transport._signal_used(queue_index)

    def signal_config(self) -> None:
        if self.active:
            self._transport.config_changed()

    def device_error(self, reason: str) -> None:
        if self.active:
            self._transport.device_error(reason)


class VirtioMmioTransport:
    """virtio-mmio registers for ``device`` (``None``: an empty slot)."""

    def __init__(self, device: VirtioDevice | None, memory: GuestMemory, irq: IrqLine,
                 name: str | None = None, legacy: bool = False) -> None:
        self.device = device
        #: Version 1 (4.2.4) rather than 2: asked for, and the device type has one.
        self.legacy = legacy and legacy_if.has_legacy_interface(
            device.device_id if device else None)
        self.memory = memory
        self.irq = irq
        self.name = name or f"virtio-mmio-{device.name if device else 'empty'}"
        self.queues = [Virtqueue(memory, size, i)
                       for i, size in enumerate(device.queue_max_sizes if device else ())]
        self.config_generation = 0
        #: Why the device last entered DEVICE_NEEDS_RESET (for diagnostics).
        self.error: str | None = None
        #: Register accesses of the wrong width or alignment, ignored.
        self.bad_accesses = 0
        self._session: _Session | None = None
        #: Legacy GuestPageSize: Linux writes it once at probe, before the driver's
        #: reset (Status 0), so a reset leaves it as QEMU does.
        self.guest_page_size = 0
        self._reset_registers()

    # -- state ---------------------------------------------------------------------------
    def _reset_registers(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.shm_sel = 0
        self.interrupt_status = 0
        self.queue_align = [legacy_if.DEFAULT_QUEUE_ALIGN] * len(self.queues)
        self.queue_pfn = [0] * len(self.queues)
        for q in self.queues:
            q.reset()
            q.set_features(0)

    def reset(self) -> None:
        """Device reset (2.4, 4.2.2 Status: writing 0)."""
        if self._session is not None:
            self._session.active = False
            self._session = None
        self._reset_registers()
        self.error = None
        if self.device is not None:
            self.device.reset()
        self._update_irq()

    @property
    def device_features(self) -> int:
        if self.device is None:
            return 0
        return (self.device.device_features() | TRANSPORT_FEATURES) & ((1 << 64) - 1)

    def _queue(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _update_irq(self) -> None:
        self.irq.set(self.interrupt_status != 0)

    # -- notifications from the device ---------------------------------------------------------
    def _signal_used(self, index: int) -> None:
        try:
            wanted = self.queues[index].should_notify()
        except VirtioError as exc:
            self.device_error(str(exc))
            return
        if wanted:
            self.interrupt_status |= VIRTIO_MMIO_INT_VRING
            self._update_irq()

    def config_changed(self) -> None:
        """Configuration space changed: new generation and a config interrupt (2.5.1)."""
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        if self.status & STATUS_DRIVER_OK:
            self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG
            self._update_irq()

    def device_error(self, reason: str) -> None:
        """Enter DEVICE_NEEDS_RESET and tell the driver (2.1.2).

        The device stops processing queues until the driver resets it; the
        VMM carries on.
        """
        if self.device is None or self.status & STATUS_DEVICE_NEEDS_RESET:
            return
        log.warning("%s: device error, needs reset: %s", self.name, reason)
        self.error = reason
        self.status |= STATUS_DEVICE_NEEDS_RESET
        if self._session is not None:
            self._session.active = False
        if self.status & STATUS_DRIVER_OK:
            self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG
            self._update_irq()

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & STATUS_DEVICE_NEEDS_RESET)

    # -- status and features -------------------------------------------------------------
    def _features_ok(self) -> str | None:
        """Why the driver's features cannot be accepted, or ``None`` (2.2.1, 6.1)."""
        extra = self.driver_features & ~self.device_features
        if extra:
            return f"driver accepted features {extra:#x} that were not offered"
        if not self.legacy and not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
            return "driver did not accept VIRTIO_F_VERSION_1 (legacy driver?)"
        if not self.device.check_features(self.driver_features):
            return f"device refused feature set {self.driver_features:#x}"
        return None

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self.status
        new = old | (value & 0xFF)  # the driver never clears bits except by reset (2.1.1)
        added = new & ~old
        if added & STATUS_FEATURES_OK:
            why = self._features_ok()
            if why is not None:
                log.info("%s: FEATURES_OK refused: %s", self.name, why)
                new &= ~STATUS_FEATURES_OK
            else:
                for q in self.queues:
                    q.set_features(self.driver_features)
        if added & STATUS_DRIVER_OK and self.legacy and not new & STATUS_FEATURES_OK:
            why = self._features_ok()    # a legacy driver never sets FEATURES_OK
            if why is not None:
                self.status = new & ~STATUS_DRIVER_OK
                self.device_error(why)
                return
            for q in self.queues:
                q.set_features(self.driver_features)
        elif added & STATUS_DRIVER_OK and not new & STATUS_FEATURES_OK:
            self.status = new & ~STATUS_DRIVER_OK
            self.device_error("DRIVER_OK without FEATURES_OK: legacy virtio drivers are not supported")
            return
        if added & STATUS_DRIVER_OK:
            if old & STATUS_DEVICE_NEEDS_RESET:
                self.status = new & ~STATUS_DRIVER_OK
                return
            self.status = new
            self._activate()
            return
        self.status = new

    def _activate(self) -> None:
        self._session = _Session(self)
        try:
            self.device.activate(self._session)
        except (VirtioError, MemoryAccessError) as exc:
            self.device_error(str(exc))

    def notify(self, index: int) -> None:
        """The driver notified queue ``index`` (QueueNotify, or an ioeventfd standing in)."""
        if (self.status & (STATUS_DRIVER_OK | STATUS_DEVICE_NEEDS_RESET)) != STATUS_DRIVER_OK:
            return  # 3.1.1: no buffers are consumed before DRIVER_OK
        if index >= len(self.queues) or not self.queues[index].ready:
            return
        try:
            self.device.queue_notify(index, self.queues[index])
        except (VirtioError, MemoryAccessError) as exc:
            self.device_error(str(exc))

    # -- register access (Device protocol) -----------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset >= CONFIG:
            return self._config_read(offset - CONFIG, size)
        if size != 4 or offset % 4:
            self.bad_accesses += 1
            return 0
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION:
            return legacy_if.LEGACY_VERSION if self.legacy else MMIO_VERSION
        if offset == DEVICE_ID:
            return self.device.device_id if self.device else 0
        if offset == VENDOR_ID:
            return VENDOR_KEMU
        if self.device is None:
            return 0
        if offset == DEVICE_FEATURES:
            if self.device_features_sel > (0 if self.legacy else 1):
                return 0
            return (self.device_features >> (32 * self.device_features_sel)) & 0xFFFFFFFF
        if offset == QUEUE_NUM_MAX:
            q = self._queue()
            return q.max_size if q else 0
        if offset == QUEUE_READY and not self.legacy:
            q = self._queue()
            return int(q.ready) if q else 0
        if offset == LEGACY_QUEUE_PFN and self.legacy:
            return self.queue_pfn[self.queue_sel] if self._queue() else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFFFFFF  # no shared memory regions: length and base -1 (4.2.2)
        if offset == CONFIG_GENERATION:
            return self.config_generation
        return 0  # write-only, legacy and reserved registers (QueueReset: not offered)

    def write(self, offset: int, size: int, value: int) -> None:
        if self.device is None:
            return
        if offset >= CONFIG:
            self._config_write(offset - CONFIG, size, value)
            return
        if size != 4 or offset % 4:
            self.bad_accesses += 1
            return
        value &= 0xFFFFFFFF
        q = self._queue()
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif self.legacy and offset in (LEGACY_GUEST_PAGE_SIZE, LEGACY_QUEUE_ALIGN,
                                        LEGACY_QUEUE_PFN):
            self._write_legacy(offset, value)
        elif self.legacy and (offset == QUEUE_READY or offset in _QUEUE_ADDR_REGS):
            pass    # not registers of the legacy layout (4.2.4): ignored
        elif offset == DRIVER_FEATURES:
            if (self.driver_features_sel <= (0 if self.legacy else 1)
                    and not self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK)):
                shift = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NUM:
            if q is not None and not q.ready:
                q.size = value
        elif offset == QUEUE_READY:
            self._write_queue_ready(q, value)
        elif offset in _QUEUE_ADDR_REGS:
            if q is not None and not q.ready:
                attr, shift = _QUEUE_ADDR_REGS[offset]
                old = getattr(q, attr)
                setattr(q, attr, (old & ~(0xFFFFFFFF << shift)) | (value << shift))
        elif offset == QUEUE_NOTIFY:
            self.notify(value & 0xFFFF)
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
            self._update_irq()
        elif offset == STATUS:
            self._write_status(value)
        elif offset == SHM_SEL:
            self.shm_sel = value
        elif offset in (LEGACY_GUEST_PAGE_SIZE, LEGACY_QUEUE_ALIGN, LEGACY_QUEUE_PFN):
            self.device_error(f"legacy virtio-mmio register {offset:#x} written: "
                              "this device only speaks virtio-mmio version 2")
        # Read-only and reserved registers: writes are ignored.

    def _write_legacy(self, offset: int, value: int) -> None:
        """GuestPageSize, QueueAlign, QueuePFN (4.2.4)."""
        if offset == LEGACY_GUEST_PAGE_SIZE:
            if not legacy_if.valid_power_of_two(value):
                self.device_error(f"GuestPageSize {value:#x} is not a power of two up to 64 KiB")
                return
            self.guest_page_size = value
            return
        q = self._queue()
        if q is None:
            return
        if offset == LEGACY_QUEUE_ALIGN:
            if not legacy_if.valid_power_of_two(value):
                self.device_error(f"QueueAlign {value:#x} is not a power of two up to 64 KiB")
                return
            self.queue_align[self.queue_sel] = value
            return
        self.queue_pfn[self.queue_sel] = value
        if value == 0:
            q.disable()     # "stop using the queue"
            return
        if self.status & STATUS_DEVICE_NEEDS_RESET:
            return
        ring = legacy_if.LegacyRing.at(value, self.guest_page_size,
                                       self.queue_align[self.queue_sel], q.size)
        q.desc_addr, q.driver_addr, q.device_addr = ring.desc, ring.avail, ring.used
        q.set_features(self.driver_features)
        try:
            q.enable()
        except VirtioError as exc:
            self.device_error(str(exc))

    def _write_queue_ready(self, q: Virtqueue | None, value: int) -> None:
        if q is None:
            return
        if not value & 1:
            q.disable()
            return
        if q.ready or self.status & STATUS_DEVICE_NEEDS_RESET:
            return
        if self.status & STATUS_FEATURES_OK:
            q.set_features(self.driver_features)
        try:
            q.enable()
        except VirtioError as exc:
            self.device_error(str(exc))

    # -- configuration space (2.5, 4.2.2 Config) -------------------------------------------
    def _config_read(self, offset: int, size: int) -> int:
        if self.device is None or size not in (1, 2, 4, 8):
            return 0
        space = self.device.config_space()
        if offset + size > len(space):
            return 0
        return int.from_bytes(space[offset:offset + size], "little")

    def _config_write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4, 8) or offset + size > len(self.device.config_space()):
            return
        self.device.config_write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    # -- snapshots -----------------------------------------------------------------------
    def save(self) -> VirtioMmioState:
        return VirtioMmioState(1, self.status, self.driver_features, self.device_features_sel,
                               self.driver_features_sel, self.queue_sel, self.interrupt_status,
                               self.config_generation, self.shm_sel,
                               [q.save() for q in self.queues], self.guest_page_size,
                               list(self.queue_align), list(self.queue_pfn))

    def restore(self, state: VirtioMmioState) -> None:
        """Restore registers and queues; re-activates the device if DRIVER_OK was set.

        The device's own state (if any) is restored separately, before this.
        """
        if state.version != 1 or len(state.queues) != len(self.queues):
            raise VirtioError(f"{self.name}: incompatible virtio-mmio state")
        self.reset()
        self.driver_features = state.driver_features
        self.device_features_sel = state.device_features_sel
        self.driver_features_sel = state.driver_features_sel
        self.queue_sel = state.queue_sel
        self.config_generation = state.config_generation
        self.shm_sel = state.shm_sel
        self.guest_page_size = state.guest_page_size
        if len(state.queue_align) == len(self.queues):
            self.queue_align = list(state.queue_align)
            self.queue_pfn = list(state.queue_pfn)
        for q, qs in zip(self.queues, state.queues):
            q.restore(qs)
        self.status = state.status
        self.interrupt_status = state.interrupt_status
        if (self.device is not None
                and (self.status & (STATUS_DRIVER_OK | STATUS_DEVICE_NEEDS_RESET)) == STATUS_DRIVER_OK):
            self._activate()
        self._update_irq()

    def kick_ready_queues(self) -> None:
        """After a restore: have the device look at every ready queue that holds
        buffers (those given back by the save, requests a paused machine had not
        taken yet), as if the driver had just notified it."""
        for i, q in enumerate(self.queues):
            try:
                waiting = q.ready and q.pending() > 0
            except VirtioError:
                waiting = False
            if waiting:
                self.notify(i)
