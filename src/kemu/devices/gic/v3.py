"""ARM Generic Interrupt Controller, architecture version 3 (GICv3): the model
and its distributor (GICD).

Register names and semantics follow the GICv3/v4 Architecture Specification
(IHI 0069): chapter 12.9 (GICD), 12.10-12.11 (GICR, :mod:`.redistributor`)
and 12.2 (ICC system registers, :mod:`.cpuif`).  As QEMU's GICv3 without
security extensions: GICD_CTLR.DS is 1 (one security state), affinity
routing is always on (ARE reads 1), no LPIs and no ITS.  Group 1
interrupts are signalled as IRQ; Group 0 would be FIQ, which this board
does not wire, so they are never signalled.  SPIs go to the CPU whose
affinity GICD_IROUTER names (1-of-N routing is not offered: GICD_TYPER.No1N).
"""

from __future__ import annotations

from dataclasses import dataclass

from kemu.devices.base import IrqLine
from kemu.devices.gic.core import GIC_INTERNAL, SPURIOUS, GicCore, _CpuIf, _Irq
from kemu.devices.gic.core import bitmap_register as _bitmap_register

# Distributor registers (IHI 0069 table 12-25)
GICD_CTLR = 0x0000
GICD_TYPER = 0x0004
GICD_IIDR = 0x0008
GICD_TYPER2 = 0x000C
GICD_STATUSR = 0x0010
GICD_IGROUPR = 0x0080
GICD_ISENABLER = 0x0100
GICD_ICENABLER = 0x0180
GICD_ISPENDR = 0x0200
GICD_ICPENDR = 0x0280
GICD_ISACTIVER = 0x0300
GICD_ICACTIVER = 0x0380
GICD_IPRIORITYR = 0x0400
GICD_ICFGR = 0x0C00
GICD_IROUTER = 0x6000
GICD_PIDR2 = 0xFFE8

GICD_CTLR_ENABLE_GRP0 = 1 << 0
GICD_CTLR_ENABLE_GRP1 = 1 << 1
GICD_CTLR_ARE = 1 << 4    # RAO/WI: affinity routing always on
GICD_CTLR_DS = 1 << 6     # RAO/WI: security disabled (one security state)

#: GICD_IIDR and GICR_IIDR as QEMU's GICv3: ARM, r0p0, product 0 (a GIC-500 r0p0).
IIDR = 0x0000043B
#: GICv3 ID registers at 0xFFD0-0xFFFC of each frame (PIDR4..7, PIDR0..3, CIDR0..3).
PIDR2_ARCH_GICV3 = 0x3B
ID_REGS = {0xFFD0: 0x44, 0xFFE0: 0x92, 0xFFE4: 0xB4, 0xFFE8: PIDR2_ARCH_GICV3,
           0xFFF0: 0x0D, 0xFFF4: 0xF0, 0xFFF8: 0x05, 0xFFFC: 0xB1}

#: Interrupts as QEMU 7.2's virt GICv3 reports them (GICD_TYPER.ITLinesNumber 7).
NUM_IRQS = 256
#: The priority bits of the CPU interface (ICC_CTLR_EL1.PRIbits + 1), as QEMU's.
PRI_BITS = 5
PRI_MASK = (0xFF << (8 - PRI_BITS)) & 0xFF

IROUTER_AFF_MASK = 0xFF_00FF_FFFF   # Aff3 [39:32], Aff2.Aff1.Aff0 [23:0]; IRM RAZ/WI


def affinity_of(mpidr: int) -> int:
    """MPIDR_EL1's affinity fields in the IROUTER layout (Aff3 at bit 32)."""
    return mpidr & IROUTER_AFF_MASK


@dataclass
class GicV3State:
    version: int
    ctlr: int
    irqs: list[list[dict]]
    cpus: list[dict]
    irouter: list[int]
    waker: list[int]


