"""A GICv3 redistributor (IHI 0069 12.10-12.11): one per CPU, two 64 KiB frames.

RD_base holds the control registers (GICR_CTLR, GICR_TYPER with the CPU's
affinity and Last, GICR_WAKER); SGI_base holds the CPU's SGI and PPI
registers (INTIDs 0-31: groups, enables, pending, active, priorities,
configuration).  No LPIs: GICR_PROPBASER/PENDBASER are RAZ/WI.
"""

from __future__ import annotations

from kemu.devices.gic.v3 import ID_REGS, IIDR, GicV3, read_bitmap, write_bitmap_at

FRAME = 0x10000
#: RD_base + SGI_base: the stride between redistributors without VLPIs.
STRIDE = 2 * FRAME

# RD_base frame
GICR_CTLR = 0x0000
GICR_IIDR = 0x0004
GICR_TYPER = 0x0008
GICR_STATUSR = 0x0010
GICR_WAKER = 0x0014
GICR_PROPBASER = 0x0070
GICR_PENDBASER = 0x0078

# SGI_base frame (offsets within it)
GICR_IGROUPR0 = 0x0080
GICR_ISENABLER0 = 0x0100
GICR_ICENABLER0 = 0x0180
GICR_IPRIORITYR = 0x0400
GICR_ICFGR0 = 0x0C00
GICR_ICFGR1 = 0x0C04

WAKER_PROCESSOR_SLEEP = 1 << 1
WAKER_CHILDREN_ASLEEP = 1 << 2
TYPER_LAST = 1 << 4


class GicV3Redistributor:
    """The two frames of CPU ``cpu``'s redistributor (128 KiB)."""

    def __init__(self, gic: GicV3, cpu: int) -> None:
        self.gic = gic
        self.cpu = cpu
        self.name = f"{gic.name}-redist{cpu}"

    def typer(self) -> int:
        """GICR_TYPER: Aff3.Aff2.Aff1.Aff0 [63:32], Processor_Number [23:8], Last."""
        aff = self.gic.affinities[self.cpu]
        aff32 = ((aff >> 32) & 0xFF) << 24 | (aff & 0xFFFFFF)
        last = TYPER_LAST if self.cpu == self.gic.num_cpus - 1 else 0
        return (aff32 << 32) | (self.cpu << 8) | last

    def read(self, offset: int, size: int) -> int:
        g = self.gic
        if offset >= FRAME:
            return self._read_sgi(offset - FRAME, size)
        if GICR_TYPER <= offset < GICR_TYPER + 8:
            shift = 8 * (offset - GICR_TYPER)
            return (self.typer() >> shift) & ((1 << (8 * size)) - 1)
        if offset == GICR_IIDR:
            return IIDR
        if offset == GICR_WAKER:
            return (WAKER_PROCESSOR_SLEEP | WAKER_CHILDREN_ASLEEP) if g.waker[self.cpu] else 0
        if offset in ID_REGS:
            return ID_REGS[offset]
        return 0   # GICR_CTLR (RWP 0, no LPIs), STATUSR, PROPBASER, PENDBASER

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= FRAME:
            self._write_sgi(offset - FRAME, size, value)
        elif offset == GICR_WAKER:
            self.gic.waker[self.cpu] = bool(value & WAKER_PROCESSOR_SLEEP)

    def _read_sgi(self, offset: int, size: int) -> int:
        g, cpu = self.gic, self.cpu
        bits = read_bitmap(g, cpu, offset)
        if bits is not None:
            return bits
        if GICR_IPRIORITYR <= offset < GICR_IPRIORITYR + 32:
            return g._bytes(cpu, offset - GICR_IPRIORITYR, size, lambda irq, _: irq.priority)
        if offset in (GICR_ICFGR0, GICR_ICFGR1):
            return g._config_bits(cpu, (offset - GICR_ICFGR0) * 4)
        return 0   # IGRPMODR0 and NSACR: RAZ/WI with one security state

    def _write_sgi(self, offset: int, size: int, value: int) -> None:
        g, cpu = self.gic, self.cpu
        if write_bitmap_at(g, cpu, offset, value):
            return
        if GICR_IPRIORITYR <= offset < GICR_IPRIORITYR + 32:
            g._set_priorities(cpu, offset - GICR_IPRIORITYR, size, value)
        elif offset in (GICR_ICFGR0, GICR_ICFGR1):
            g._set_config(cpu, (offset - GICR_ICFGR0) * 4, value)
