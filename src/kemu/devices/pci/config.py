"""One PCI function's configuration space (PCI Local Bus 3.0 section 6; PCIe 4.0 section 7).

:class:`PciFunction` holds the 4 KiB extended configuration space of a
type 0 (endpoint) header with a write mask per byte, as hardware decodes
it: read-only fields ignore writes, the Status register's error bits are
write-one-to-clear, and a Base Address Register keeps only the address bits
its size allows, so writing all-ones and reading back gives the size
(6.2.5.1).  Capabilities (6.7) are chained from Capabilities Pointer in the
order added.

The function's interrupt pin (INTx) is driven through :meth:`set_intx`;
the level reaches :attr:`intx_out` unless Command.Interrupt Disable is set,
and Status.Interrupt Status shows the pending level either way (6.2.2,
6.2.3).  A host watching BARs and Command registers sets :attr:`on_decode_change`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from kemu.devices.base import Device, IrqLine

CONFIG_SPACE_SIZE = 0x1000

# Type 0 header (6.1, figure 6-1).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CACHE_LINE_SIZE = 0x0C
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
EXPANSION_ROM = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
NUM_BARS = 6

# Command register bits (6.2.2).
COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_PARITY = 1 << 6
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = (COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_PARITY
                    | COMMAND_SERR | COMMAND_INTX_DISABLE)

# Status register bits (6.2.3).
STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4
STATUS_W1C = 0xF900   # parity, target/master aborts, SERR, parity error: write 1 to clear

# BAR type bits (6.2.5.1).
BAR_IO = 0x1
BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCH = 0x8

FIRST_CAPABILITY = 0x40

#: The subsystem IDs QEMU gives its PCI devices (hw/pci/pci.c: Red Hat / Qumranet, QEMU).
QEMU_SUBSYSTEM_VENDOR = 0x1AF4
QEMU_SUBSYSTEM_ID = 0x1100
CAP_ID_VENDOR = 0x09


class BarKind(Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


@dataclass
class PciFunctionState:
    """A function's configuration space as plain data: the bytes software can change
    (Command, BARs, Interrupt Line, capability control fields) and the INTx level."""

    version: int
    space: bytes
    intx_level: bool


@dataclass(frozen=True)
class Bar:
    """A Base Address Register and the registers it decodes."""

    index: int
    size: int
    kind: BarKind
    region: Device
    prefetchable: bool = False

    def __post_init__(self) -> None:
        least = 4 if self.kind is BarKind.IO else 16
        if self.size < least or self.size & (self.size - 1):
            raise ValueError(f"BAR{self.index}: size {self.size:#x} is not a power of two >= {least}")
        last = self.index + (1 if self.kind is BarKind.MEM64 else 0)
        if not 0 <= self.index or last >= NUM_BARS:
            raise ValueError(f"BAR{self.index}: no such BAR in a type 0 header")

    @property
    def type_bits(self) -> int:
        if self.kind is BarKind.IO:
            return BAR_IO
        return ((BAR_MEM_TYPE_64 if self.kind is BarKind.MEM64 else 0)
                | (BAR_MEM_PREFETCH if self.prefetchable else 0))


class PciFunction:
    """Configuration space of one function with a type 0 header."""

    def __init__(self, name: str, vendor_id: int, device_id: int, class_code: int,
                 revision: int = 0, subsystem_vendor_id: int = 0, subsystem_id: int = 0,
                 bars: tuple[Bar, ...] = (), interrupt_pin: int = 0) -> None:
        if not 0 <= interrupt_pin <= 4:
            raise ValueError("interrupt pin is 0 (none) or 1-4 (INTA-INTD)")
        self.name = name
        self.bars = {bar.index: bar for bar in bars}
        self.interrupt_pin = interrupt_pin
        self.space = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        self.w1cmask = bytearray(CONFIG_SPACE_SIZE)
        self._put(VENDOR_ID, 2, vendor_id)
        self._put(DEVICE_ID, 2, device_id)
        self._put(REVISION_ID, 1, revision)
        self._put(CLASS_PROG, 3, class_code)
        self._put(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._put(SUBSYSTEM_ID, 2, subsystem_id)
        self._put(INTERRUPT_PIN, 1, interrupt_pin)
        self._mask(COMMAND, 2, COMMAND_WRITABLE)
        self._mask(CACHE_LINE_SIZE, 1, 0xFF)
        self._mask(INTERRUPT_LINE, 1, 0xFF)
        self.w1cmask[STATUS:STATUS + 2] = STATUS_W1C.to_bytes(2, "little")
        for bar in bars:
            reg = BAR0 + 4 * bar.index
            self._put(reg, 4, bar.type_bits)
            low_bits = 0x3 if bar.kind is BarKind.IO else 0xF
            self._mask(reg, 4, ~(bar.size - 1) & ~low_bits & 0xFFFFFFFF)
            if bar.kind is BarKind.MEM64:
                self._mask(reg + 4, 4, (~(bar.size - 1) >> 32) & 0xFFFFFFFF)
        self._last_cap = 0
        self._next_cap = FIRST_CAPABILITY
        self.intx_level = False
        #: Where the (unmasked) INTx level goes; the host connects it.
        self.intx_out = IrqLine(name=f"{name}.intx")
        #: Called after a write that may change what the BARs decode.
        self.on_decode_change: Callable[[PciFunction], None] = lambda fn: None
        #: Called after every configuration write (capabilities watching their registers).
        self.on_config_write: list[Callable[[], None]] = []
        #: Called on a conventional reset (capabilities with state outside config space).
        self.on_reset: list[Callable[[], None]] = []
        #: The function's MSI-X (:mod:`.msix`), if it has one; the host connects its messages.
        self.msix = None

    # -- building ------------------------------------------------------------------------
    def _put(self, offset: int, size: int, value: int) -> None:
        self.space[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _mask(self, offset: int, size: int, mask: int) -> None:
        self.wmask[offset:offset + size] = (mask & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability (ID, next pointer, then ``body``); returns its offset.

        ``writable`` is a write mask over ``body`` (default: read-only).
        """
        length = 2 + len(body)
        offset = self._next_cap
        if offset + length > 0x100:
            raise ValueError(f"{self.name}: no room for another capability")
        self.space[offset] = cap_id
        self.space[offset + 2:offset + length] = body
        if writable is not None:
            self.wmask[offset + 2:offset + 2 + len(writable)] = writable
        if self._last_cap:
            self.space[self._last_cap + 1] = offset
        else:
            self.space[CAPABILITIES_POINTER] = offset
            self._put(STATUS, 2, self._get(STATUS, 2) | STATUS_CAP_LIST)
        self._last_cap = offset
        self._next_cap = (offset + length + 3) & ~3
        return offset

    # -- registers -----------------------------------------------------------------------
    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.space[offset:offset + size], "little")

    @property
    def command(self) -> int:
        return self._get(COMMAND, 2)

    def config_read(self, offset: int, size: int) -> int:
        """A configuration read of 1, 2 or 4 bytes inside one dword (others read all-ones)."""
        if size not in (1, 2, 4) or offset % size or not 0 <= offset <= CONFIG_SPACE_SIZE - size:
            return (1 << (8 * size)) - 1 if size in (1, 2, 4) else 0
        return self._get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A configuration write: only the bits the write mask allows change."""
        if size not in (1, 2, 4) or offset % size or not 0 <= offset <= CONFIG_SPACE_SIZE - size:
            return
        old_command = self.command
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            at = offset + i
            wm, w1c = self.wmask[at], self.w1cmask[at]
            self.space[at] = (self.space[at] & ~wm) | (byte & wm)
            self.space[at] &= ~(byte & w1c) & 0xFF
        if offset < BAR0 + 4 * NUM_BARS and offset + size > COMMAND:
            if (self.command ^ old_command) & COMMAND_INTX_DISABLE:
                self._drive_intx()
            self.on_decode_change(self)
        for hook in self.on_config_write:
            hook()

    # -- BARs ----------------------------------------------------------------------------
    def bar_address(self, bar: Bar) -> int:
        """The address programmed into ``bar`` (without its type bits)."""
        reg = BAR0 + 4 * bar.index
        if bar.kind is BarKind.IO:
            return self._get(reg, 4) & ~0x3
        address = self._get(reg, 4) & ~0xF
        if bar.kind is BarKind.MEM64:
            address |= self._get(reg + 4, 4) << 32
        return address

    def decoding(self, bar: Bar) -> bool:
        """Whether the Command register enables the BAR's address space (6.2.2)."""
        bit = COMMAND_IO if bar.kind is BarKind.IO else COMMAND_MEMORY
        return bool(self.command & bit)

    # -- INTx ----------------------------------------------------------------------------
    def set_intx(self, level: bool) -> None:
        """The function asserts (or deasserts) its interrupt pin."""
        self.intx_level = bool(level)
        status = self._get(STATUS, 2)
        self._put(STATUS, 2, status | STATUS_INTERRUPT if level else status & ~STATUS_INTERRUPT)
        self._drive_intx()

    def _drive_intx(self) -> None:
        self.intx_out.set(self.intx_level and not self.command & COMMAND_INTX_DISABLE)

    # -- snapshots (kemu.state's convention) -----------------------------------------------
    def save(self) -> PciFunctionState:
        return PciFunctionState(1, bytes(self.space), self.intx_level)

    def restore(self, state: PciFunctionState) -> None:
        """The saved writable bytes over this function's own read-only ones (IDs, class,
        capability layout stay this function's); BARs are mapped again."""
        if state.version != 1 or len(state.space) != CONFIG_SPACE_SIZE:
            raise ValueError(f"{self.name}: incompatible PCI function state")
        for at in range(CONFIG_SPACE_SIZE):
            mask = self.wmask[at] | self.w1cmask[at]
            if mask:
                self.space[at] = (self.space[at] & ~mask) | (state.space[at] & mask)
        self.set_intx(state.intx_level)
        self.on_decode_change(self)

    def reset(self) -> None:
        """Conventional reset: decoding off, BARs and writable fields cleared."""
        for at in range(CONFIG_SPACE_SIZE):
            if self.wmask[at]:
                self.space[at] &= ~self.wmask[at] & 0xFF
        self._put(STATUS, 2, self._get(STATUS, 2) & ~STATUS_W1C)
        for hook in self.on_reset:
            hook()
        self._drive_intx()
        self.on_decode_change(self)
