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
