"""What GICv2 and GICv3 share: the per-interrupt state machine and its CPU side.

Each interrupt is inactive, pending, active, or active and pending (IHI 0048B
3.2.4; IHI 0069 4.1.2).  INTIDs 0-31 (SGIs and PPIs) are banked per CPU, SPIs
(32 and up) are shared.  The highest-priority pending interrupt a CPU may
take is found from the few interrupts ever asserted, and the CPU's interrupt
request output follows it.  Acknowledge, end of interrupt (priority drop,
deactivation) and deactivate are the same operations whether the CPU reaches
them through the GICv2 memory-mapped GICC registers or the GICv3 ICC_*
system registers; the versions differ in how an interrupt picks its CPU
(:meth:`GicCore._targets`), which interrupts signal an IRQ
(:meth:`GicCore._eligible`), and what an acknowledge returns for an SGI.
"""

from __future__ import annotations

from dataclasses import dataclass

from kemu.devices.base import IrqLine
from kemu.state import check_version

SPURIOUS = 1023
IDLE_PRIORITY = 0x100  # running priority when nothing is active
GIC_INTERNAL = 32      # SGIs 0-15 and PPIs 16-31 are banked per CPU
NUM_SGIS = 16


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
    targets: int = 0          # SPIs: mask of the CPUs it is routed to
    sgi_sources: int = 0      # GICv2 SGIs: pending source CPU mask

    def is_pending(self) -> bool:
        return self.pending or (not self.edge and self.level)


@dataclass
class _CpuIf:
    """One CPU interface: GICC_* (v2) or ICC_* (v3) state."""

    ctlr: int = 0
    pmr: int = 0
    bpr: int = 2
    abpr: int = 3
    active_stack: list[tuple[int, int]] | None = None  # (intid, priority)
    grpen: int = 0            # v3: ICC_IGRPEN0_EL1 (bit 0), ICC_IGRPEN1_EL1 (bit 1)

    def running_priority(self) -> int:
        return self.active_stack[-1][1] if self.active_stack else IDLE_PRIORITY


