"""The GICv3 CPU interface: the ICC_* system registers (IHI 0069 12.2).

A sans-I/O model: the accelerator hands each MRS/MSR of these registers to
:meth:`GicV3CpuInterface.read` / :meth:`GicV3CpuInterface.write` with the
accessing CPU's index.  The engine defines the registers with the access
rights the architecture gives them, so an access that reaches here is one
the exception level may make.  One security state (GICD_CTLR.DS = 1):
ICC_SRE_ELx read as enabled (SRE, DFB, DIB set, RAO/WI); five priority
bits as in QEMU, so one active-priority register per group.
"""

from __future__ import annotations

from kemu.devices.gic.core import SPURIOUS
from kemu.devices.gic.v3 import PRI_BITS, PRI_MASK, GicV3

Enc = tuple[int, int, int, int, int]   # (op0, op1, CRn, CRm, op2)

ICC_PMR_EL1: Enc = (3, 0, 4, 6, 0)
ICC_IAR0_EL1: Enc = (3, 0, 12, 8, 0)
ICC_EOIR0_EL1: Enc = (3, 0, 12, 8, 1)
ICC_HPPIR0_EL1: Enc = (3, 0, 12, 8, 2)
ICC_BPR0_EL1: Enc = (3, 0, 12, 8, 3)
ICC_AP0R0_EL1: Enc = (3, 0, 12, 8, 4)
ICC_AP1R0_EL1: Enc = (3, 0, 12, 9, 0)
ICC_DIR_EL1: Enc = (3, 0, 12, 11, 1)
ICC_RPR_EL1: Enc = (3, 0, 12, 11, 3)
ICC_SGI1R_EL1: Enc = (3, 0, 12, 11, 5)
ICC_ASGI1R_EL1: Enc = (3, 0, 12, 11, 6)
ICC_SGI0R_EL1: Enc = (3, 0, 12, 11, 7)
ICC_IAR1_EL1: Enc = (3, 0, 12, 12, 0)
ICC_EOIR1_EL1: Enc = (3, 0, 12, 12, 1)
ICC_HPPIR1_EL1: Enc = (3, 0, 12, 12, 2)
ICC_BPR1_EL1: Enc = (3, 0, 12, 12, 3)
ICC_CTLR_EL1: Enc = (3, 0, 12, 12, 4)
ICC_SRE_EL1: Enc = (3, 0, 12, 12, 5)
ICC_IGRPEN0_EL1: Enc = (3, 0, 12, 12, 6)
ICC_IGRPEN1_EL1: Enc = (3, 0, 12, 12, 7)
ICC_SRE_EL2: Enc = (3, 4, 12, 9, 5)
ICC_CTLR_EL3: Enc = (3, 6, 12, 12, 4)
ICC_SRE_EL3: Enc = (3, 6, 12, 12, 5)
ICC_IGRPEN1_EL3: Enc = (3, 6, 12, 12, 7)

#: Registers a read reaches (MRS) and a write reaches (MSR).
READABLE: tuple[Enc, ...] = (
    ICC_PMR_EL1, ICC_IAR0_EL1, ICC_HPPIR0_EL1, ICC_BPR0_EL1, ICC_AP0R0_EL1, ICC_AP1R0_EL1,
    ICC_RPR_EL1, ICC_IAR1_EL1, ICC_HPPIR1_EL1, ICC_BPR1_EL1, ICC_CTLR_EL1, ICC_SRE_EL1,
    ICC_IGRPEN0_EL1, ICC_IGRPEN1_EL1, ICC_SRE_EL2, ICC_CTLR_EL3, ICC_SRE_EL3, ICC_IGRPEN1_EL3)
WRITABLE: tuple[Enc, ...] = (
    ICC_PMR_EL1, ICC_EOIR0_EL1, ICC_BPR0_EL1, ICC_AP0R0_EL1, ICC_AP1R0_EL1, ICC_DIR_EL1,
    ICC_SGI1R_EL1, ICC_ASGI1R_EL1, ICC_SGI0R_EL1, ICC_EOIR1_EL1, ICC_BPR1_EL1, ICC_CTLR_EL1,
    ICC_SRE_EL1, ICC_IGRPEN0_EL1, ICC_IGRPEN1_EL1, ICC_SRE_EL2, ICC_CTLR_EL3, ICC_SRE_EL3,
    ICC_IGRPEN1_EL3)

