"""The GICv3 register model: distributor, redistributors, ICC_* CPU interface."""

import pytest

from kemu.devices.base import IrqLine
from kemu.devices.gic import cpuif as icc
from kemu.devices.gic.core import SPURIOUS
from kemu.devices.gic.cpuif import GicV3CpuInterface
from kemu.devices.gic.redistributor import FRAME, GicV3Redistributor
from kemu.devices.gic.v3 import (GICD_CTLR, GICD_IPRIORITYR, GICD_IROUTER, GICD_ISENABLER,
                                 GICD_ISPENDR, GICD_PIDR2, GICD_TYPER, GicV3)
from kemu.machines.arm64_virt import mpidr

GICR_WAKER, GICR_TYPER = 0x14, 0x8
SGI_IGROUPR0, SGI_ISENABLER0, SGI_ICENABLER0, SGI_ISPENDR0 = 0x80, 0x100, 0x180, 0x200
SGI_IPRIORITYR, SGI_ICFGR1 = 0x400, 0xC04


def make(cpus=2):
    outs = [IrqLine() for _ in range(cpus)]
    gic = GicV3(outs, [mpidr(i, 3) for i in range(cpus)])
    redists = [GicV3Redistributor(gic, i) for i in range(cpus)]
    return gic, gic.distributor(), redists, GicV3CpuInterface(gic), outs


def cpu_on(cif, redist, cpu, enable_mask):
    """What a guest does to take Group 1 interrupts on ``cpu`` (as Linux does)."""
    redist.write(GICR_WAKER, 4, 0)
    redist.write(FRAME + SGI_IGROUPR0, 4, 0xFFFFFFFF)
    for i in range(0, 32, 4):
        redist.write(FRAME + SGI_IPRIORITYR + i, 4, 0xA0A0A0A0)
    redist.write(FRAME + SGI_ISENABLER0, 4, enable_mask)
    cif.write(cpu, icc.ICC_PMR_EL1, 0xF0)
    cif.write(cpu, icc.ICC_IGRPEN1_EL1, 1)


