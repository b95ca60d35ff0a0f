"""What a distribution expects of QEMU's virt board, on the default aarch64 guest.

One boot, started as a distro user would (``-snapshot``, ``-rtc base=utc,clock=host``,
``aio=threads``) with a raw and a qcow2 disk: the guest's wall clock comes from the
PL031 at boot (``date -u`` within a few seconds of the host's), busybox ``hwclock``
reads /dev/rtc0, the kernel found a KASLR seed in the device tree, and the disks
the guest wrote to are byte-identical afterwards.
"""

from __future__ import annotations

import calendar
import hashlib
import os
import re
import shutil
import subprocess
import time

import pytest

MiB = 1 << 20


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed (scripts/bootstrap.sh --test installs it)")
    tmp = tmp_path_factory.mktemp("distro")
    raw = tmp / "disk.raw"
    raw.write_bytes(os.urandom(8 * MiB))
    qcow2 = tmp / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "8M"], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1",
                    str(raw), str(qcow2)], check=True)
    return raw, qcow2


def test_clock_kaslr_and_snapshot(guest, console_factory, disks, tmp_path, monkeypatch):
    raw, qcow2 = disks
    before = digest(raw), digest(qcow2)
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    monkeypatch.setenv("TMPDIR", str(overlays))
    vm = console_factory("run", "-snapshot", "-rtc", "base=utc,clock=host",
                         "-drive", f"file={raw},format=raw,if=virtio,aio=threads",
                         "-drive", f"file={qcow2},format=qcow2,if=virtio,aio=io_uring")
    vm.expect(rb"kemu guest ready", timeout=240)
    vm.expect(rb"# ")

    # The wall clock was set from the RTC at boot (CONFIG_RTC_HCTOSYS).
    host_before = time.time()
    guest_now = int(vm.run("date -u +%s").split()[-1])
    host_after = time.time()
    assert host_before - 3 <= guest_now <= host_after + 3, (guest_now, host_before)

    # busybox hwclock reads the PL031 through /dev/rtc0 ("Mon Nov 30 22:02:10 2026  0.000000
    # seconds").
    out = vm.run("hwclock -r -u -f /dev/rtc0")
    m = re.search(r"\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4}", out)
    assert m, out
    rtc_time = calendar.timegm(time.strptime(m.group(0), "%a %b %d %H:%M:%S %Y"))
    assert abs(rtc_time - time.time()) <= 5, out
    rtc_name = vm.run("cat /sys/class/rtc/rtc0/name")
    assert "pl031" in rtc_name or "rtc-pl031" in rtc_name, rtc_name
    since_epoch = int(vm.run("cat /sys/class/rtc/rtc0/since_epoch").split()[-1])
    assert abs(since_epoch - time.time()) <= 5

    # The device tree's kaslr-seed reached the kernel.
    dmesg = vm.run("dmesg")
    assert "KASLR disabled due to lack of seed" not in dmesg
    assert "rng-seed" not in vm.run("ls /proc/device-tree/chosen")      # consumed, wiped

    # The guest writes both disks; it reads its own writes back.
    for dev in ("vda", "vdb"):
        vm.run(f"yes KEMU | head -c 1048576 | dd of=/dev/{dev} bs=64k seek=16 conv=fsync"
               " 2>/dev/null")
        vm.run(f"echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/{dev} bs=64k skip=16 count=1"
               f" 2>/dev/null | head -c 4 | grep -q KEMU")
    assert not os.listdir(overlays)          # the overlays were unlinked once open
    vm.send("poweroff -f\n")
    assert vm.wait(60) == 0
    assert (digest(raw), digest(qcow2)) == before


def test_rtc_clock_vm_stops_while_paused(guest):
    """-rtc clock=vm: the PL031 does not count the time the machine spent paused
    (the default clock=host would: it shows the host's time)."""
    from pathlib import Path

    from kemu import Machine
    from kemu.machines.config import MachineConfig
    from kemu.machines.rtc import RtcConfig

    config = MachineConfig(kernel=Path(guest.kernel), initrd=Path(guest.initrd),
                           append=guest.append, memory=256 << 20, rtc=RtcConfig(clock="vm"))

    def lag(vm) -> float:
        """Host time minus the guest's RTC (whole seconds)."""
        rtc = int(vm.console.run("cat /sys/class/rtc/rtc0/since_epoch").split()[-1])
        return time.time() - rtc

    with Machine.from_config(config) as vm:
        vm.start()
        vm.console.expect("# ", timeout=120)
        before = lag(vm)
        assert abs(before) <= 5
        vm.pause()
        time.sleep(3)
        vm.resume()
        after = lag(vm)
        assert 2 <= after - before <= 5, (before, after)
        vm.console.write("poweroff -f\n")
        assert vm.wait(60) == 0
