"""A booted microvm Linux on real KVM, snapshotted and restored in a new process.

The default x86-64 guest (Debian's cloud kernel, busybox shell) boots under
kemu's microvm board; the shell writes a file in its RAM root and starts a
background counter; the machine is snapshotted (``Machine.snapshot``) and
the process ends.  A second process restores it (``Machine.restore``): the
shell answers, the file written before is there, the counter has gone on,
and the guest's clock and timers work (``sleep``).  Everything KVM holds is
in play: registers, XSAVE, MSRs (kvmclock, TSC), LAPIC timers, the I/O APIC
routes of the UART, the PIT.

Where /dev/kvm is hardware-backed this runs here; on PVM (Linux does not
boot on it) in one run of the nested harness (:mod:`kemu.testing.nested`).
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from kemu.errors import GuestBuildError
from kemu.testing import nested

pytestmark = pytest.mark.slow

CHECKOUT = Path(__file__).resolve().parents[2]
#: The whole L1 run (it took 3.5 min on a loaded host): generous, since under
#: QEMU's TCG every exit of the L2 guest is emulated.
TIMEOUT = 1800

SAVE = """
import sys, time
from kemu import Machine
vm = Machine.default_guest("x86_64", memory="256M")
vm.start()
vm.console.expect("# ", timeout=240)
vm.console.run("echo KEMU-FILE-$((40+2)) > /root/before; sync", 120)
vm.console.write("(i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done) &\\n")
vm.console.run("sleep 1", 60)
t = time.monotonic()
header = vm.snapshot(sys.argv[1])
print("SNAPSHOT-MS", int((time.monotonic() - t) * 1000))
print("COUNT-AT-SAVE", vm.console.run("cat /tmp/count", 60).strip().splitlines()[-1])
vm.kill()
"""

RESTORE = """
import os, sys, time
from kemu import Machine
from kemu.api import ConsoleTimeout
vm = Machine.restore(sys.argv[1])
print("RESTORED-MS", int((time.time() - float(os.environ["START"])) * 1000), flush=True)
while True:                          # type until the shell answers (once a second:
    vm.console.write("echo answer-$((6*7))\\n")   # what waits in the tty runs after)
    try:
        vm.console.expect("answer-42", timeout=1.0)
        break
    except ConsoleTimeout:
        pass
print("RESTORE-MS", int((time.time() - float(os.environ["START"])) * 1000), flush=True)
vm.console.run("true", 300)
print("FILE", vm.console.run("cat /root/before", 300).strip().splitlines()[-1])
vm.console.run("sleep 1", 300)
print("COUNT-AFTER", vm.console.run("cat /tmp/count", 300).strip().splitlines()[-1])
print("UPTIME", vm.console.run("cat /proc/uptime", 300).strip().splitlines()[-1])
vm.powerdown()
print("STATUS", vm.wait(300))
"""


@pytest.fixture(scope="module")
def runs():
    from kemu.guest.debian import default_guest
    try:
        default_guest("x86_64", show_progress=False)
    except GuestBuildError as e:
        pytest.skip(f"cannot build the x86-64 guest here: {e}")
    py = shlex.quote(sys.executable)
    snap = "${TMPDIR:-/tmp}/kemu-snap"
    script = (f"cd {shlex.quote(str(CHECKOUT))}\n"
              f"echo '==RUN save=='; timeout 600 {py} -u -c {shlex.quote(SAVE)} {snap}; "
              f"echo \"==RC save=$?==\"\n"
              f"echo '==RUN restore=='; START=$(date +%s.%N) timeout 900 {py} -u -c "
              f"{shlex.quote(RESTORE)} {snap}; echo \"==RC restore=$?==\"\n")
    try:
        output = nested.run_on_real_kvm(script, TIMEOUT + 120)
    except nested.RealKvmUnavailable as e:
        pytest.skip(str(e))
    out = {}
    for name in ("save", "restore"):
        m = re.search(rf"==RUN {name}==\n(.*?)==RC {name}=(\d+)==", output, re.DOTALL)
        assert m, f"no result for {name}:\n{output[-4000:]}"
        out[name] = (int(m.group(2)), m.group(1).replace("\r", ""))
    return out


def _value(text: str, key: str) -> str:
    m = re.search(rf"^{key} (.*)$", text, re.MULTILINE)
    assert m, f"no {key} line:\n{text[-3000:]}"
    return m.group(1).strip()


def test_booted_linux_is_snapshotted(runs):
    status, text = runs["save"]
    assert status == 0, text[-3000:]
    assert int(_value(text, "COUNT-AT-SAVE")) >= 1


def test_restored_linux_answers_keeps_its_file_and_its_clock_runs(runs):
    saved = int(_value(runs["save"][1], "COUNT-AT-SAVE"))
    status, text = runs["restore"]
    assert _value(text, "FILE") == "KEMU-FILE-42", text[-3000:]
    # the background loop went on (its sleeps need the guest's timers)
    assert int(_value(text, "COUNT-AFTER")) > saved, text[-3000:]
    assert int(_value(text, "RESTORE-MS")) > 0
    assert _value(text, "STATUS") == "0", text[-3000:]
    assert status == 0, text[-3000:]