def dist_on(dist, spi_intid, cpu_affinity=0):
    dist.write(GICD_CTLR, 4, 0x12)
    dist.write(0x80 + 4 * (spi_intid // 32), 4, 0xFFFFFFFF)          # IGROUPR: Group 1
    dist.write(GICD_IPRIORITYR + spi_intid, 1, 0xA0)
    dist.write(GICD_IROUTER + 8 * spi_intid, 8, cpu_affinity)
    dist.write(GICD_ISENABLER + 4 * (spi_intid // 32), 4, 1 << (spi_intid % 32))


def test_identification_and_typer():
    gic, dist, (r0, r1), _, _ = make()
    assert dist.read(GICD_PIDR2, 4) >> 4 & 0xF == 3                    # ArchRev: GICv3
    assert r0.read(0xFFE8, 4) >> 4 & 0xF == 3
    assert dist.read(GICD_TYPER, 4) & 0x1F == 7                        # 256 INTIDs
    assert dist.read(GICD_CTLR, 4) == 0x50                             # DS, ARE: RAO
    dist.write(GICD_CTLR, 4, 0x13)
    assert dist.read(GICD_CTLR, 4) == 0x53
    assert r0.read(GICR_TYPER, 8) == 0                                 # Aff 0, not Last
    assert r1.read(GICR_TYPER, 8) == (1 << 32) | (1 << 8) | (1 << 4)   # Aff0 1, Last
    assert r1.read(GICR_TYPER + 4, 4) == 1                             # upper half alone


def test_affinity_beyond_16_cpus_uses_aff1():
    gic, dist, redists, _, _ = make(cpus=17)
    assert redists[16].read(GICR_TYPER, 8) >> 32 == 0x100              # Aff1 1, Aff0 0
    assert gic.cpu_of(0x100) == 16


def test_waker_sleep_handshake():
    _, _, (r0, _), _, _ = make()
    assert r0.read(GICR_WAKER, 4) == 0x6                              # asleep at reset
    r0.write(GICR_WAKER, 4, 0)
    assert r0.read(GICR_WAKER, 4) == 0


def test_private_registers_are_per_redistributor_and_raz_in_gicd():
    _, dist, (r0, r1), _, _ = make()
    r0.write(FRAME + SGI_ISENABLER0, 4, 1 << 27)
    assert r0.read(FRAME + SGI_ISENABLER0, 4) == 1 << 27
    assert r1.read(FRAME + SGI_ISENABLER0, 4) == 0
    assert dist.read(GICD_ISENABLER, 4) == 0                           # ARE: RAZ/WI
    dist.write(GICD_ISENABLER, 4, 0xFFFFFFFF)
    assert r1.read(FRAME + SGI_ISENABLER0, 4) == 0
    r0.write(FRAME + SGI_ICENABLER0, 4, 1 << 27)
    assert r0.read(FRAME + SGI_ISENABLER0, 4) == 0
    r0.write(FRAME + SGI_ICFGR1, 4, 2 << 22)                           # PPI 27 edge
    assert r0.read(FRAME + SGI_ICFGR1, 4) == 2 << 22


def test_ppi_acknowledge_priority_drop_and_eoi():
    gic, _, (r0, r1), cif, (o0, o1) = make()
    dist = gic.distributor()
    dist.write(GICD_CTLR, 4, 0x12)
    cpu_on(cif, r0, 0, 1 << 27)
    gic.set_ppi(0, 11, True)                                          # INTID 27 on CPU 0
    assert o0.level and not o1.level
    assert cif.read(0, icc.ICC_HPPIR1_EL1) == 27
    assert cif.read(0, icc.ICC_IAR1_EL1) == 27
    assert not o0.level
    assert cif.read(0, icc.ICC_RPR_EL1) == 0xA0
    assert cif.read(0, icc.ICC_AP1R0_EL1) == 1 << (0xA0 >> 3)
    assert cif.read(0, icc.ICC_IAR1_EL1) == SPURIOUS
    gic.set_ppi(0, 11, False)
    cif.write(0, icc.ICC_EOIR1_EL1, 27)
    assert cif.read(0, icc.ICC_RPR_EL1) == 0xFF
    assert not o0.level


def test_eoimode1_needs_dir_to_deactivate():
    gic, dist, (r0, _), cif, (o0, _) = make()
    dist.write(GICD_CTLR, 4, 0x12)
    cpu_on(cif, r0, 0, 1 << 27)
    cif.write(0, icc.ICC_CTLR_EL1, 2)                                 # EOImode 1
    assert cif.read(0, icc.ICC_CTLR_EL1) == 0x8C02        # A3V, IDbits 24, PRIbits 5, EOImode
    gic.set_ppi(0, 11, True)
    assert cif.read(0, icc.ICC_IAR1_EL1) == 27
    cif.write(0, icc.ICC_EOIR1_EL1, 27)                               # priority drop only
    assert not o0.level                                               # still active
    cif.write(0, icc.ICC_DIR_EL1, 27)
    assert o0.level                                                   # level still high


def test_group0_and_disabled_groups_are_not_signalled():
    gic, dist, (r0, _), cif, (o0, _) = make()
    cpu_on(cif, r0, 0, 1 << 27)
    gic.set_ppi(0, 11, True)
    assert not o0.level                                               # GICD_CTLR.EnableGrp1 0
    dist.write(GICD_CTLR, 4, 0x12)
    assert o0.level
    cif.write(0, icc.ICC_IGRPEN1_EL1, 0)
    assert not o0.level
    cif.write(0, icc.ICC_IGRPEN1_EL1, 1)
    r0.write(FRAME + SGI_IGROUPR0, 4, 0)                              # Group 0: FIQ, not IRQ
    assert not o0.level


def test_pmr_masks_with_five_priority_bits():
    gic, dist, (r0, _), cif, (o0, _) = make()
    dist.write(GICD_CTLR, 4, 0x12)
    cpu_on(cif, r0, 0, 1 << 27)
    cif.write(0, icc.ICC_PMR_EL1, 0xA7)
    assert cif.read(0, icc.ICC_PMR_EL1) == 0xA0                       # low 3 bits RAZ
    gic.set_ppi(0, 11, True)
    assert not o0.level                                               # 0xA0 is not < 0xA0
    cif.write(0, icc.ICC_PMR_EL1, 0xA8)
    assert o0.level
    cif.write(0, icc.ICC_BPR1_EL1, 0)
    assert cif.read(0, icc.ICC_BPR1_EL1) == 3                         # its minimum


def test_spi_follows_irouter():
    gic, dist, (r0, r1), cif, (o0, o1) = make()
    cpu_on(cif, r0, 0, 0)
    cpu_on(cif, r1, 1, 0)
    dist_on(dist, 40, cpu_affinity=1)
    assert dist.read(GICD_IROUTER + 8 * 40, 8) == 1
    gic.set_spi(8, True)
    assert o1.level and not o0.level
    dist.write(GICD_IROUTER + 8 * 40, 4, 0)                           # 32-bit halves, as
    dist.write(GICD_IROUTER + 8 * 40 + 4, 4, 0)                       # a 32-bit kernel does
    assert o0.level and not o1.level
    assert cif.read(0, icc.ICC_IAR1_EL1) == 40
    dist.write(GICD_IROUTER + 8 * 40, 8, 0x7F)                        # nobody: not signalled
    assert not o1.level
    dist.write(GICD_IROUTER + 8 * 40, 8, 1 << 31)                     # IRM is RAZ/WI (No1N)
    assert dist.read(GICD_IROUTER + 8 * 40, 8) == 0


def test_spi_set_pending_by_software():
    gic, dist, (r0, _), cif, (o0, _) = make()
    cpu_on(cif, r0, 0, 0)
    dist_on(dist, 33)
    dist.write(GICD_ISPENDR + 4, 4, 1 << 1)
    assert o0.level
    assert cif.read(0, icc.ICC_IAR1_EL1) == 33
    assert not o0.level                                               # edge-like: taken


@pytest.mark.parametrize("value,expected", [
    ((5 << 24) | 0b10, [1]),                        # target list: Aff0 1
    ((5 << 24) | 0b11, [0, 1]),                     # self included
    ((5 << 24) | (1 << 40), [1, 2, 3]),             # IRM: all but the sender
    ((5 << 24) | (1 << 16) | 0b1, []),              # Aff1 1: no such CPU among 4
])
def test_sgi1r_targets(value, expected):
    gic, dist, redists, cif, outs = make(cpus=4)
    dist.write(GICD_CTLR, 4, 0x12)
    for i, r in enumerate(redists):
        cpu_on(cif, r, i, 1 << 5)
    cif.write(0, icc.ICC_SGI1R_EL1, value)
    assert [i for i, o in enumerate(outs) if o.level] == expected
    for i in expected:
        assert cif.read(i, icc.ICC_IAR1_EL1) == 5                     # no source bits in v3


def test_sgi1r_range_selector_reaches_cpu_16():
    gic, dist, redists, cif, outs = make(cpus=18)
    dist.write(GICD_CTLR, 4, 0x12)
    cpu_on(cif, redists[17], 17, 1 << 3)
    cif.write(0, icc.ICC_SGI1R_EL1, (3 << 24) | (1 << 16) | 0b10)    # Aff1 1, Aff0 1
    assert [i for i, o in enumerate(outs) if o.level] == [17]


def test_sre_reads_enabled_and_disabled_sgis_wait():
    gic, dist, (r0, r1), cif, (o0, o1) = make()
    assert cif.read(0, icc.ICC_SRE_EL1) == 0x7
    cif.write(0, icc.ICC_SRE_EL1, 0)
    assert cif.read(0, icc.ICC_SRE_EL1) == 0x7                        # RAO/WI
    dist.write(GICD_CTLR, 4, 0x12)
    cpu_on(cif, r1, 1, 0)                                             # SGIs disabled
    cif.write(0, icc.ICC_SGI1R_EL1, (2 << 24) | 0b10)
    assert not o1.level
    r1.write(FRAME + SGI_ISENABLER0, 4, 1 << 2)
    assert o1.level                                                   # pending meanwhile
    assert r1.read(FRAME + SGI_ISPENDR0, 4) == 1 << 2


def test_save_restore_keeps_routing_and_state():
    gic, dist, (r0, r1), cif, (o0, o1) = make()
    cpu_on(cif, r1, 1, 0)
    dist_on(dist, 40, cpu_affinity=1)
    state = gic.save()
    gic.reset()
    assert r1.read(GICR_WAKER, 4) == 0x6
    gic.restore(state)
    assert r1.read(GICR_WAKER, 4) == 0
    gic.set_spi(8, True)
    assert o1.level and not o0.level


def test_state_as_plain_data_and_version_check():
    from kemu.state import StateError, restore_plain, save_plain
    gic, dist, (r0, r1), cif, (o0, o1) = make()
    cpu_on(cif, r1, 1, 0)
    dist_on(dist, 40, cpu_affinity=1)
    data = save_plain(gic)
    gic.reset()
    restore_plain(gic, data)
    gic.set_spi(8, True)
    assert o1.level and not o0.level
    with pytest.raises(StateError):
        restore_plain(gic, dict(data, version=2))
