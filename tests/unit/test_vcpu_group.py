"""VcpuGroup: the vCPU threads of one machine end together."""

import threading

from kemu.accel.base import Halted
from kemu.machines.runtime import RunState, VcpuGroup, VcpuThread


class IdleCpu:
    """A vCPU that halts until kicked; ``broken`` raises in its run loop."""

    def __init__(self, broken=False):
        self.broken = broken
        self.woken = threading.Event()

    def run(self):
        if self.broken:
            raise RuntimeError("boom")
        return Halted()

    def wait_for_interrupt(self, timeout):
        self.woken.wait(timeout)
        self.woken.clear()

    def kick(self, final=False):
        self.woken.set()


def test_a_vcpu_thread_that_fails_ends_the_machine():
    group = VcpuGroup()
    states = []
    group.on_state = states.append
    for i, cpu in enumerate([IdleCpu(), IdleCpu(broken=True)]):
        group.add(VcpuThread(cpu, lambda: None, lambda exit: None, name=f"vcpu{i}"))
    group.start()
    outcome = group.wait(10)
    assert outcome is not None and outcome.reason == "error"
    assert "vcpu1" in outcome.message and "boom" in outcome.message
    assert states[-1] == RunState.STOPPED and group.state == RunState.STOPPED


def test_pause_resume_and_stop_reach_every_vcpu():
    group = VcpuGroup()
    for i in range(3):
        group.add(VcpuThread(IdleCpu(), lambda: None, lambda exit: None, name=f"vcpu{i}"))
    group.start()
    assert group.pause(10)
    assert all(t.state == RunState.PAUSED for t in group.threads)
    group.resume(wait=True)
    assert all(t.state == RunState.RUNNING for t in group.threads)
    group.stop()
    assert group.wait(10).reason == "quit"


def test_a_guest_power_off_under_no_shutdown_pauses_and_is_reported():
    """What the microvm board does when the guest's console says ``reboot: Power down``
    (before its ACPI S5 write): under -no-shutdown the vCPUs pause and the power-off is
    reported (libvirt's reboot then resets and continues); else the machine ends."""
    from kemu.machines.runtime import Outcome
    group = VcpuGroup()
    reported = []
    group.no_shutdown = True
    group.on_guest_shutdown = reported.append
    group.add(VcpuThread(IdleCpu(), lambda: None, lambda exit: None, name="vcpu0"))
    group.start()
    assert group.guest_ended(Outcome("poweroff", 0)) is None
    assert group.threads[0].wait_state(RunState.PAUSED, 10)
    assert group.state == RunState.PAUSED and reported == ["poweroff"]
    group.no_shutdown = False
    group.resume(wait=True)
    assert group.guest_ended(Outcome("poweroff", 0)).reason == "poweroff"
    assert group.wait(10).reason == "poweroff"
