"""GICv2m: the MSI frame in front of a GICv2 (Arm Server Base System Architecture, GICv2m).

A frame turns a 32-bit write of an interrupt ID to MSI_SETSPI_NS into an
edge on that SPI, so a PCI function's MSI or MSI-X message (address: the
register, data: the INTID) raises an interrupt.  MSI_TYPER tells the driver
which SPIs the frame owns.  As QEMU's virt (hw/intc/arm_gicv2m.c): a 4 KiB
frame, SPIs 48 to 111 (INTIDs 80 to 143).
"""

from __future__ import annotations

from collections.abc import Callable

MSI_TYPER = 0x008
MSI_SETSPI_NS = 0x040
MSI_IIDR = 0xFCC
FRAME_SIZE = 0x1000
GIC_INTERNAL = 32


class GicV2m:
    """One GICv2m frame: ``raise_spi(n)`` pulses SPI ``n`` (INTID 32 + n)."""

    def __init__(self, raise_spi: Callable[[int], None], spi_base: int, count: int,
                 name: str = "gicv2m") -> None:
        self.raise_spi = raise_spi
        self.spi_base = spi_base
        self.count = count
        self.name = name
        #: Writes of an INTID the frame does not own (ignored).
        self.bad_messages = 0

    def read(self, offset: int, size: int) -> int:
        if size != 4:
            return 0
        if offset == MSI_TYPER:
            return (GIC_INTERNAL + self.spi_base) << 16 | self.count
        return 0    # MSI_IIDR 0: no implementer named; reserved registers

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != MSI_SETSPI_NS or size not in (2, 4):
            return
        spi = (value & 0x3FF) - GIC_INTERNAL - self.spi_base
        if 0 <= spi < self.count:
            self.raise_spi(self.spi_base + spi)
        else:
            self.bad_messages += 1