SRE_SRE, SRE_DFB, SRE_DIB, SRE_ENABLE = 1, 2, 4, 8
CTLR_CBPR = 1 << 0
CTLR_EOIMODE = 1 << 1
#: ICC_CTLR_EL1 read-only fields: A3V, IDbits = 24 bits (1, as QEMU's), PRIbits.
CTLR_RO = (1 << 15) | (1 << 11) | ((PRI_BITS - 1) << 8)


class GicV3CpuInterface:
    """The ICC_* registers of every CPU of one :class:`GicV3`."""

    readable = READABLE
    writable = WRITABLE

    def __init__(self, gic: GicV3) -> None:
        self.gic = gic
        self.name = f"{gic.name}-cpuif"

    def read(self, cpu: int, reg: Enc) -> int:
        g = self.gic
        cif = g._cpus[cpu]
        if reg == ICC_IAR1_EL1:
            return g.acknowledge(cpu)
        if reg == ICC_HPPIR1_EL1:
            return g.highest_pending(cpu)
        if reg in (ICC_IAR0_EL1, ICC_HPPIR0_EL1):
            return SPURIOUS            # Group 0 is never signalled on this board
        if reg == ICC_PMR_EL1:
            return cif.pmr
        if reg == ICC_RPR_EL1:
            rprio = cif.running_priority()
            return 0xFF if rprio > 0xFF else rprio & PRI_MASK
        if reg == ICC_BPR1_EL1:
            return cif.bpr
        if reg == ICC_BPR0_EL1:
            return cif.abpr
        if reg == ICC_CTLR_EL1:
            return CTLR_RO | (cif.ctlr & (CTLR_CBPR | CTLR_EOIMODE))
        if reg == ICC_CTLR_EL3:
            return CTLR_RO | (cif.ctlr & CTLR_EOIMODE) << 2   # EOImode_EL1NS
        if reg in (ICC_SRE_EL1, ICC_SRE_EL3):
            return SRE_SRE | SRE_DFB | SRE_DIB | (SRE_ENABLE if reg == ICC_SRE_EL3 else 0)
        if reg == ICC_SRE_EL2:
            return SRE_SRE | SRE_DFB | SRE_DIB | SRE_ENABLE
        if reg == ICC_IGRPEN0_EL1:
            return cif.grpen & 1
        if reg in (ICC_IGRPEN1_EL1, ICC_IGRPEN1_EL3):
            return (cif.grpen >> 1) & 1
        if reg == ICC_AP1R0_EL1:
            value = 0
            for _intid, prio in cif.active_stack:
                value |= 1 << ((prio & PRI_MASK) >> (8 - PRI_BITS))
            return value
        return 0   # ICC_AP0R0_EL1: nothing of Group 0 is ever active

    def write(self, cpu: int, reg: Enc, value: int) -> None:
        g = self.gic
        cif = g._cpus[cpu]
        if reg == ICC_EOIR1_EL1:
            g.end_of_interrupt(cpu, value)
        elif reg == ICC_DIR_EL1:
            g.deactivate(cpu, value)
        elif reg in (ICC_SGI1R_EL1, ICC_SGI0R_EL1):
            g.send_sgi1r(cpu, value)
        elif reg == ICC_PMR_EL1:
            cif.pmr = value & PRI_MASK
            g.update()
        elif reg == ICC_BPR1_EL1:
            cif.bpr = max(value & 7, 8 - PRI_BITS)
        elif reg == ICC_BPR0_EL1:
            cif.abpr = max(value & 7, 7 - PRI_BITS)
        elif reg == ICC_CTLR_EL1:
            cif.ctlr = value & (CTLR_CBPR | CTLR_EOIMODE)
        elif reg == ICC_CTLR_EL3:
            cif.ctlr = (cif.ctlr & ~CTLR_EOIMODE) | ((value >> 2) & CTLR_EOIMODE)
        elif reg == ICC_IGRPEN0_EL1:
            cif.grpen = (cif.grpen & ~1) | (value & 1)
            g.update()
        elif reg in (ICC_IGRPEN1_EL1, ICC_IGRPEN1_EL3):
            cif.grpen = (cif.grpen & ~2) | ((value & 1) << 1)
            g.update()
        # ICC_SRE_*: RAO/WI; ICC_AP*R0: written back as read (nothing to restore);
        # ICC_ASGI1R_EL1: the other security state's SGIs, absent here; EOIR0: no Group 0.
