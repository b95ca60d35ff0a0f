"""The x86-64 microvm board with a screen: Linux's virtio_gpu on kemu's virtio-gpu under
KVM (directly where /dev/kvm is hardware-backed, else in the nested harness)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from kemu.accel.kvm import kvm_is_hardware_backed
from kemu.errors import GuestBuildError
from kemu.testing import nested

pytestmark = pytest.mark.slow

CHECKOUT = Path(__file__).resolve().parents[2]
TIMEOUT = 600

SCRIPT = """
import time
from kemu import Machine
with Machine.default_guest("x86_64", screen=True, memory="512M") as vm:
    vm.start()
    vm.console.expect("# ", timeout=300)
    print("DRM", vm.console.run("cat /sys/class/drm/card0-Virtual-1/status", 120).strip())
    vm.console.run("echo 0 > /sys/class/graphics/fbcon/cursor_blink", 60)
    before = vm.screenshot()
    print("SCREEN", before.size, before.getbbox() is not None)
    vm.console.run("echo printed-on-the-screen > /dev/tty1", 60)
    changed = False
    for _ in range(200):
        if vm.screenshot().tobytes() != before.tobytes():
            changed = True
            break
        time.sleep(0.05)
    print("CHANGED", changed)
    vm.console.write("poweroff -f\\n")
    print("STATUS", vm.wait(120))
"""


def test_x86_64_guest_runs_fbcon_on_virtio_gpu():
    from kemu.guest.debian import cache_dir, default_guest
    hardware = kvm_is_hardware_backed()
    if not hardware:
        reason = nested.nested_unavailable_reason()
        if reason:
            pytest.skip(f"/dev/kvm is not hardware-backed and the nested harness cannot run: "
                        f"{reason}")
    try:
        default_guest("x86_64-display", show_progress=False)
    except GuestBuildError as e:
        pytest.skip(f"cannot build the x86-64 display guest here: {e}")
    cmd = f"cd {shlex.quote(str(CHECKOUT))} && {shlex.quote(sys.executable)} -c " \
          f"{shlex.quote(SCRIPT)}; echo \"==RC=$?==\""
    if hardware:
        proc = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=TIMEOUT)
        output = proc.stdout + proc.stderr
    else:
        try:
            harness = nested.NestedHarness()
        except GuestBuildError as e:
            pytest.skip(f"nested harness unavailable: {e}")
        result = harness.run(cmd, timeout=TIMEOUT,
                             env={"KEMU_NESTED": "1", "XDG_CACHE_HOME": str(cache_dir().parent)})
        if "nested: no /dev/kvm" in result.console:
            pytest.skip("nested SVM is not available: L1 has no /dev/kvm")
        assert result.status is not None, f"L1 did not finish:\n{result.console[-4000:]}"
        output = result.output
    assert "DRM connected" in output, output[-4000:]
    assert re.search(r"SCREEN \(1280, 800\) True", output), output[-4000:]
    assert "CHANGED True" in output, output[-4000:]
    assert "STATUS 0" in output and "==RC=0==" in output, output[-4000:]
