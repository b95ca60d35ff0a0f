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
from kemu.state import check_version

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

SPURIOUS = 1023
IDLE_PRIORITY = 0x100  # running priority when nothing is active
GIC_INTERNAL = 32      # SGIs 0-15 and PPIs 16-31 are banked per CPU
IIDR_ARM = 0x0200043B  # implementer ARM, GIC-400 style product id


@dataclass
class _Irq:
    """State of one interrupt as seen by one CPU (banked) or all CPUs (SPI)."""

    enabled: bool = False
    pending: bool = False     # latched pending (edge, or set by software)
    active: bool = False
    level: bool = False       # input line level
    edge: bool = False        # ICFGR: True = edge-triggered
    priority: int = 0
    group: int = 0
    targets: int = 0          # SPIs: CPU target mask
    sgi_sources: int = 0      # SGIs: pending source CPU mask

    def is_pending(self) -> bool:
        return self.pending or (not self.edge and self.level)


@dataclass
class _CpuIf:
    ctlr: int = 0
    pmr: int = 0
    bpr: int = 2
    abpr: int = 3
    active_stack: list[tuple[int, int]] | None = None  # (intid, priority)

    def running_priority(self) -> int:
        return self.active_stack[-1][1] if self.active_stack else IDLE_PRIORITY


@dataclass
class GicV2State:
    version: int
    ctlr: int
    irqs: list[list[dict]]
    cpus: list[dict]


