"""A guest-side PCI and virtio-pci driver for unit tests (in the manner of libqos).

:class:`EcamDriver` enumerates bus 0 through ECAM, sizes BARs by writing
all-ones, assigns them from a window and enables decoding, as firmware or
Linux does.  :class:`VirtioPciDriver` finds the virtio capabilities
(VIRTIO 1.2 4.1.4) and walks the initialization of 3.1.1 through the common
configuration structure; it offers the interface of
:class:`virtio_driver.VirtioMmioDriver` so the same queue helpers work.
"""

from __future__ import annotations

from virtio_driver import Allocator, DriverQueue, VirtioDriver

from kemu.bus import Bus
from kemu.devices.pci import config as c
from kemu.devices.pci.host import PciHost
from kemu.devices.virtio import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_FEATURES_OK,
)
from kemu.devices.virtio import pci as vp
from kemu.memory import GuestMemory

ECAM_BASE = 0x3F00_0000


class EcamDriver:
    """Configuration accesses through the host's ECAM window, mapped on ``bus``."""

    def __init__(self, host: PciHost, bus: Bus) -> None:
        self.host = host
        self.bus = bus
        bus.map(ECAM_BASE, 1 << 28, host.ecam)

    def addr(self, device: int, reg: int, bus: int = 0, function: int = 0) -> int:
        return ECAM_BASE + (bus << 20 | device << 15 | function << 12 | reg)

    def read(self, device: int, reg: int, size: int = 4, **kw) -> int:
        return self.bus.read(self.addr(device, reg, **kw), size)

    def write(self, device: int, reg: int, size: int, value: int, **kw) -> None:
        self.bus.write(self.addr(device, reg, **kw), size, value)

    def devices(self) -> list[int]:
        return [d for d in range(32) if self.read(d, c.VENDOR_ID, 2) != 0xFFFF]

    def size_bar(self, device: int, index: int) -> tuple[int, int]:
        """(size, type bits) of BAR ``index``, found by writing all-ones (6.2.5.1)."""
        reg = c.BAR0 + 4 * index
        old = self.read(device, reg)
        self.write(device, reg, 4, 0xFFFFFFFF)
        low = self.read(device, reg)
        self.write(device, reg, 4, old)
        if low == 0:
            return 0, 0
        kind = low & (0x3 if low & c.BAR_IO else 0xF)
        mask = low & ~(0x3 if low & c.BAR_IO else 0xF)
        if kind & c.BAR_MEM_TYPE_64:
            old_hi = self.read(device, reg + 4)
            self.write(device, reg + 4, 4, 0xFFFFFFFF)
            mask |= self.read(device, reg + 4) << 32
            self.write(device, reg + 4, 4, old_hi)
            return (~mask & (2**64 - 1)) + 1, kind
        return (~mask & 0xFFFFFFFF) + 1, kind

    def set_bar(self, device: int, index: int, address: int) -> None:
        reg = c.BAR0 + 4 * index
        self.write(device, reg, 4, address & 0xFFFFFFFF)
        if self.read(device, reg) & c.BAR_MEM_TYPE_64:
            self.write(device, reg + 4, 4, address >> 32)

    def enable(self, device: int, bits: int = c.COMMAND_MEMORY | c.COMMAND_MASTER) -> None:
        self.write(device, c.COMMAND, 2, self.read(device, c.COMMAND, 2) | bits)

    def capabilities(self, device: int) -> list[int]:
        """Offsets of the capability list, walked from Capabilities Pointer (6.7)."""
        if not self.read(device, c.STATUS, 2) & c.STATUS_CAP_LIST:
            return []
        out, at = [], self.read(device, c.CAPABILITIES_POINTER, 1)
        while at and len(out) < 48:
            out.append(at)
            at = self.read(device, at + 1, 1)
        return out


