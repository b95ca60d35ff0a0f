"""ARM Generic Interrupt Controller, architecture version 2 (GICv2).

Register names and semantics follow the ARM GIC Architecture Specification
v2 (IHI 0048B): chapter 4.3 (Distributor) and 4.4 (CPU interface).  The model
keeps one bank of SGI/PPI state (INTIDs 0-31) per CPU and a shared bank of
SPIs.  Security extensions are not implemented: all interrupts are Group 0
for the purposes of signalling, as a non-secure-only GIC appears to Linux.

Each CPU's interrupt request output is an :class:`IrqLine` handed in by the
board (the accelerator turns it into an IRQ exception).
"""

from __future__ import annotations

from dataclasses import dataclass

from kemu.devices.base import IrqLine
from kemu.devices.gic.core import GIC_INTERNAL, IDLE_PRIORITY, SPURIOUS, GicCore, _Irq, bitmap_register

# Distributor registers (IHI 0048B table 4-1)
GICD_CTLR = 0x000
GICD_TYPER = 0x004
GICD_IIDR = 0x008
GICD_IGROUPR = 0x080
GICD_ISENABLER = 0x100
GICD_ICENABLER = 0x180
GICD_ISPENDR = 0x200
GICD_ICPENDR = 0x280
GICD_ISACTIVER = 0x300
GICD_ICACTIVER = 0x380
GICD_IPRIORITYR = 0x400
GICD_ITARGETSR = 0x800
GICD_ICFGR = 0xC00
GICD_SGIR = 0xF00
GICD_CPENDSGIR = 0xF10
GICD_SPENDSGIR = 0xF20
GICD_PIDR2 = 0xFE8

# CPU interface registers (IHI 0048B table 4-2)
GICC_CTLR = 0x00
GICC_PMR = 0x04
GICC_BPR = 0x08
GICC_IAR = 0x0C
GICC_EOIR = 0x10
GICC_RPR = 0x14
GICC_HPPIR = 0x18
GICC_ABPR = 0x1C
GICC_AIAR = 0x20
GICC_AEOIR = 0x24
GICC_AHPPIR = 0x28
GICC_APR0 = 0xD0
GICC_IIDR = 0xFC
GICC_DIR = 0x1000

IIDR_ARM = 0x0200043B  # implementer ARM, GIC-400 style product id


@dataclass
class GicV2State:
    version: int
    ctlr: int
    irqs: list[list[dict]]
    cpus: list[dict]


class GicV2(GicCore):
    """A GICv2 distributor and ``num_cpus`` CPU interfaces."""

    def __init__(self, outputs: list[IrqLine], num_irqs: int = 128, name: str = "gic") -> None:
        if num_irqs % 32 or not 32 <= num_irqs <= 1020:
            raise ValueError("GICv2 supports 32..1020 interrupts in multiples of 32")
        super().__init__(outputs, num_irqs, name)

    def distributor(self) -> "GicDistributor":
        return GicDistributor(self)

    def cpu_interface(self) -> "GicCpuInterface":
        return GicCpuInterface(self)

    def _targets(self, cpu: int, intid: int, irq: _Irq) -> bool:
        return super()._targets(cpu, intid, irq) or self.num_cpus == 1

    def _sgi_acknowledged(self, irq: _Irq) -> int:
        """GICC_IAR[12:10] is the source CPU; the SGI stays pending from the others."""
        source = (irq.sgi_sources & -irq.sgi_sources).bit_length() - 1
        irq.sgi_sources &= ~(1 << source)
        irq.pending = bool(irq.sgi_sources)
        return source << 10

    def send_sgi(self, source: int, value: int) -> None:
        """GICD_SGIR write (IHI 0048B 4.3.15)."""
        intid = value & 0xF
        mode = (value >> 24) & 3
        if mode == 0:
            targets = (value >> 16) & 0xFF
        elif mode == 1:
            targets = ((1 << self.num_cpus) - 1) & ~(1 << source)
        elif mode == 2:
            targets = 1 << source
        else:
            return
        for cpu in range(self.num_cpus):
            if targets & (1 << cpu):
                irq = self._banks[cpu][intid]
                irq.sgi_sources |= 1 << source
                irq.pending = True
                self._assert(cpu, intid)
        self.update()

    # -- state --------------------------------------------------------------------
    def save(self) -> GicV2State:
        banks, cpus = self._save_core()
        return GicV2State(1, self.ctlr, banks, cpus)

    def restore(self, state: GicV2State) -> None:
        self._restore_core(state.version, state.ctlr, state.irqs, state.cpus)