class GicV2:
    """A GICv2 distributor and ``num_cpus`` CPU interfaces."""

    def __init__(self, outputs: list[IrqLine], num_irqs: int = 128, name: str = "gic") -> None:
        if num_irqs % 32 or not 32 <= num_irqs <= 1020:
            raise ValueError("GICv2 supports 32..1020 interrupts in multiples of 32")
        self.name = name
        self.outputs = outputs
        self.num_cpus = len(outputs)
        self.num_irqs = num_irqs
        self.reset()

    def reset(self) -> None:
        self.ctlr = 0
        # self._banks[cpu][intid] for intid < 32; self._spis[intid - 32]
        self._banks = [[_Irq(edge=(i < 16), enabled=(i < 16)) for i in range(GIC_INTERNAL)]
                       for _ in range(self.num_cpus)]
        self._spis = [_Irq() for _ in range(self.num_irqs - GIC_INTERNAL)]
        self._cpus = [_CpuIf(active_stack=[]) for _ in range(self.num_cpus)]
        self._rebuild_asserted()
        self.update()

    def _rebuild_asserted(self) -> None:
        """Which interrupts may be pending: an interrupt's pending state or
        input level only becomes true through :meth:`_assert`, and the scan
        in :meth:`_best` forgets the ones it finds no longer pending, so the
        scan looks at a handful of interrupts instead of all of them."""
        self._asserted = [{i for i, irq in enumerate(bank) if irq.pending or irq.level}
                          for bank in self._banks]
        self._asserted_spis = {n for n, irq in enumerate(self._spis) if irq.pending or irq.level}

    def _assert(self, cpu: int, intid: int) -> None:
        if intid < GIC_INTERNAL:
            self._asserted[cpu].add(intid)
        else:
            self._asserted_spis.add(intid - GIC_INTERNAL)

    # -- views ----------------------------------------------------------------
    def _irq(self, cpu: int, intid: int) -> _Irq:
        return self._banks[cpu][intid] if intid < GIC_INTERNAL else self._spis[intid - GIC_INTERNAL]

    def distributor(self) -> "GicDistributor":
        return GicDistributor(self)

    def cpu_interface(self) -> "GicCpuInterface":
        return GicCpuInterface(self)

    # -- inputs -------------------------------------------------------------------
    def set_spi(self, spi: int, level: bool) -> None:
        """Drive SPI number ``spi`` (INTID 32 + spi)."""
        irq = self._spis[spi]
        if irq.edge and level and not irq.level:
            irq.pending = True
        irq.level = level
        if level:
            self._assert(0, GIC_INTERNAL + spi)
        self.update()

    def set_ppi(self, cpu: int, ppi: int, level: bool) -> None:
        """Drive PPI number ``ppi`` (INTID 16 + ppi) of one CPU."""
        irq = self._banks[cpu][16 + ppi]
        if irq.edge and level and not irq.level:
            irq.pending = True
        irq.level = level
        if level:
            self._assert(cpu, 16 + ppi)
        self.update()

    def spi_line(self, spi: int) -> IrqLine:
        return IrqLine(lambda level, s=spi: self.set_spi(s, level), name=f"spi{spi}")

    def ppi_line(self, cpu: int, ppi: int) -> IrqLine:
        return IrqLine(lambda level: self.set_ppi(cpu, ppi, level), name=f"cpu{cpu}.ppi{ppi}")

    # -- signalling --------------------------------------------------------------
    def _targets(self, cpu: int, intid: int, irq: _Irq) -> bool:
        return intid < GIC_INTERNAL or bool(irq.targets & (1 << cpu)) or self.num_cpus == 1

    def _best(self, cpu: int) -> tuple[int, int]:
        """Highest-priority pending, enabled, inactive interrupt for ``cpu``."""
        best_id, best_prio = SPURIOUS, IDLE_PRIORITY
        if not self.ctlr & 1:
            return best_id, best_prio
        bank, asserted = self._banks[cpu], self._asserted[cpu]
        for intid in sorted(asserted):
            irq = bank[intid]
            if not irq.is_pending():
                asserted.discard(intid)
            elif irq.enabled and not irq.active and irq.priority < best_prio:
                best_id, best_prio = intid, irq.priority
        for n in sorted(self._asserted_spis):
            irq = self._spis[n]
            if not irq.is_pending():
                self._asserted_spis.discard(n)
            elif (irq.enabled and not irq.active and irq.priority < best_prio
                    and self._targets(cpu, n + GIC_INTERNAL, irq)):
                best_id, best_prio = n + GIC_INTERNAL, irq.priority
        return best_id, best_prio

    def update(self) -> None:
        for cpu in range(self.num_cpus):
            cif = self._cpus[cpu]
            intid, prio = self._best(cpu)
            level = (bool(cif.ctlr & 1) and intid != SPURIOUS and prio < cif.pmr
                     and prio < cif.running_priority())
            self.outputs[cpu].set(level)

    # -- CPU interface operations ---------------------------------------------------
    def acknowledge(self, cpu: int) -> int:
        """GICC_IAR read: activate the best pending interrupt, return its ID."""
        cif = self._cpus[cpu]
        intid, prio = self._best(cpu)
        if intid == SPURIOUS or prio >= cif.pmr or prio >= cif.running_priority():
            return SPURIOUS
        irq = self._irq(cpu, intid)
        value = intid
        if intid < 16:
            source = (irq.sgi_sources & -irq.sgi_sources).bit_length() - 1
            irq.sgi_sources &= ~(1 << source)
            irq.pending = bool(irq.sgi_sources)
            value |= source << 10
        else:
            irq.pending = False
        irq.active = True
        cif.active_stack.append((intid, prio))
        self.update()
        return value

    def end_of_interrupt(self, cpu: int, value: int) -> None:
        """GICC_EOIR write: priority drop and (EOImode 0) deactivation."""
        intid = value & 0x3FF
        cif = self._cpus[cpu]
        for i in range(len(cif.active_stack) - 1, -1, -1):
            if cif.active_stack[i][0] == intid:
                del cif.active_stack[i]
                break
        else:
            return
        if not cif.ctlr & (1 << 9) and intid < self.num_irqs:  # EOImodeNS == 0
            self._irq(cpu, intid).active = False
        self.update()

    def deactivate(self, cpu: int, value: int) -> None:
        intid = value & 0x3FF
        if intid < self.num_irqs:
            self._irq(cpu, intid).active = False
            self.update()

    def highest_pending(self, cpu: int) -> int:
        return self._best(cpu)[0]

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

    # -- bitmap register helpers ----------------------------------------------------
    def _bits(self, cpu: int, first: int, count: int, attr: str) -> int:
        value = 0
        for i in range(count):
            intid = first + i
            if intid < self.num_irqs:
                irq = self._irq(cpu, intid)
                bit = irq.is_pending() if attr == "pending" else getattr(irq, attr)
                if bit:
                    value |= 1 << i
        return value

    def _set_bits(self, cpu: int, first: int, value: int, attr: str, state: bool) -> None:
        for i in range(32):
            intid = first + i
            if value & (1 << i) and intid < self.num_irqs:
                if attr == "enabled" and intid < 16:
                    continue  # SGIs are always enabled in this implementation
                setattr(self._irq(cpu, intid), attr, state)
                if attr == "pending" and state:
                    self._assert(cpu, intid)
        self.update()

    # -- state --------------------------------------------------------------------
    def save(self) -> GicV2State:
        banks = [[vars(i).copy() for i in bank] for bank in self._banks]
        banks.append([vars(i).copy() for i in self._spis])
        cpus = [dict(ctlr=c.ctlr, pmr=c.pmr, bpr=c.bpr, abpr=c.abpr,
                     active_stack=list(c.active_stack)) for c in self._cpus]
        return GicV2State(1, self.ctlr, banks, cpus)

    def restore(self, state: GicV2State) -> None:
        check_version(self.name, state.version)
        self.ctlr = state.ctlr
        self._banks = [[_Irq(**d) for d in bank] for bank in state.irqs[:-1]]
        self._spis = [_Irq(**d) for d in state.irqs[-1]]
        self._cpus = [_CpuIf(**c) for c in state.cpus]
        self._rebuild_asserted()
        self.update()

    def forget_input_levels(self) -> None:
        """Every input line low, as the sources' lines are when they are made: a
        restored board then restores its devices, which raise the lines that are
        high now (the saved levels may be stale: a timer's output is computed lazily)."""
        for irq in [i for bank in self._banks for i in bank] + self._spis:
            irq.level = False
        self.update()


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
        if GICD_IGROUPR <= offset < GICD_ISENABLER:
            return g._bits(cpu, (offset - GICD_IGROUPR) * 8, 32, "group")
        if GICD_ISENABLER <= offset < GICD_ICENABLER:
            return g._bits(cpu, (offset - GICD_ISENABLER) * 8, 32, "enabled")
        if GICD_ICENABLER <= offset < GICD_ISPENDR:
            return g._bits(cpu, (offset - GICD_ICENABLER) * 8, 32, "enabled")
        if GICD_ISPENDR <= offset < GICD_ICPENDR:
            return g._bits(cpu, (offset - GICD_ISPENDR) * 8, 32, "pending")
        if GICD_ICPENDR <= offset < GICD_ISACTIVER:
            return g._bits(cpu, (offset - GICD_ICPENDR) * 8, 32, "pending")
        if GICD_ISACTIVER <= offset < GICD_ICACTIVER:
            return g._bits(cpu, (offset - GICD_ISACTIVER) * 8, 32, "active")
        if GICD_ICACTIVER <= offset < GICD_IPRIORITYR:
            return g._bits(cpu, (offset - GICD_ICACTIVER) * 8, 32, "active")
        if GICD_IPRIORITYR <= offset < GICD_IPRIORITYR + 1020:
            return self._bytes(offset - GICD_IPRIORITYR, size, lambda irq, _: irq.priority)
        if GICD_ITARGETSR <= offset < GICD_ITARGETSR + 1020:
            return self._bytes(offset - GICD_ITARGETSR, size,
                               lambda irq, i: (1 << cpu) if i < GIC_INTERNAL else irq.targets)
        if GICD_ICFGR <= offset < GICD_ICFGR + 0x100:
            first = (offset - GICD_ICFGR) * 4
            value = 0
            for i in range(16):
                if first + i < g.num_irqs and g._irq(cpu, first + i).edge:
                    value |= 2 << (2 * i)
            return value
        if GICD_CPENDSGIR <= offset < GICD_CPENDSGIR + 0x20:
            return self._bytes((offset - GICD_CPENDSGIR) % 16, size,
                               lambda irq, _: irq.sgi_sources)
        if offset == GICD_PIDR2:
            return 0x2 << 4
        return 0

    def _bytes(self, first: int, size: int, get) -> int:
        value = 0
        for i in range(size):
            intid = first + i
            if intid < self.gic.num_irqs:
                value |= (get(self.gic._irq(self.cpu, intid), intid) & 0xFF) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        g = self.gic
        cpu = self.cpu
        if offset == GICD_CTLR:
            g.ctlr = value & 1
            g.update()
        elif GICD_IGROUPR <= offset < GICD_ISENABLER:
            first = (offset - GICD_IGROUPR) * 8
            for i in range(32):
                if first + i < g.num_irqs:
                    g._irq(cpu, first + i).group = (value >> i) & 1
        elif GICD_ISENABLER <= offset < GICD_ICENABLER:
            g._set_bits(cpu, (offset - GICD_ISENABLER) * 8, value, "enabled", True)
        elif GICD_ICENABLER <= offset < GICD_ISPENDR:
            g._set_bits(cpu, (offset - GICD_ICENABLER) * 8, value, "enabled", False)
        elif GICD_ISPENDR <= offset < GICD_ICPENDR:
            first = (offset - GICD_ISPENDR) * 8
            g._set_bits(cpu, max(first, 16), value >> (max(first, 16) - first), "pending", True)
        elif GICD_ICPENDR <= offset < GICD_ISACTIVER:
            first = (offset - GICD_ICPENDR) * 8
            g._set_bits(cpu, max(first, 16), value >> (max(first, 16) - first), "pending", False)
        elif GICD_ISACTIVER <= offset < GICD_ICACTIVER:
            g._set_bits(cpu, (offset - GICD_ISACTIVER) * 8, value, "active", True)
        elif GICD_ICACTIVER <= offset < GICD_IPRIORITYR:
            g._set_bits(cpu, (offset - GICD_ICACTIVER) * 8, value, "active", False)
        elif GICD_IPRIORITYR <= offset < GICD_IPRIORITYR + 1020:
            first = offset - GICD_IPRIORITYR
            for i in range(size):
                if first + i < g.num_irqs:
                    g._irq(cpu, first + i).priority = (value >> (8 * i)) & 0xFF
            g.update()
        elif GICD_ITARGETSR <= offset < GICD_ITARGETSR + 1020:
            first = offset - GICD_ITARGETSR
            for i in range(size):
                intid = first + i
                if GIC_INTERNAL <= intid < g.num_irqs:
                    g._irq(cpu, intid).targets = (value >> (8 * i)) & ((1 << g.num_cpus) - 1)
            g.update()
        elif GICD_ICFGR <= offset < GICD_ICFGR + 0x100:
            first = (offset - GICD_ICFGR) * 4
            for i in range(16):
                intid = first + i
                if 16 <= intid < g.num_irqs:  # SGI configuration is fixed (edge)
                    g._irq(cpu, intid).edge = bool(value & (2 << (2 * i)))
            g.update()
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
