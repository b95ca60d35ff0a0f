"""The Debian 12 arm64 systemd image (scripts/build-distro-image.py) under kemu.

Skipped when the image has not been built (it takes tens of minutes, so it
is built once by hand, never in CI).  Booted as a distro user boots it
(Debian's kernel and initramfs, ``-snapshot``, virtio disk, user
networking): it reaches ``running`` with no failed unit, systemd-detect-virt
names QEMU (the fw-cfg node in the device tree), the PMU is there for perf,
the RTC gives the wall clock, and ``systemctl poweroff`` ends kemu with 0.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

MANIFEST = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
            / "kemu" / "distro" / "debian12-arm64" / "manifest.json")


@pytest.fixture(scope="module")
def image() -> dict:
    if not MANIFEST.exists():
        pytest.skip(f"no distro image at {MANIFEST.parent} (scripts/build-distro-image.py "
                    "builds it once, as root, in tens of minutes)")
    return json.loads(MANIFEST.read_text())


def test_debian_systemd_image_runs_as_under_qemu(image, console_factory):
    vm = console_factory(
        "-M", "virt", "-cpu", "cortex-a57", "-m", "1024", "-nographic", "-snapshot",
        "-kernel", image["kernel"], "-initrd", image["initrd"], "-append", image["append"],
        "-drive", f"file={image['disk']},format=raw,if=none,id=root",
        "-device", "virtio-blk-device,drive=root",
        "-netdev", "user,id=net0", "-device", "virtio-net-device,netdev=net0")
    vm.expect(rb"login: ", timeout=900)
    vm.send("root\n")
    vm.expect(rb"# ", timeout=120)
    assert vm.run("systemctl is-system-running --wait", timeout=600).split()[-1] == "running"
    assert vm.run("systemctl --failed --no-legend --plain | wc -l").split()[-1] == "0"
    assert vm.run("systemd-detect-virt").split()[-1] == "qemu"
    assert "armv8_pmuv3" in vm.run("ls /sys/bus/event_source/devices")
    guest_now = int(vm.run("date -u +%s").split()[-1])
    assert abs(guest_now - time.time()) <= 10
    vm.send("systemctl poweroff\n")
    assert vm.wait(300) == 0
