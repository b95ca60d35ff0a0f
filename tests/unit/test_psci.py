from kemu.devices import psci


def test_version_features_and_unknown():
    events = []
    p = psci.Psci(events.append)
    assert p.call(0, psci.PSCI_VERSION, 0, 0, 0) == 0x10000
    assert p.call(0, psci.PSCI_FEATURES, psci.SYSTEM_OFF, 0, 0) == 0
    assert p.call(0, psci.PSCI_FEATURES, 0x80000000, 0, 0) == 2**64 - 1   # NOT_SUPPORTED
    assert p.call(0, 0xC4000099, 0, 0, 0) == 2**64 - 1
    assert p.call(0, psci.MIGRATE_INFO_TYPE, 0, 0, 0) == 2
    assert events == []


def test_system_off_and_reset_report_events():
    events = []
    p = psci.Psci(events.append)
    p.call(0, psci.SYSTEM_OFF, 0, 0, 0)
    p.call(0, psci.SYSTEM_RESET, 0, 0, 0)
    assert events == [psci.SystemEvent.POWEROFF, psci.SystemEvent.RESET]


def test_cpu_on_goes_to_the_board_when_it_has_cpus():
    class Cpus:
        def __init__(self):
            self.calls = []

        def cpu_on(self, mpidr, entry, ctx):
            self.calls.append((mpidr, entry, ctx))
            return psci.SUCCESS

        def cpu_off(self, cpu):
            return psci.DENIED

        def affinity_info(self, mpidr):
            return 0

    cpus = Cpus()
    p = psci.Psci(lambda e: None, cpus)
    assert p.call(0, psci.CPU_ON_64, 1, 0x40080000, 7) == 0
    assert cpus.calls == [(1, 0x40080000, 7)]
    assert psci.Psci(lambda e: None).call(0, psci.CPU_ON_64, 1, 0, 0) == 2**64 - 1


def test_cpu_power_control_by_mpidr():
    class Cpu:
        def __init__(self, on):
            self.powered_on, self.on_pending, self.started = on, False, None

        def power_on(self, entry, ctx):
            self.on_pending, self.started = True, (entry, ctx)

        def power_off(self):
            self.powered_on = False

    cpus = [Cpu(True), Cpu(False)]
    p = psci.Psci(lambda e: None, psci.CpuPowerControl(lambda: cpus))
    neg = lambda v: v & (2**64 - 1)                                       # noqa: E731
    assert p.call(0, psci.AFFINITY_INFO_64, 1, 0, 0) == psci.AFF_OFF
    assert p.call(0, psci.CPU_ON_64, 0x100, 0x40080000, 7) == neg(psci.INVALID_PARAMETERS)
    assert p.call(0, psci.CPU_ON_64, 2, 0x40080000, 7) == neg(psci.INVALID_PARAMETERS)
    assert p.call(0, psci.CPU_ON_64, 1, 0x40080000, 7) == psci.SUCCESS
    assert cpus[1].started == (0x40080000, 7)
    assert p.call(0, psci.AFFINITY_INFO_64, 1, 0, 0) == psci.AFF_ON_PENDING
    assert p.call(0, psci.CPU_ON_64, 1, 0x40080000, 7) == neg(psci.ON_PENDING)
    cpus[1].powered_on, cpus[1].on_pending = True, False
    assert p.call(0, psci.CPU_ON_64, 1, 0x40080000, 7) == neg(psci.ALREADY_ON)
    assert p.call(0, psci.AFFINITY_INFO_64, 0x80000001, 0, 0) == psci.AFF_ON
    p.call(1, psci.CPU_OFF, 0, 0, 0)
    assert p.call(0, psci.AFFINITY_INFO_64, 1, 0, 0) == psci.AFF_OFF


def test_cpu_power_control_with_the_boards_affinities():
    """GICv3's virt puts CPU 16 at Aff1 1, Aff0 0 (MPIDR 0x100)."""
    class Cpu:
        powered_on, on_pending, started = False, False, None

        def power_on(self, entry, ctx):
            self.started = (entry, ctx)

    cpus = [Cpu() for _ in range(17)]
    affinities = [(i // 16) << 8 | i % 16 for i in range(17)]
    p = psci.Psci(lambda e: None, psci.CpuPowerControl(lambda: cpus, affinities))
    assert p.call(0, psci.CPU_ON_64, 0x80000100, 0x40080000, 16) == psci.SUCCESS
    assert cpus[16].started == (0x40080000, 16)
    assert p.call(0, psci.CPU_ON_64, 0x10, 0x40080000, 0) == 2**64 - 2    # INVALID_PARAMETERS
    assert p.call(0, psci.AFFINITY_INFO_64, 0xF, 0, 0) == psci.AFF_OFF
