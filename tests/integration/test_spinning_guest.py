"""A guest whose program spins (no system calls, no exceptions, no MMIO) still
gets its timer interrupts, and the host can still stop it (issue 10).

Before kemu's TCG engine, `awk 'BEGIN{while(1){}}'` froze the whole aarch64
guest: the shell never ran again, pause timed out and powerdown went unseen.
"""

import time

from kemu import Machine

SPIN = "awk 'BEGIN { while (1) {} }' & true"


def test_a_spinning_user_program_does_not_freeze_the_guest(guest):
    with Machine.default_guest(memory="256M") as vm:
        vm.start()
        vm.console.expect("# ", timeout=120)
        vm.console.run(SPIN)
        # The scheduler preempts the spinner on the timer tick: the shell runs.
        for n in range(3):
            assert vm.console.run(f"echo alive-$(( {n} * 7 ))", timeout=60) == f"alive-{n * 7}\n"
        # The guest's clock keeps time while a task spins.
        t0 = float(vm.console.run("cat /proc/uptime").split()[0])
        time.sleep(1)
        t1 = float(vm.console.run("cat /proc/uptime").split()[0])
        assert t1 - t0 >= 0.9
        # The host stops and resumes it (QMP stop/cont), more than once.
        for _ in range(5):
            vm.pause(timeout=10)
            assert vm.state == "paused"
            vm.resume()
        assert vm.console.run("echo still-here", timeout=60) == "still-here\n"
        vm.powerdown()                        # the power button reaches acpid
        assert vm.wait(120) == 0


def test_quit_ends_a_guest_that_spins(guest):
    vm = Machine.default_guest(memory="256M")
    vm.start()
    vm.console.expect("# ", timeout=120)
    vm.console.run(SPIN)
    assert vm.kill(timeout=10) == 0
    assert vm.outcome.reason == "quit"
