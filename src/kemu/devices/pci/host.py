"""The generic ECAM PCI Express host bridge (QEMU's ``gpex``; PCIe 4.0 section 7.2.2).

:class:`PciHost` owns bus 0 of one PCI domain: up to 32 devices, one
function each.  Its :attr:`ecam` is the Enhanced Configuration Access
Mechanism window, where the offset encodes bus (bits 20-27), device (15-19),
function (12-14) and register (0-11); functions that do not exist read
all-ones, as a master abort does, and ignore writes.

A function's BAR is mapped into the board's bus while the function decodes
its address space (Command.Memory / Command.I/O) and the BAR lies wholly in
one of the host's windows (PCI address -> CPU address, as the device tree's
``ranges`` say); a BAR elsewhere, unprogrammed (0) or overlapping another
mapping stays unmapped, as an unreachable BAR is on real hardware.

INTx: device ``d``'s pin ``p`` (1-4) reaches the host's interrupt line
``(d + p - 1) mod 4``, the standard swizzle (PCI-to-PCI Bridge 1.2,
table 9-1) that QEMU's virt describes in its ``interrupt-map``; functions
sharing a line are wire-ORed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kemu.bus import Bus, Mapping
from kemu.devices.base import IrqLine
from kemu.devices.pci.config import (
    QEMU_SUBSYSTEM_ID,
    QEMU_SUBSYSTEM_VENDOR,
    Bar,
    BarKind,
    PciFunction,
    PciFunctionState,
)
from kemu.errors import BusError, ConfigError

log = logging.getLogger(__name__)

MAX_DEVICES = 32
NUM_INTX = 4

# QEMU's generic PCIe root (hw/pci-host/gpex.c: "gpex-root"): Red Hat's vendor ID.
GPEX_ROOT_VENDOR = 0x1B36
GPEX_ROOT_DEVICE = 0x0008
CLASS_BRIDGE_HOST = 0x060000


@dataclass(frozen=True)
class Window:
    """PCI addresses ``[pci_base, pci_base+size)`` seen by the CPU at ``cpu_base``."""

    io: bool
    pci_base: int
    cpu_base: int
    size: int

    def translate(self, address: int, size: int) -> int | None:
        if self.pci_base <= address and address + size <= self.pci_base + self.size:
            return self.cpu_base + (address - self.pci_base)
        return None


def swizzle(device: int, pin: int) -> int:
    """The host interrupt line (0-3) of ``device``'s pin ``pin`` (1-4: INTA-INTD)."""
    return (device + pin - 1) % NUM_INTX


class Ecam:
    """The ECAM window: configuration accesses by bus/device/function/register."""

    def __init__(self, host: PciHost, name: str = "pcie-ecam") -> None:
        self.host = host
        self.name = name

    def _target(self, offset: int) -> tuple[PciFunction | None, int]:
        bus, devfn, reg = offset >> 20, (offset >> 12) & 0xFF, offset & 0xFFF
        if bus != 0:
            return None, reg
        return self.host.functions.get(devfn), reg

    def read(self, offset: int, size: int) -> int:
        fn, reg = self._target(offset)
        if fn is None:
            return (1 << (8 * size)) - 1
        return fn.config_read(reg, size)

    def write(self, offset: int, size: int, value: int) -> None:
        fn, reg = self._target(offset)
        if fn is not None:
            fn.config_write(reg, size, value)


@dataclass
class PciHostState:
    """The configuration space of each function on the bus, by devfn."""

    version: int
    functions: dict[str, PciFunctionState]