class GicV3(GicCore):
    """A GICv3 distributor, one redistributor and one CPU interface per CPU.

    ``affinities[i]`` is CPU i's MPIDR_EL1 (only the affinity fields count).
    """

    sgis_always_enabled = False
    intid_mask = 0xFFFFFF

    def __init__(self, outputs: list[IrqLine], affinities: list[int],
                 num_irqs: int = NUM_IRQS, name: str = "gicv3") -> None:
        if num_irqs % 32 or not 64 <= num_irqs <= 1020 + 4:
            raise ValueError("GICv3 supports 64..1024 interrupts in multiples of 32")
        if len(affinities) != len(outputs):
            raise ValueError("one affinity per CPU")
        self.affinities = [affinity_of(a) for a in affinities]
        self._cpu_of = {a: i for i, a in enumerate(self.affinities)}
        super().__init__(outputs, num_irqs, name)

    def reset(self) -> None:
        self.irouter = [0] * (self.num_irqs - GIC_INTERNAL)
        # GICR_WAKER.ProcessorSleep: a redistributor starts asleep.
        self.waker = [True] * len(self.outputs)
        super().reset()
        for cif in self._cpus:
            _reset_cpuif(cif)
        for n in range(len(self._spis)):
            self._route(n)

    # -- what GICv3 decides --------------------------------------------------------
    def _eligible(self, cpu: int, irq: _Irq) -> bool:
        return irq.group == 1 and bool(self.ctlr & GICD_CTLR_ENABLE_GRP1)

    def _cpu_enabled(self, cif: _CpuIf) -> bool:
        return bool(cif.grpen & 2)

    def _eoi_deactivates(self, cif: _CpuIf) -> bool:
        return not cif.ctlr & 2   # ICC_CTLR_EL1.EOImode

    def _can_take(self, cif: _CpuIf, intid: int, prio: int) -> bool:
        # Only the implemented priority bits take part (IHI 0069 4.8).
        rprio = cif.running_priority()
        return (intid != SPURIOUS and (prio & PRI_MASK) < cif.pmr
                and (rprio > 0xFF or (prio & PRI_MASK) < (rprio & PRI_MASK)))

    # -- routing ---------------------------------------------------------------
    def cpu_of(self, affinity: int) -> int | None:
        return self._cpu_of.get(affinity)

    def _route(self, n: int) -> None:
        cpu = self._cpu_of.get(self.irouter[n])
        self._spis[n].targets = 0 if cpu is None else 1 << cpu

    def set_irouter(self, intid: int, value: int) -> None:
        n = intid - GIC_INTERNAL
        self.irouter[n] = value & IROUTER_AFF_MASK
        self._route(n)
        self.update()

    # -- SGIs ------------------------------------------------------------------
    def send_sgi1r(self, source: int, value: int) -> None:
        """ICC_SGI1R_EL1 (also SGI0R) write (IHI 0069 12.2.23)."""
        intid = (value >> 24) & 0xF
        if value & (1 << 40):      # IRM: every PE but this one
            targets = [c for c in range(self.num_cpus) if c != source]
        else:
            aff3, aff2, aff1 = (value >> 48) & 0xFF, (value >> 32) & 0xFF, (value >> 16) & 0xFF
            base = (aff3 << 32) | (aff2 << 16) | (aff1 << 8) | (((value >> 44) & 0xF) << 4)
            targets = []
            for bit in range(16):
                if value & (1 << bit):
                    cpu = self._cpu_of.get(base | bit)
                    if cpu is not None:
                        targets.append(cpu)
        for cpu in targets:
            self._banks[cpu][intid].pending = True
            self._assert(cpu, intid)
        self.update()

    # -- the distributor's view ----------------------------------------------------------
    def distributor(self) -> "GicV3Distributor":
        return GicV3Distributor(self)

    # -- state --------------------------------------------------------------------
    def save(self) -> GicV3State:
        banks, cpus = self._save_core()
        return GicV3State(1, self.ctlr, banks, cpus, list(self.irouter), [int(w) for w in self.waker])

    def restore(self, state: GicV3State) -> None:
        self.irouter = list(state.irouter)
        self.waker = [bool(w) for w in state.waker]
        self._restore_core(state.version, state.ctlr, state.irqs, state.cpus)
        for n in range(len(self._spis)):
            self._route(n)
        self.update()