class GicDistributor:
    """The GICD register frame (4 KiB, mapped in a 64 KiB window)."""

    def __init__(self, gic: GicV2, cpu: int = 0) -> None:
        self.gic = gic
        self.name = f"{gic.name}-distributor"
        self.cpu = cpu  # accessing CPU (banked registers); single-CPU boards use 0

    def read(self, offset: int, size: int) -> int:
        g = self.gic
        cpu = self.cpu
        if offset == GICD_CTLR:
            return g.ctlr
        if offset == GICD_TYPER:
            return ((g.num_irqs // 32) - 1) | ((g.num_cpus - 1) << 5)
        if offset == GICD_IIDR:
            return IIDR_ARM
        if (ranged := bitmap_register(offset, aligned=False)) is not None:
            return g._bits(cpu, ranged[1], 32, ranged[0])
        if GICD_IPRIORITYR <= offset < GICD_IPRIORITYR + 1020:
            return self._bytes(offset - GICD_IPRIORITYR, size, lambda irq, _: irq.priority)
        if GICD_ITARGETSR <= offset < GICD_ITARGETSR + 1020:
            return self._bytes(offset - GICD_ITARGETSR, size,
                               lambda irq, i: (1 << cpu) if i < GIC_INTERNAL else irq.targets)
        if GICD_ICFGR <= offset < GICD_ICFGR + 0x100:
            return g._config_bits(cpu, (offset - GICD_ICFGR) * 4)
        if GICD_CPENDSGIR <= offset < GICD_CPENDSGIR + 0x20:
            return self._bytes((offset - GICD_CPENDSGIR) % 16, size,
                               lambda irq, _: irq.sgi_sources)
        if offset == GICD_PIDR2:
            return 0x2 << 4
        return 0

    def _bytes(self, first: int, size: int, get) -> int:
        return self.gic._bytes(self.cpu, first, size, get)

    def write(self, offset: int, size: int, value: int) -> None:
        g = self.gic
        cpu = self.cpu
        if offset == GICD_CTLR:
            g.ctlr = value & 1
            g.update()
        elif (ranged := bitmap_register(offset, aligned=False)) is not None:
            attr, first, state = ranged
            if state is None:
                g._set_groups(cpu, first, value)
            elif attr == "pending":
                # SGIs' pending state is set and cleared through GICD_[SC]PENDSGIR only.
                g._set_bits(cpu, max(first, 16), value >> (max(first, 16) - first), attr, state)
            else:
                g._set_bits(cpu, first, value, attr, state)
        elif GICD_IPRIORITYR <= offset < GICD_IPRIORITYR + 1020:
            g._set_priorities(cpu, offset - GICD_IPRIORITYR, size, value)
        elif GICD_ITARGETSR <= offset < GICD_ITARGETSR + 1020:
            first = offset - GICD_ITARGETSR
            for i in range(size):
                intid = first + i
                if GIC_INTERNAL <= intid < g.num_irqs:
                    g._irq(cpu, intid).targets = (value >> (8 * i)) & ((1 << g.num_cpus) - 1)
            g.update()
        elif GICD_ICFGR <= offset < GICD_ICFGR + 0x100:
            g._set_config(cpu, (offset - GICD_ICFGR) * 4, value)
        elif offset == GICD_SGIR:
            g.send_sgi(cpu, value)


class GicCpuInterface:
    """The GICC register frame of one CPU (8 KiB)."""

    def __init__(self, gic: GicV2, cpu: int = 0) -> None:
        self.gic = gic
        self.name = f"{gic.name}-cpu{cpu}"
        self.cpu = cpu

    def read(self, offset: int, size: int) -> int:
        g = self.gic
        cif = g._cpus[self.cpu]
        if offset == GICC_CTLR:
            return cif.ctlr
        if offset == GICC_PMR:
            return cif.pmr
        if offset == GICC_BPR:
            return cif.bpr
        if offset == GICC_ABPR:
            return cif.abpr
        if offset in (GICC_IAR, GICC_AIAR):
            return g.acknowledge(self.cpu)
        if offset == GICC_RPR:
            return cif.running_priority() & 0xFF if cif.active_stack else 0xFF
        if offset in (GICC_HPPIR, GICC_AHPPIR):
            return g.highest_pending(self.cpu)
        if offset == GICC_IIDR:
            return IIDR_ARM
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        g = self.gic
        cif = g._cpus[self.cpu]
        if offset == GICC_CTLR:
            cif.ctlr = value & 0x3FF
            g.update()
        elif offset == GICC_PMR:
            cif.pmr = value & 0xFF
            g.update()
        elif offset == GICC_BPR:
            cif.bpr = value & 7
        elif offset == GICC_ABPR:
            cif.abpr = value & 7
        elif offset in (GICC_EOIR, GICC_AEOIR):
            g.end_of_interrupt(self.cpu, value)
        elif offset == GICC_DIR:
            g.deactivate(self.cpu, value)
