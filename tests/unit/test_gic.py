from kemu.devices.base import IrqLine
from kemu.devices.gic import IDLE_PRIORITY, SPURIOUS
from kemu.devices.gic import (GICC_CTLR, GICC_EOIR, GICC_IAR, GICC_PMR, GICD_CTLR,
                              GICD_ICENABLER, GICD_ICFGR, GICD_IPRIORITYR, GICD_ISENABLER,
                              GICD_ISPENDR, GICD_SGIR, GICD_TYPER, SPURIOUS, GicV2)


def make(cpus=1):
    outs = [IrqLine() for _ in range(cpus)]
    gic = GicV2(outs, 128)
    return gic, gic.distributor(), gic.cpu_interface(), outs


def enable(dist, cpu, intid, prio=0xA0):
    dist.write(GICD_CTLR, 4, 1)
    cpu.write(GICC_CTLR, 4, 1)
    cpu.write(GICC_PMR, 4, 0xF0)
    dist.write(GICD_ISENABLER + 4 * (intid // 32), 4, 1 << (intid % 32))
    dist.write(GICD_IPRIORITYR + intid, 1, prio)


def test_typer_reports_lines_and_cpus():
    gic, dist, cpu, _ = make(cpus=2)
    assert dist.read(GICD_TYPER, 4) == 3 | (1 << 5)


def test_level_spi_acknowledge_and_eoi():
    gic, dist, cpu, (out,) = make()
    enable(dist, cpu, 33)
    line = gic.spi_line(1)
    line.raise_()
    assert out.level
    assert cpu.read(GICC_IAR, 4) == 33
    assert not out.level                  # active: not signalled again
    assert cpu.read(GICC_IAR, 4) == SPURIOUS
    line.lower()
    cpu.write(GICC_EOIR, 4, 33)
    assert not out.level


def test_level_interrupt_still_high_after_eoi_is_signalled_again():
    gic, dist, cpu, (out,) = make()
    enable(dist, cpu, 40)
    gic.set_spi(8, True)
    assert cpu.read(GICC_IAR, 4) == 40
    cpu.write(GICC_EOIR, 4, 40)
    assert out.level
    assert cpu.read(GICC_IAR, 4) == 40


def test_disabled_or_masked_interrupts_are_not_signalled():
    gic, dist, cpu, (out,) = make()
    enable(dist, cpu, 33, prio=0xF8)      # priority below the mask
    gic.set_spi(1, True)
    assert not out.level
    cpu.write(GICC_PMR, 4, 0xFF)
    assert out.level
    dist.write(GICD_ICENABLER + 4, 4, 1 << 1)
    assert not out.level


def test_priority_order_and_preemption():
    gic, dist, cpu, (out,) = make()
    enable(dist, cpu, 34, prio=0x80)
    enable(dist, cpu, 35, prio=0x40)
    gic.set_spi(2, True)
    gic.set_spi(3, True)
    assert cpu.read(GICC_IAR, 4) == 35    # higher priority (lower value) first
    assert cpu.read(GICC_IAR, 4) == SPURIOUS  # 34 cannot preempt 35
    gic.set_spi(3, False)
    cpu.write(GICC_EOIR, 4, 35)
    assert cpu.read(GICC_IAR, 4) == 34


def test_edge_interrupt_latches():
    gic, dist, cpu, (out,) = make()
    enable(dist, cpu, 48)
    dist.write(GICD_ICFGR + 12, 4, 2 << 0)   # INTID 48: edge
    gic.set_spi(16, True)
    gic.set_spi(16, False)
    assert out.level
    assert cpu.read(GICC_IAR, 4) == 48
    cpu.write(GICC_EOIR, 4, 48)
    assert not out.level


def test_software_pending_and_sgi():
    gic, dist, cpu, (out,) = make()
    enable(dist, cpu, 50)
    dist.write(GICD_ISPENDR + 4, 4, 1 << 18)
    assert cpu.read(GICC_IAR, 4) == 50
    cpu.write(GICC_EOIR, 4, 50)
    enable(dist, cpu, 3)
    dist.write(GICD_SGIR, 4, (2 << 24) | 3)   # to self
    assert cpu.read(GICC_IAR, 4) == 3         # source CPU 0 in bits 12:10
    cpu.write(GICC_EOIR, 4, 3)
    assert not out.level


def test_ppi_is_banked_per_cpu():
    gic, dist, cpu, outs = make(cpus=2)
    enable(dist, cpu, 27)
    gic.set_ppi(1, 11, True)                  # CPU 1's virtual timer
    assert not outs[0].level                  # CPU 1's bank is not enabled


def test_save_restore():
    gic, dist, cpu, (out,) = make()
    enable(dist, cpu, 33)
    gic.set_spi(1, True)
    state = gic.save()
    gic2, dist2, cpu2, (out2,) = make()
    gic2.restore(state)
    assert out2.level
    assert cpu2.read(GICC_IAR, 4) == 33


def _brute_force_best(gic, cpu):
    """The highest-priority candidate by scanning every interrupt (the spec's rule)."""
    best = (SPURIOUS, IDLE_PRIORITY)
    if not gic.ctlr & 1:
        return best
    for intid in range(gic.num_irqs):
        irq = gic._irq(cpu, intid)
        if (irq.enabled and not irq.active and irq.is_pending() and irq.priority < best[1]
                and gic._targets(cpu, intid, irq)):
            best = (intid, irq.priority)
    return best


def test_best_pending_matches_a_full_scan_under_random_traffic():
    """The scan of asserted interrupts only finds what a scan of all of them finds."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    op = st.tuples(st.sampled_from(["spi", "ppi", "sgi", "enable", "ack", "eoi", "setpend",
                                    "clrpend", "prio"]),
                   st.integers(0, 1), st.integers(0, 127), st.booleans(), st.integers(0, 255))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(op, max_size=60))
    def run(ops):
        gic, _dist, _cpuif, _outs = make(cpus=2)
        gic.ctlr = 1
        for cpu in range(2):
            gic._cpus[cpu].ctlr = 1
            gic._cpus[cpu].pmr = 0xFF
        for kind, cpu, n, flag, value in ops:
            if kind == "spi" and n >= 32:
                gic.set_spi(n - 32, flag)
            elif kind == "ppi":
                gic.set_ppi(cpu, n % 16, flag)
            elif kind == "sgi":
                gic.send_sgi(cpu, (n % 16) | (1 << (16 + (value % 2))))
            elif kind == "enable":
                gic._irq(cpu, n).enabled = flag
                if n >= 32:
                    gic._irq(cpu, n).targets = 1 + (value % 3)
            elif kind == "ack":
                gic.acknowledge(cpu)
            elif kind == "eoi":
                gic.end_of_interrupt(cpu, n)
            elif kind in ("setpend", "clrpend") and n >= 16:
                gic._set_bits(cpu, n & ~31, 1 << (n & 31), "pending", kind == "setpend")
            elif kind == "prio":
                gic._irq(cpu, n).priority = value & 0xF0
            for c in range(2):
                assert gic._best(c) == _brute_force_best(gic, c)
    run()
