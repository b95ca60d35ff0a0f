"""The in-process Python API on the default aarch64 guest."""

import re
import time

import pytest

from kemu import Machine, Resume, Shutdown, Stop
from kemu.api import CommandFailed, ConsoleClosed, ConsoleTimeout, MachineStateError, Powerdown


def uptime(vm) -> float:
    return float(vm.console.run("cat /proc/uptime").split()[0])


def test_boot_run_pause_resume_and_power_off(guest):
    with Machine.default_guest(memory="256M") as vm:
        assert vm.state == "created"
        vm.start()
        vm.console.expect("# ", timeout=120)
        assert vm.console.run("uname -m").strip() == "aarch64"
        with pytest.raises(CommandFailed):
            vm.console.run("false")
        assert [type(e) for e in vm.events()] == [Resume]     # the machine started
        before = uptime(vm)
        vm.pause()
        assert vm.state == "paused"
        time.sleep(2)
        vm.resume()
        after = uptime(vm)
        # Two seconds of pause are invisible to the guest's clock.
        assert after - before < 1.5, (before, after)
        events = list(vm.events(timeout=1))
        assert [type(e) for e in events] == [Stop, Resume]
        vm.console.write("poweroff -f\n")
        assert vm.wait(60) == 0
        assert vm.state == "shutdown"
        shutdown = [e for e in vm.events(timeout=1) if isinstance(e, Shutdown)]
        assert shutdown and shutdown[0].guest and shutdown[0].reason == "poweroff"


def test_expect_times_out_and_stop_ends_the_machine(guest):
    vm = Machine.default_guest(memory="256M")
    with pytest.raises(MachineStateError):
        vm.pause()                             # not started yet
    vm.start()
    vm.console.expect(re.compile(r"kemu guest ready"), timeout=120)
    with pytest.raises(ConsoleTimeout):
        vm.console.expect("this never appears", timeout=0.5)
    vm.console.expect("# ", timeout=60)
    # A command line longer than the terminal is wide: the shell's echo of it
    # wraps, and none of it may leak into the output.
    for n in range(40, 90, 7):
        assert vm.console.run("echo " + "x" * n) == "x" * n + "\n"
    assert vm.kill() == 0
    assert vm.outcome.reason == "quit"
    with pytest.raises(MachineStateError):
        vm.resume()                            # it has ended


def test_power_button(guest):
    with Machine.default_guest(memory="256M") as vm:
        vm.start()
        vm.console.expect("# ", timeout=120)
        vm.console.run("true")                 # the shell (and acpid) are up
        vm.console.write("echo 'x(y)+z'\n")
        vm.console.expect("x(y)+z\r\n", literal=True, timeout=30)
        vm.powerdown()
        assert vm.wait(60) == 0                 # the guest powered itself off
        t = time.monotonic()
        with pytest.raises(ConsoleClosed):
            vm.console.expect("never printed", timeout=30)
        assert time.monotonic() - t < 5
        kinds = [type(e) for e in vm.events(timeout=1)]
        assert Powerdown in kinds and kinds[-1] is Shutdown


def test_guest_panic_is_an_event_before_the_shutdown(guest):
    from kemu import GuestPanicked
    with Machine.default_guest(memory="256M") as vm:
        messages = []
        vm.add_listener(messages.append)
        vm.start()
        vm.console.expect("# ", timeout=120)
        vm.console.write("echo c > /proc/sysrq-trigger\n")
        assert vm.wait(60) == 1
        events = list(vm.events(timeout=1))
        kinds = [type(e) for e in events]
        assert kinds[-2:] == [GuestPanicked, Shutdown], kinds
        assert "Kernel panic" in events[-2].message
        assert events[-1].reason == "panic"
        names = [m["event"] for m in messages]
        assert names[-2:] == ["GUEST_PANICKED", "SHUTDOWN"]
        assert messages[-2]["data"] == {"action": "poweroff"}
        assert messages[-1]["data"] == {"guest": True, "reason": "guest-panic"}


def test_power_button_before_the_driver_and_events_in_order(guest):
    """A press before the guest's driver is up succeeds and is reported, as in
    QEMU; the guest just does not react.  Events come in the order things
    happened: the Resume of resume() before the Powerdown pressed after it."""
    with Machine.default_guest(memory="256M") as vm:
        vm.start(paused=True)
        list(vm.events(timeout=1))
        vm.powerdown()                          # nobody listens yet: no error
        vm.resume()
        vm.powerdown()                          # the kernel is only starting
        vm.console.expect("# ", timeout=120)
        vm.console.run("true")
        assert vm.state == "running"            # the early presses were ignored
        vm.pause()
        vm.resume()
        vm.powerdown()
        assert vm.wait(60) == 0
        kinds = [type(e).__name__ for e in vm.events(timeout=1)]
        assert kinds == ["Powerdown", "Resume", "Powerdown", "Stop", "Resume",
                         "Powerdown", "Shutdown"], kinds
