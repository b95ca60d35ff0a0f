"""The virtio-pci modern transport (VIRTIO 1.2, section 4.1 "Virtio Over PCI Bus").

:class:`VirtioPciTransport` puts a :class:`~kemu.devices.virtio.VirtioDevice`
on PCI as a non-transitional device: vendor 0x1af4, device 0x1040 + the
virtio device ID, revision 1 (4.1.2), subsystem 1af4:1100 as QEMU gives every PCI device (the
spec's "0x40 or higher" holds).  Its structures sit in one 64-bit
prefetchable memory BAR (BAR 4, 16 KiB), laid out as QEMU lays them out,
one 4 KiB page each, and are found through vendor-specific capabilities
(4.1.4): common configuration, ISR status, device configuration and
notifications (``notify_off_multiplier`` 4: queue ``n`` is notified by
a write at notify + 4n), plus the PCI configuration access capability
(4.1.4.8) that reaches the BAR through configuration space.

Status, features, queues and the device session are shared with
virtio-mmio (:mod:`.transport`).  Interrupts: MSI-X (a table of one vector
per queue plus one for configuration changes in a 32-bit BAR 1, as QEMU's)
while the driver enables it, each queue and the configuration raising the
vector the driver wrote in ``queue_msix_vector`` / ``config_msix_vector``;
otherwise INTx, the pin held while the ISR status is non-zero, reading ISR
clearing it (4.1.4.5).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kemu.devices.base import IrqLine
from kemu.devices.pci.config import (
    CAP_ID_VENDOR,
    QEMU_SUBSYSTEM_ID,
    QEMU_SUBSYSTEM_VENDOR,
    Bar,
    BarKind,
    PciFunction,
)
from kemu.devices.pci.msix import Msix, MsixState
from kemu.devices.virtio import STATUS_DRIVER_OK, STATUS_FEATURES_OK, VirtioDevice, VirtioError
from kemu.devices.virtio.queue import QueueState
from kemu.devices.virtio.transport import INT_CONFIG, TransportState, VirtioTransport
from kemu.memory import GuestMemory

VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_MODERN_DEVICE_BASE = 0x1040
VIRTIO_PCI_MODERN_REVISION = 1

# cfg_type of struct virtio_pci_cap (4.1.4).
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

#: The memory BAR and where each structure sits in it (as QEMU: modern_mem_bar_idx 4).
MODERN_BAR = 4
REGION_SIZE = 0x1000
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
BAR_SIZE = 0x4000
NOTIFY_OFF_MULTIPLIER = 4
#: MSI-X: the table and PBA in a 32-bit memory BAR 1 of 4 KiB (as QEMU: table at 0, PBA at 0x800).
MSIX_BAR = 1
MSIX_BAR_SIZE = 0x1000
MSIX_TABLE = 0x000
MSIX_PBA = 0x800

# struct virtio_pci_common_cfg (4.1.4.3): offset -> (name, size).
DEVICE_FEATURE_SELECT = 0x00
DEVICE_FEATURE = 0x04
DRIVER_FEATURE_SELECT = 0x08
DRIVER_FEATURE = 0x0C
CONFIG_MSIX_VECTOR = 0x10
NUM_QUEUES = 0x12
DEVICE_STATUS = 0x14
CONFIG_GENERATION = 0x15
QUEUE_SELECT = 0x16
QUEUE_SIZE = 0x18
QUEUE_MSIX_VECTOR = 0x1A
QUEUE_ENABLE = 0x1C
QUEUE_NOTIFY_OFF = 0x1E
QUEUE_DESC = 0x20
QUEUE_DRIVER = 0x28
QUEUE_DEVICE = 0x30
COMMON_CFG_SIZE = 0x38
_FIELD_SIZES = {
    DEVICE_FEATURE_SELECT: 4, DEVICE_FEATURE: 4, DRIVER_FEATURE_SELECT: 4, DRIVER_FEATURE: 4,
    CONFIG_MSIX_VECTOR: 2, NUM_QUEUES: 2, DEVICE_STATUS: 1, CONFIG_GENERATION: 1,
    QUEUE_SELECT: 2, QUEUE_SIZE: 2, QUEUE_MSIX_VECTOR: 2, QUEUE_ENABLE: 2, QUEUE_NOTIFY_OFF: 2,
}
_QUEUE_ADDRS = {QUEUE_DESC: "desc_addr", QUEUE_DRIVER: "driver_addr",
                QUEUE_DEVICE: "device_addr"}
VIRTIO_MSI_NO_VECTOR = 0xFFFF

#: PCI class codes QEMU gives virtio devices (hw/virtio/virtio-*-pci.c), by virtio device ID.
CLASS_CODES = {1: 0x020000, 2: 0x010000, 3: 0x078000, 4: 0x00FF00, 16: 0x038000,
               18: 0x098000, 19: 0x00FF00}
CLASS_OTHER = 0x00FF00

_CAP = struct.Struct("<BBBBxxII")   # cap_len, cfg_type, bar, id, padding, offset, length


def _virtio_cap(cfg_type: int, offset: int, length: int, extra: bytes = b"",
                bar: int = MODERN_BAR) -> bytes:
    """The body of a struct virtio_pci_cap after cap_vndr and cap_next (4.1.4)."""
    body = _CAP.pack(2 + _CAP.size + len(extra), cfg_type, bar, 0, offset, length)
    return body + extra


class VirtioPciFunction(PciFunction):
    """The function's configuration space, with the PCI configuration access window."""

    def __init__(self, transport: VirtioPciTransport, **kwargs) -> None:
        super().__init__(**kwargs)
        self.transport = transport
        writable = bytearray(_CAP.size + 4)
        writable[2] = 0xFF                                       # bar
        writable[6:14] = b"\xff" * 8                             # offset, length
        writable[_CAP.size:] = b"\xff" * 4                       # pci_cfg_data
        for cfg_type, offset, extra in ((VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, b""),
                                        (VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, b""),
                                        (VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, b""),
                                        (VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET,
                                         NOTIFY_OFF_MULTIPLIER.to_bytes(4, "little"))):
            self.add_capability(CAP_ID_VENDOR, _virtio_cap(cfg_type, offset, REGION_SIZE, extra))
        cap = self.add_capability(CAP_ID_VENDOR,
                                  _virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, bytes(4), bar=0),
                                  bytes(writable))
        self._pci_cfg_data = cap + 2 + _CAP.size

    def _pci_cfg_window(self, offset: int, size: int) -> tuple[int, int] | None:
        """The BAR offset and width a pci_cfg_data access reaches (4.1.4.8), or None."""
        if not self._pci_cfg_data <= offset < self._pci_cfg_data + 4:
            return None
        cap = self._pci_cfg_data - _CAP.size
        bar = self.space[cap + 2]
        bar_offset = self._get(cap + 6, 4)
        length = self._get(cap + 10, 4)
        if bar != MODERN_BAR or length not in (1, 2, 4) or bar_offset % length:
            return None
        return bar_offset, length

    def config_read(self, offset: int, size: int) -> int:
        window = self._pci_cfg_window(offset, size)
        if window is not None and offset == self._pci_cfg_data:
            bar_offset, length = window
            return self.transport.read(bar_offset, length)
        return super().config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        window = self._pci_cfg_window(offset, size)
        if window is not None and offset == self._pci_cfg_data:
            bar_offset, length = window
            self.transport.write(bar_offset, length, value & ((1 << (8 * length)) - 1))
            return
        super().config_write(offset, size, value)