class PciHost:
    """Bus 0 behind an ECAM window, with BAR windows into ``bus`` and four INTx lines."""

    def __init__(self, bus: Bus, windows: list[Window], intx: list[IrqLine]) -> None:
        if len(intx) != NUM_INTX:
            raise ValueError("a PCI host has four INTx lines")
        self.bus = bus
        self.windows = windows
        self.intx = intx
        self.functions: dict[int, PciFunction] = {}
        self.ecam = Ecam(self)
        self._mapped: dict[tuple[int, int], Mapping] = {}
        self._asserted: list[set[int]] = [set() for _ in range(NUM_INTX)]
        self.add(PciFunction("gpex-root", GPEX_ROOT_VENDOR, GPEX_ROOT_DEVICE,
                             CLASS_BRIDGE_HOST, subsystem_vendor_id=QEMU_SUBSYSTEM_VENDOR,
                             subsystem_id=QEMU_SUBSYSTEM_ID), device=0)

    # -- wiring --------------------------------------------------------------------------
    def free_slot(self) -> int:
        for device in range(MAX_DEVICES):
            if device << 3 not in self.functions:
                return device
        raise ConfigError("PCI bus pcie.0 is full (32 devices)")

    def add(self, fn: PciFunction, device: int | None = None) -> int:
        """Plug ``fn`` as function 0 of ``device`` (the next free slot if None)."""
        if device is None:
            device = self.free_slot()
        if not 0 <= device < MAX_DEVICES:
            raise ConfigError(f"PCI device number {device} is out of range (0-31)")
        devfn = device << 3
        if devfn in self.functions:
            raise ConfigError(f"PCI: slot {device} function 0 not available for {fn.name}, "
                              f"in use by {self.functions[devfn].name}")
        self.functions[devfn] = fn
        fn.on_decode_change = lambda _fn: self.update_mappings()
        if fn.msix is not None:     # an MSI is a memory write of the data to the address
            fn.msix.deliver = lambda address, data: self.bus.write(address, 4, data)
        if fn.interrupt_pin:
            line = swizzle(device, fn.interrupt_pin)
            fn.intx_out.connect(lambda level, devfn=devfn, line=line:
                                self._intx(devfn, line, level))
        return device

    # -- INTx ----------------------------------------------------------------------------
    def _intx(self, devfn: int, line: int, level: bool) -> None:
        asserted = self._asserted[line]
        if level:
            asserted.add(devfn)
        else:
            asserted.discard(devfn)
        self.intx[line].set(bool(asserted))

    # -- BARs ----------------------------------------------------------------------------
    def _placement(self, fn: PciFunction, bar: Bar) -> int | None:
        """Where the CPU sees ``bar`` now, or None when it decodes nothing reachable."""
        if not fn.decoding(bar):
            return None
        address = fn.bar_address(bar)
        if address == 0:
            return None
        for window in self.windows:
            if window.io == (bar.kind is BarKind.IO):
                cpu = window.translate(address, bar.size)
                if cpu is not None:
                    return cpu
        return None

    def update_mappings(self) -> None:
        """Bring the bus in line with every BAR and Command register."""
        wanted: dict[tuple[int, int], tuple[int, Bar]] = {}
        for devfn, fn in self.functions.items():
            for bar in fn.bars.values():
                cpu = self._placement(fn, bar)
                if cpu is not None:
                    wanted[(devfn, bar.index)] = (cpu, bar)
        for key, mapping in list(self._mapped.items()):
            if key not in wanted or wanted[key][0] != mapping.base:
                self.bus.unmap(mapping)
                del self._mapped[key]
        for key, (cpu, bar) in wanted.items():
            if key in self._mapped:
                continue
            try:
                self._mapped[key] = self.bus.map(cpu, bar.size, bar.region)
            except BusError as exc:
                log.info("PCI %02x.%d BAR%d left unmapped: %s", key[0] >> 3, key[0] & 7,
                         bar.index, exc)

    def bar_base(self, devfn: int, index: int) -> int | None:
        """The CPU address where a BAR is mapped now (None: unmapped)."""
        mapping = self._mapped.get((devfn, index))
        return mapping.base if mapping else None

    def reset(self) -> None:
        for fn in self.functions.values():
            fn.reset()
        self.update_mappings()

    # -- snapshots (kemu.state's convention) -----------------------------------------------
    def save(self) -> PciHostState:
        return PciHostState(1, {str(devfn): fn.save() for devfn, fn in self.functions.items()})

    def restore(self, state: PciHostState) -> None:
        """Every function's configuration space (BARs mapped as the guest left them)."""
        if state.version != 1 or sorted(state.functions) != sorted(map(str, self.functions)):
            raise ValueError("pcie.0: the saved functions are not this bus's")
        for devfn, fn in self.functions.items():
            fn.restore(state.functions[str(devfn)])
        self.update_mappings()