class VirtioPciDriver(VirtioDriver):
    """Drives a virtio-pci function on ``ecam``'s bus like Linux's virtio_pci_modern."""

    def __init__(self, ecam: EcamDriver, device: int, memory: GuestMemory,
                 bar_address: int = 0x1000_0000, alloc: Allocator | None = None) -> None:
        self.ecam = ecam
        self.device = device
        self.memory = memory
        self.alloc = alloc or Allocator(memory)
        self.queues: dict[int, DriverQueue] = {}
        self.caps: dict[int, tuple[int, int, int, int]] = {}   # cfg_type -> (cap, bar, off, len)
        for cap in ecam.capabilities(device):
            if ecam.read(device, cap, 1) != c.CAP_ID_VENDOR:
                continue
            cfg_type = ecam.read(device, cap + 3, 1)
            self.caps.setdefault(cfg_type, (cap, ecam.read(device, cap + 4, 1),
                                            ecam.read(device, cap + 8), ecam.read(device, cap + 12)))
        _, bar, _, _ = self.caps[vp.VIRTIO_PCI_CAP_COMMON_CFG]
        ecam.set_bar(device, bar, bar_address)
        ecam.enable(device)
        self.bar = bar_address
        notify_cap = self.caps[vp.VIRTIO_PCI_CAP_NOTIFY_CFG][0]
        self.notify_multiplier = ecam.read(device, notify_cap + 16)

    def _at(self, cfg_type: int, offset: int) -> int:
        return self.bar + self.caps[cfg_type][2] + offset

    def rc(self, offset: int, size: int) -> int:
        return self.ecam.bus.read(self._at(vp.VIRTIO_PCI_CAP_COMMON_CFG, offset), size)

    def wc(self, offset: int, size: int, value: int) -> None:
        self.ecam.bus.write(self._at(vp.VIRTIO_PCI_CAP_COMMON_CFG, offset), size, value)

    @property
    def status(self) -> int:
        return self.rc(vp.DEVICE_STATUS, 1)

    def set_status(self, bits: int) -> None:
        self.wc(vp.DEVICE_STATUS, 1, self.status | bits)

    def device_features(self) -> int:
        self.wc(vp.DEVICE_FEATURE_SELECT, 4, 0)
        lo = self.rc(vp.DEVICE_FEATURE, 4)
        self.wc(vp.DEVICE_FEATURE_SELECT, 4, 1)
        return lo | self.rc(vp.DEVICE_FEATURE, 4) << 32

    def negotiate(self, features: int | None = None, mask: int = ~0) -> bool:
        self.wc(vp.DEVICE_STATUS, 1, 0)
        assert self.status == 0
        self.set_status(STATUS_ACKNOWLEDGE)
        self.set_status(STATUS_DRIVER)
        if features is None:
            features = self.device_features() & mask
        for sel in (0, 1):
            self.wc(vp.DRIVER_FEATURE_SELECT, 4, sel)
            self.wc(vp.DRIVER_FEATURE, 4, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.set_status(STATUS_FEATURES_OK)
        return bool(self.status & STATUS_FEATURES_OK)

    def setup_queue(self, index: int, size: int | None = None) -> DriverQueue:
        self.wc(vp.QUEUE_SELECT, 2, index)
        assert self.rc(vp.QUEUE_ENABLE, 2) == 0
        qmax = self.rc(vp.QUEUE_SIZE, 2)
        assert qmax, f"queue {index} not available"
        size = size or qmax
        desc = self.alloc.alloc(16 * size, 16)
        avail = self.alloc.alloc(6 + 2 * size, 2)
        used = self.alloc.alloc(6 + 8 * size, 4)
        self.wc(vp.QUEUE_SIZE, 2, size)
        for field, addr in ((vp.QUEUE_DESC, desc), (vp.QUEUE_DRIVER, avail),
                            (vp.QUEUE_DEVICE, used)):
            self.wc(field, 4, addr & 0xFFFFFFFF)       # as Linux: two 32-bit halves
            self.wc(field + 4, 4, addr >> 32)
        self.wc(vp.QUEUE_ENABLE, 2, 1)
        q = DriverQueue(self, index, size, desc, avail, used)
        q.notify_off = self.rc(vp.QUEUE_NOTIFY_OFF, 2)
        self.queues[index] = q
        return q

    def kick(self, index: int) -> None:
        off = self.queues[index].notify_off * self.notify_multiplier
        self.ecam.bus.write(self._at(vp.VIRTIO_PCI_CAP_NOTIFY_CFG, off), 2, index)

    def isr(self) -> int:
        return self.ecam.bus.read(self._at(vp.VIRTIO_PCI_CAP_ISR_CFG, 0), 1)

    def config(self, offset: int, size: int) -> int:
        return self.ecam.bus.read(self._at(vp.VIRTIO_PCI_CAP_DEVICE_CFG, offset), size)
