"""The x86-64 microvm board with a screen: Linux's virtio_gpu on kemu's virtio-gpu under
KVM (directly where /dev/kvm is hardware-backed, else in the nested harness)."""

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
    from kemu.guest.debian import default_guest
    try:
        default_guest("x86_64-display", show_progress=False)
    except GuestBuildError as e:
        pytest.skip(f"cannot build the x86-64 display guest here: {e}")
    cmd = f"cd {shlex.quote(str(CHECKOUT))} && {shlex.quote(sys.executable)} -c " \
          f"{shlex.quote(SCRIPT)}; echo \"==RC=$?==\""
    try:
        output = nested.run_on_real_kvm(cmd, TIMEOUT)
    except nested.RealKvmUnavailable as e:
        pytest.skip(str(e))
    assert "DRM connected" in output, output[-4000:]
    assert re.search(r"SCREEN \(1280, 800\) True", output), output[-4000:]
    assert "CHANGED True" in output, output[-4000:]
    assert "STATUS 0" in output and "==RC=0==" in output, output[-4000:]
