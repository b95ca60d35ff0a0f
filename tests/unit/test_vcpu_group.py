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