class GicCore:
    """The interrupt state of ``len(outputs)`` CPUs and ``num_irqs`` INTIDs."""

    #: GICv2: SGIs are always enabled (GICD_ISENABLER0[15:0] RAO/WI).
    sgis_always_enabled = True
    #: The INTID field of EOIR and DIR writes (GICv2: 10 bits, CPUID above).
    intid_mask = 0x3FF

    def __init__(self, outputs: list[IrqLine], num_irqs: int, name: str) -> None:
        self.name = name
        self.outputs = outputs
        self.num_cpus = len(outputs)
        self.num_irqs = num_irqs
        self.reset()

    def reset(self) -> None:
        self.ctlr = 0
        # self._banks[cpu][intid] for intid < 32; self._spis[intid - 32]
        sgi_on = self.sgis_always_enabled
        self._banks = [[_Irq(edge=(i < NUM_SGIS), enabled=(sgi_on and i < NUM_SGIS))
                        for i in range(GIC_INTERNAL)] for _ in range(self.num_cpus)]
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

    def _irq(self, cpu: int, intid: int) -> _Irq:
        return self._banks[cpu][intid] if intid < GIC_INTERNAL else self._spis[intid - GIC_INTERNAL]

    # -- inputs -------------------------------------------------------------------
    def _drive(self, cpu: int, intid: int, level: bool) -> None:
        irq = self._irq(cpu, intid)
        if irq.edge and level and not irq.level:
            irq.pending = True
        irq.level = level
        if level:
            self._assert(cpu, intid)
        self.update()

    def set_spi(self, spi: int, level: bool) -> None:
        """Drive SPI number ``spi`` (INTID 32 + spi)."""
        self._drive(0, GIC_INTERNAL + spi, level)

    def set_ppi(self, cpu: int, ppi: int, level: bool) -> None:
        """Drive PPI number ``ppi`` (INTID 16 + ppi) of one CPU."""
        self._drive(cpu, 16 + ppi, level)

    def spi_line(self, spi: int) -> IrqLine:
        return IrqLine(lambda level, s=spi: self.set_spi(s, level), name=f"spi{spi}")

    def ppi_line(self, cpu: int, ppi: int) -> IrqLine:
        return IrqLine(lambda level: self.set_ppi(cpu, ppi, level), name=f"cpu{cpu}.ppi{ppi}")

    # -- what the versions decide ---------------------------------------------------
    def _targets(self, cpu: int, intid: int, irq: _Irq) -> bool:
        return intid < GIC_INTERNAL or bool(irq.targets & (1 << cpu))

    def _eligible(self, cpu: int, irq: _Irq) -> bool:
        """May ``irq`` be signalled to ``cpu`` as an IRQ at all (groups, enables)?"""
        return bool(self.ctlr & 1)

    def _cpu_enabled(self, cif: _CpuIf) -> bool:
        return bool(cif.ctlr & 1)

    def _eoi_deactivates(self, cif: _CpuIf) -> bool:
        return not cif.ctlr & (1 << 9)  # GICC_CTLR.EOImodeNS == 0

    def _sgi_acknowledged(self, irq: _Irq) -> int:
        """An SGI is acknowledged: clear its pending state, return IAR's upper bits."""
        irq.pending = False
        return 0

    # -- signalling --------------------------------------------------------------
    def _best(self, cpu: int) -> tuple[int, int]:
        """Highest-priority pending, enabled, inactive interrupt for ``cpu``."""
        best_id, best_prio = SPURIOUS, IDLE_PRIORITY
        bank, asserted = self._banks[cpu], self._asserted[cpu]
        for intid in sorted(asserted):
            irq = bank[intid]
            if not irq.is_pending():
                asserted.discard(intid)
            elif (irq.enabled and not irq.active and irq.priority < best_prio
                    and self._eligible(cpu, irq)):
                best_id, best_prio = intid, irq.priority
        for n in sorted(self._asserted_spis):
            irq = self._spis[n]
            if not irq.is_pending():
                self._asserted_spis.discard(n)
            elif (irq.enabled and not irq.active and irq.priority < best_prio
                    and self._targets(cpu, n + GIC_INTERNAL, irq) and self._eligible(cpu, irq)):
                best_id, best_prio = n + GIC_INTERNAL, irq.priority
        return best_id, best_prio

    def _can_take(self, cif: _CpuIf, intid: int, prio: int) -> bool:
        return intid != SPURIOUS and prio < cif.pmr and prio < cif.running_priority()

    def update(self) -> None:
        for cpu in range(self.num_cpus):
            cif = self._cpus[cpu]
            intid, prio = self._best(cpu)
            self.outputs[cpu].set(self._cpu_enabled(cif) and self._can_take(cif, intid, prio))

    # -- CPU interface operations ---------------------------------------------------
    def acknowledge(self, cpu: int) -> int:
        """GICC_IAR / ICC_IAR1_EL1 read: activate the best pending interrupt, return its ID."""
        cif = self._cpus[cpu]
        intid, prio = self._best(cpu)
        if not self._can_take(cif, intid, prio):
            return SPURIOUS
        irq = self._irq(cpu, intid)
        value = intid
        if intid < NUM_SGIS:
            value |= self._sgi_acknowledged(irq)
        else:
            irq.pending = False
        irq.active = True
        cif.active_stack.append((intid, prio))
        self.update()
        return value

    def end_of_interrupt(self, cpu: int, value: int) -> None:
        """GICC_EOIR / ICC_EOIR1_EL1 write: priority drop and (EOImode 0) deactivation."""
        intid = value & self.intid_mask
        cif = self._cpus[cpu]
        for i in range(len(cif.active_stack) - 1, -1, -1):
            if cif.active_stack[i][0] == intid:
                del cif.active_stack[i]
                break
        else:
            return
        if self._eoi_deactivates(cif) and intid < self.num_irqs:
            self._irq(cpu, intid).active = False
        self.update()

    def deactivate(self, cpu: int, value: int) -> None:
        """GICC_DIR / ICC_DIR_EL1 write."""
        intid = value & self.intid_mask
        if intid < self.num_irqs:
            self._irq(cpu, intid).active = False
            self.update()

    def highest_pending(self, cpu: int) -> int:
        return self._best(cpu)[0]

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
                if attr == "enabled" and intid < NUM_SGIS and self.sgis_always_enabled:
                    continue
                setattr(self._irq(cpu, intid), attr, state)
                if attr == "pending" and state:
                    self._assert(cpu, intid)
        self.update()

    def _set_groups(self, cpu: int, first: int, value: int) -> None:
        for i in range(32):
            if first + i < self.num_irqs:
                self._irq(cpu, first + i).group = (value >> i) & 1
        self.update()

    def _bytes(self, cpu: int, first: int, size: int, get) -> int:
        value = 0
        for i in range(size):
            intid = first + i
            if intid < self.num_irqs:
                value |= (get(self._irq(cpu, intid), intid) & 0xFF) << (8 * i)
        return value

    def _set_priorities(self, cpu: int, first: int, size: int, value: int) -> None:
        for i in range(size):
            if first + i < self.num_irqs:
                self._irq(cpu, first + i).priority = (value >> (8 * i)) & 0xFF
        self.update()

    def _config_bits(self, cpu: int, first: int) -> int:
        """GICD_ICFGR / GICR_ICFGR: two bits per interrupt, bit 1 = edge."""
        value = 0
        for i in range(16):
            if first + i < self.num_irqs and self._irq(cpu, first + i).edge:
                value |= 2 << (2 * i)
        return value

    def _set_config(self, cpu: int, first: int, value: int) -> None:
        for i in range(16):
            intid = first + i
            if NUM_SGIS <= intid < self.num_irqs:  # SGI configuration is fixed (edge)
                self._irq(cpu, intid).edge = bool(value & (2 << (2 * i)))
        self.update()

    # -- state --------------------------------------------------------------------
    def _save_core(self) -> tuple[list[list[dict]], list[dict]]:
        banks = [[vars(i).copy() for i in bank] for bank in self._banks]
        banks.append([vars(i).copy() for i in self._spis])
        cpus = [dict(vars(c), active_stack=list(c.active_stack)) for c in self._cpus]
        return banks, cpus

    def _restore_core(self, version: int, ctlr: int, irqs: list[list[dict]],
                      cpus: list[dict]) -> None:
        check_version(self.name, version)
        self.ctlr = ctlr
        self._banks = [[_Irq(**d) for d in bank] for bank in irqs[:-1]]
        self._spis = [_Irq(**d) for d in irqs[-1]]
        self._cpus = [_CpuIf(**c) for c in cpus]
        self._rebuild_asserted()
        self.update()

    def forget_input_levels(self) -> None:
        """Every input line low, as the sources' lines are when they are made: a
        restored board then restores its devices, which raise the lines that are
        high now (the saved levels may be stale: a timer's output is computed lazily)."""
        for irq in [i for bank in self._banks for i in bank] + self._spis:
            irq.level = False
        self.update()


#: The one-bit-per-interrupt registers: (offset, _Irq attribute, set/clear/None for
#: IGROUPR), at the same offsets in GICv2's and GICv3's distributor and GICv3's SGI frame.
BITMAP_REGISTERS = [(0x080, "group", None), (0x100, "enabled", True), (0x180, "enabled", False),
                    (0x200, "pending", True), (0x280, "pending", False),
                    (0x300, "active", True), (0x380, "active", False)]


def bitmap_register(offset: int, aligned: bool = True) -> tuple[str, int, bool | None] | None:
    """(attribute, first INTID, set/clear/None) of a bitmap register offset.

    GICv3 decodes only word offsets; GICv2 (as QEMU's) also takes byte offsets
    (``aligned=False``), the first INTID then being a multiple of 8.
    """
    for base, attr, state in BITMAP_REGISTERS:
        if base <= offset < base + 0x80 and not (aligned and offset & 3):
            return attr, (offset - base) * 8, state
    return None