def _reset_cpuif(cif: _CpuIf) -> None:
    """ICC_* reset values: BPR0 at its minimum, BPR1 one above (IHI 0069 12.2.4)."""
    cif.abpr = 7 - PRI_BITS
    cif.bpr = cif.abpr + 1


class GicV3Distributor:
    """The GICD frame (64 KiB).  With affinity routing the registers of INTIDs
    0-31 are RAZ/WI here (they live in each CPU's redistributor)."""

    def __init__(self, gic: GicV3) -> None:
        self.gic = gic
        self.name = f"{gic.name}-distributor"

    def read(self, offset: int, size: int) -> int:
        g = self.gic
        if offset == GICD_CTLR:
            return g.ctlr | GICD_CTLR_ARE | GICD_CTLR_DS   # RWP (bit 31) always 0
        if offset == GICD_TYPER:
            # No1N, A3V, IDbits = 16 bits, ITLinesNumber; CPUNumber 0 (ARE on).
            return (1 << 25) | (1 << 24) | (0xF << 19) | ((g.num_irqs // 32) - 1)
        if offset == GICD_IIDR:
            return IIDR
        if GICD_IROUTER + 8 * GIC_INTERNAL <= offset < GICD_IROUTER + 8 * g.num_irqs:
            intid, byte = divmod(offset - GICD_IROUTER, 8)
            return (g.irouter[intid - GIC_INTERNAL] >> (8 * byte)) & ((1 << (8 * size)) - 1)
        if offset in ID_REGS:
            return ID_REGS[offset]
        ranged = _bitmap_register(offset)
        if ranged is not None:
            attr, first, _ = ranged
            return g._bits(0, first, 32, attr) if first >= GIC_INTERNAL else 0
        if GICD_IPRIORITYR + GIC_INTERNAL <= offset < GICD_IPRIORITYR + g.num_irqs:
            return g._bytes(0, offset - GICD_IPRIORITYR, size, lambda irq, _: irq.priority)
        if GICD_ICFGR + 8 <= offset < GICD_ICFGR + g.num_irqs // 4:
            return g._config_bits(0, (offset - GICD_ICFGR) * 4)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        g = self.gic
        if offset == GICD_CTLR:
            g.ctlr = value & (GICD_CTLR_ENABLE_GRP0 | GICD_CTLR_ENABLE_GRP1)
            g.update()
        elif GICD_IROUTER + 8 * GIC_INTERNAL <= offset < GICD_IROUTER + 8 * g.num_irqs:
            intid, byte = divmod(offset - GICD_IROUTER, 8)
            mask = ((1 << (8 * size)) - 1) << (8 * byte)
            old = g.irouter[intid - GIC_INTERNAL]
            g.set_irouter(intid, (old & ~mask) | ((value << (8 * byte)) & mask))
        elif (ranged := _bitmap_register(offset)) is not None:
            attr, first, state = ranged
            if first >= GIC_INTERNAL:
                write_bitmap(g, 0, attr, first, state, value)
        elif GICD_IPRIORITYR + GIC_INTERNAL <= offset < GICD_IPRIORITYR + g.num_irqs:
            g._set_priorities(0, offset - GICD_IPRIORITYR, size, value)
        elif GICD_ICFGR + 8 <= offset < GICD_ICFGR + g.num_irqs // 4:
            g._set_config(0, (offset - GICD_ICFGR) * 4, value)


def write_bitmap(g: GicV3, cpu: int, attr: str, first: int, state: bool | None,
                 value: int) -> None:
    if state is None:
        g._set_groups(cpu, first, value)
    else:
        g._set_bits(cpu, first, value, attr, state)


def read_bitmap(g: GicV3, cpu: int, offset: int) -> int | None:
    """GICR SGI frame: the bitmap registers of INTIDs 0-31 (offset within the frame)."""
    ranged = _bitmap_register(offset)
    if ranged is None or ranged[1] != 0:
        return None
    return g._bits(cpu, 0, 32, ranged[0])


def write_bitmap_at(g: GicV3, cpu: int, offset: int, value: int) -> bool:
    ranged = _bitmap_register(offset)
    if ranged is None or ranged[1] != 0:
        return False
    write_bitmap(g, cpu, ranged[0], 0, ranged[2], value)
    return True

