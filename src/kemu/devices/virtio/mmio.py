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
from kemu.devices.virtio.queue import QueueState
from kemu.devices.virtio.transport import (  # noqa: F401  (re-exported names)
    INT_CONFIG,
    INT_VRING,
    TRANSPORT_FEATURES,
    TransportState,
    VirtioTransport,
)
from kemu.memory import GuestMemory

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

VIRTIO_MMIO_INT_VRING = INT_VRING
VIRTIO_MMIO_INT_CONFIG = INT_CONFIG


_QUEUE_ADDR_REGS = {
    QUEUE_DESC_LOW: ("desc_addr", 0), QUEUE_DESC_HIGH: ("desc_addr", 32),
    QUEUE_DRIVER_LOW: ("driver_addr", 0), QUEUE_DRIVER_HIGH: ("driver_addr", 32),
    QUEUE_DEVICE_LOW: ("device_addr", 0), QUEUE_DEVICE_HIGH: ("device_addr", 32),
}


@dataclass
class VirtioMmioState(TransportState):
    """Transport registers and queues as plain data (device state is the device's)."""

    shm_sel: int
    queues: list[QueueState] = field(default_factory=list)
    #: Legacy interface (4.2.4): GuestPageSize, and QueueAlign / QueuePFN per queue.
    guest_page_size: int = 0
    queue_align: list[int] = field(default_factory=list)
    queue_pfn: list[int] = field(default_factory=list)


class VirtioMmioTransport(VirtioTransport):
    """virtio-mmio registers for ``device`` (``None``: an empty slot)."""

    def __init__(self, device: VirtioDevice | None, memory: GuestMemory, irq: IrqLine,
                 name: str | None = None, legacy: bool = False) -> None:
        super().__init__(device, memory, irq,
                         name or f"virtio-mmio-{device.name if device else 'empty'}")
        #: Version 1 (4.2.4) rather than 2: asked for, and the device type has one.
        self.legacy = legacy and legacy_if.has_legacy_interface(
            device.device_id if device else None)
        #: Legacy GuestPageSize: Linux writes it once at probe, before the driver's
        #: reset (Status 0), so a reset leaves it as QEMU does.
        self.guest_page_size = 0
        self._reset_registers()

    # -- state ---------------------------------------------------------------------------
    def _reset_registers(self) -> None:
        super()._reset_registers()
        self.shm_sel = 0
        self.queue_align = [legacy_if.DEFAULT_QUEUE_ALIGN] * len(self.queues)
        self.queue_pfn = [0] * len(self.queues)

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
        self._restore_registers(state)
        self.shm_sel = state.shm_sel
        self.guest_page_size = state.guest_page_size
        if len(state.queue_align) == len(self.queues):
            self.queue_align = list(state.queue_align)
            self.queue_pfn = list(state.queue_pfn)
        self._restore_status(state)