class _MsixRegion:
    """BAR 1: the MSI-X table and PBA."""

    def __init__(self, transport: VirtioPciTransport) -> None:
        self.transport = transport
        self.name = f"{transport.name}-msix"

    def read(self, offset: int, size: int) -> int:
        return self.transport.msix.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.transport.msix.write(offset, size, value)


@dataclass
class VirtioPciState(TransportState):
    """The common configuration registers, queues, MSI-X vectors and table of one
    virtio-pci transport (its configuration space is saved with the bus, the
    device's own state by the device)."""

    config_vector: int
    queue_vectors: list[int]
    queues: list[QueueState] = field(default_factory=list)
    msix: MsixState | None = None


class VirtioPciTransport(VirtioTransport):
    """A virtio device as a PCI function; :attr:`function` goes on a PCI host."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory,
                 name: str | None = None) -> None:
        name = name or f"virtio-pci-{device.name}"
        super().__init__(device, memory, IrqLine(name=f"{name}.isr"), name)
        self.function = VirtioPciFunction(
            self, name=name, vendor_id=VIRTIO_PCI_VENDOR,
            device_id=VIRTIO_PCI_MODERN_DEVICE_BASE + device.device_id,
            class_code=CLASS_CODES.get(device.device_id, CLASS_OTHER),
            revision=VIRTIO_PCI_MODERN_REVISION, subsystem_vendor_id=QEMU_SUBSYSTEM_VENDOR,
            subsystem_id=QEMU_SUBSYSTEM_ID,
            bars=(Bar(MSIX_BAR, MSIX_BAR_SIZE, BarKind.MEM32, _MsixRegion(self)),
                  Bar(MODERN_BAR, BAR_SIZE, BarKind.MEM64, self, prefetchable=True)),
            interrupt_pin=1)
        # One vector per queue and one for configuration changes (QEMU: nvqs + 1).
        self.msix = Msix(self.function, len(self.queues) + 1, MSIX_BAR, MSIX_TABLE, MSIX_PBA)
        self.function.msix = self.msix
        self.irq.connect(self.function.set_intx)
        self._reset_registers()

    def _reset_registers(self) -> None:
        super()._reset_registers()
        self.config_vector = VIRTIO_MSI_NO_VECTOR
        self.queue_vectors = [VIRTIO_MSI_NO_VECTOR] * len(self.queues)

    # -- snapshots (kemu.state's convention) -------------------------------------------------
    def save(self) -> VirtioPciState:
        return VirtioPciState(1, self.status, self.driver_features, self.device_features_sel,
                              self.driver_features_sel, self.queue_sel, self.interrupt_status,
                              self.config_generation, self.config_vector,
                              list(self.queue_vectors), [q.save() for q in self.queues],
                              self.msix.save())

    def restore(self, state: VirtioPciState) -> None:
        """Registers, queues and MSI-X table, after the bus restored the configuration
        space; re-activates the device if DRIVER_OK was set (its own state follows)."""
        if state.version != 1 or len(state.queues) != len(self.queues) or \
                len(state.queue_vectors) != len(self.queues) or state.msix is None:
            raise VirtioError(f"{self.name}: incompatible virtio-pci state")
        self.reset()
        self._restore_registers(state)
        self.config_vector = self._set_vector(state.config_vector)
        self.queue_vectors = [self._set_vector(v) for v in state.queue_vectors]
        self.msix.restore(state.msix)
        self._restore_status(state)

    # -- interrupts: MSI-X while enabled, else INTx through ISR (4.1.4.5, 4.1.5.3) -------------
    def _interrupt(self, bit: int, queue_index: int | None) -> None:
        msix = getattr(self, "msix", None)
        if msix is None or not msix.enabled:
            super()._interrupt(bit, queue_index)
            return
        if bit == INT_CONFIG:
            self.interrupt_status |= INT_CONFIG     # the driver may still read it from ISR
            vector = self.config_vector
        else:
            vector = self.queue_vectors[queue_index]
        if vector != VIRTIO_MSI_NO_VECTOR:
            msix.notify(vector)

    def _update_irq(self) -> None:
        msix = getattr(self, "msix", None)
        self.irq.set(self.interrupt_status != 0 and (msix is None or not msix.enabled))

    def _set_vector(self, value: int) -> int:
        """A vector the device can use, or NO_VECTOR (4.1.4.3.1: read back to check)."""
        return value if value < self.msix.vectors else VIRTIO_MSI_NO_VECTOR

    # -- the BAR (Device protocol) ---------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset < ISR_OFFSET:
            return self._common_read(offset, size)
        if offset < DEVICE_OFFSET:
            return self._isr_read() if offset == ISR_OFFSET else 0
        if offset < NOTIFY_OFFSET:
            return self._config_read(offset - DEVICE_OFFSET, size)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < ISR_OFFSET:
            self._common_write(offset, size, value)
        elif DEVICE_OFFSET <= offset < NOTIFY_OFFSET:
            self._config_write(offset - DEVICE_OFFSET, size, value)
        elif offset >= NOTIFY_OFFSET:
            relative = offset - NOTIFY_OFFSET
            if relative % NOTIFY_OFF_MULTIPLIER == 0:
                self.notify(relative // NOTIFY_OFF_MULTIPLIER)

    def _isr_read(self) -> int:
        """ISR status: reading returns the bits and clears them (4.1.4.5.1)."""
        value, self.interrupt_status = self.interrupt_status, 0
        self._update_irq()
        return value

    # -- common configuration (4.1.4.3) ------------------------------------------------------
    def _field(self, offset: int, size: int) -> int | None:
        """The common-config field an access hits (64-bit fields: either half too)."""
        if _FIELD_SIZES.get(offset) == size:
            return offset
        if QUEUE_DESC <= offset < COMMON_CFG_SIZE and (size == 8 and offset % 8 == 0
                                                       or size == 4 and offset % 4 == 0):
            return offset
        self.bad_accesses += 1
        return None

    def _common_read(self, offset: int, size: int) -> int:
        field = self._field(offset, size)
        q = self._queue()
        if field is None:
            return 0
        if field == DEVICE_FEATURE_SELECT:
            return self.device_features_sel
        if field == DEVICE_FEATURE:
            if self.device_features_sel > 1:
                return 0
            return (self.device_features >> (32 * self.device_features_sel)) & 0xFFFFFFFF
        if field == DRIVER_FEATURE_SELECT:
            return self.driver_features_sel
        if field == DRIVER_FEATURE:
            if self.driver_features_sel > 1:
                return 0
            return (self.driver_features >> (32 * self.driver_features_sel)) & 0xFFFFFFFF
        if field == CONFIG_MSIX_VECTOR:
            return self.config_vector
        if field == NUM_QUEUES:
            return len(self.queues)
        if field == DEVICE_STATUS:
            return self.status
        if field == CONFIG_GENERATION:
            return self.config_generation & 0xFF
        if field == QUEUE_SELECT:
            return self.queue_sel
        if q is None:
            return 0
        if field == QUEUE_SIZE:
            return q.size
        if field == QUEUE_ENABLE:
            return int(q.ready)
        if field == QUEUE_MSIX_VECTOR:
            return self.queue_vectors[self.queue_sel]
        if field == QUEUE_NOTIFY_OFF:
            return self.queue_sel
        base = field & ~7
        value = getattr(q, _QUEUE_ADDRS[base])
        return (value >> (8 * (field - base))) & ((1 << (8 * size)) - 1)

    def _common_write(self, offset: int, size: int, value: int) -> None:
        field = self._field(offset, size)
        if field is None:
            return
        q = self._queue()
        if field == DEVICE_FEATURE_SELECT:
            self.device_features_sel = value
        elif field == DRIVER_FEATURE_SELECT:
            self.driver_features_sel = value
        elif field == DRIVER_FEATURE:
            if self.driver_features_sel <= 1 and not self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK):
                shift = 32 * self.driver_features_sel
                self.driver_features = ((self.driver_features & ~(0xFFFFFFFF << shift))
                                        | (value << shift))
        elif field == DEVICE_STATUS:
            self._write_status(value)
        elif field == QUEUE_SELECT:
            self.queue_sel = value
        elif field == CONFIG_MSIX_VECTOR:
            self.config_vector = self._set_vector(value)
        elif q is None:
            return
        elif field == QUEUE_MSIX_VECTOR:
            self.queue_vectors[self.queue_sel] = self._set_vector(value)
        elif q.ready:
            return      # queue registers are fixed once the queue is enabled (4.1.4.3.2)
        elif field == QUEUE_SIZE:
            q.size = value
        elif field == QUEUE_ENABLE:
            if value == 1:
                self._write_queue_ready(q, 1)
        elif field in _QUEUE_ADDRS or field - 4 in _QUEUE_ADDRS:
            base = field & ~7
            attr, shift = _QUEUE_ADDRS[base], 8 * (field - base)
            mask = ((1 << (8 * size)) - 1) << shift
            setattr(q, attr, (getattr(q, attr) & ~mask) | ((value << shift) & mask))
        # Read-only fields (device_feature, num_queues, ...): ignored.
