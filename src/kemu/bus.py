"""Address ranges mapped to devices.

A bus (MMIO or x86 port I/O) maps non-overlapping ranges to devices and
dispatches accesses to them with the offset inside the range.  Accesses that
hit nothing read as zero and are ignored on write, as on real buses without a
responder; on a bus made with ``decode_errors`` they raise :class:`DecodeError`
instead, for the CPU to report as the architecture says (QEMU's unassigned
MMIO on Arm: a synchronous external abort).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from kemu.devices.base import Device
from kemu.errors import BusError


class DecodeError(Exception):
    """An access no device decodes, on a bus that reports them (``decode_errors``)."""


@dataclass(frozen=True)
class Mapping:
    base: int
    size: int
    device: Device

    @property
    def end(self) -> int:
        return self.base + self.size


class Bus:
    """A set of non-overlapping ``[base, base+size)`` ranges, each a device."""

    def __init__(self, name: str, limit: int = 1 << 64, decode_errors: bool = False) -> None:
        self.name = name
        self.limit = limit
        self.decode_errors = decode_errors
        self._bases: list[int] = []
        self._maps: list[Mapping] = []
        #: Count of accesses that hit no device (for diagnostics).
        self.unassigned = 0

    def map(self, base: int, size: int, device: Device) -> Mapping:
        if size <= 0 or base < 0 or base + size > self.limit:
            raise BusError(f"{self.name}: bad range {base:#x}+{size:#x} for {device.name}")
        i = bisect.bisect_right(self._bases, base)
        for neighbour in self._maps[max(0, i - 1):i + 1]:
            if base < neighbour.end and neighbour.base < base + size:
                raise BusError(
                    f"{self.name}: {device.name} at {base:#x}+{size:#x} overlaps "
                    f"{neighbour.device.name} at {neighbour.base:#x}+{neighbour.size:#x}")
        mapping = Mapping(base, size, device)
        self._bases.insert(i, base)
        self._maps.insert(i, mapping)
        return mapping

    def unmap(self, mapping: Mapping) -> None:
        """Remove a mapping made by :meth:`map` (a PCI BAR moving, decoding turned off)."""
        i = self._maps.index(mapping)
        del self._maps[i]
        del self._bases[i]

    @property
    def mappings(self) -> tuple[Mapping, ...]:
        return tuple(self._maps)

    def find(self, addr: int) -> Mapping | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            m = self._maps[i]
            if addr < m.end:
                return m
        return None

    def read(self, addr: int, size: int) -> int:
        m = self.find(addr)
        if m is None or addr + size > m.end:
            self._unassigned(addr)
            return 0
        return m.device.read(addr - m.base, size)

    def write(self, addr: int, size: int, value: int) -> None:
        m = self.find(addr)
        if m is None or addr + size > m.end:
            self._unassigned(addr)
            return
        m.device.write(addr - m.base, size, value)

    def _unassigned(self, addr: int) -> None:
        self.unassigned += 1
        if self.decode_errors:
            raise DecodeError(f"{self.name}: nothing at {addr:#x}")
