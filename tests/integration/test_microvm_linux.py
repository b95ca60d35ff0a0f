"""Real Linux on real KVM under kemu's x86-64 microvm board.

Debian's cloud amd64 kernel (the default x86-64 guest) with a busybox
initramfs whose /init prints one report line (``uname -m``, CPUs, virtio
devices) and powers off, booted by ``kemu -M microvm -accel kvm`` as a
bzImage (-smp 1 and 2, with a virtio-rng device found through the DSDT), as
the extracted vmlinux through its PVH entry, with a virtio disk it writes to
and a virtio NIC on user-mode networking (passt) it gets a DHCP lease on, and
as ``kemu run`` picks it (the x86-64 guest on KVM when /dev/kvm is hardware).

Where /dev/kvm is hardware-backed, kemu runs here directly.  Where it is
PVM (this project's machines: Linux does not boot on it), the boots run in
the nested harness (:mod:`kemu.testing.nested`): an L1 Debian under QEMU's
TCG with emulated SVM, the host root shared read-only over 9p.  All boots
share one L1 run.  The tests skip, saying why, when neither is possible.
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
BOOT_TIMEOUT = 300


def _kemu(kernel: Path, initrd: Path, append: str, smp: int, *extra: str) -> str:
    args = ["-M", "microvm", "-accel", "kvm", "-m", "512", "-smp", str(smp), "-kernel",
            str(kernel), "-initrd", str(initrd), "-append", append, "-serial", "stdio",
            "-display", "none", "-no-reboot", *extra]
    return f"{shlex.quote(sys.executable)} -m kemu.cli {shlex.join(args)}"


#: The I/O boot's /init, before its report: a sector written to /dev/vda with
#: fsync, then a DHCP lease on eth0 (udhcpc's script adds the address).
IO_INIT = """
for m in virtio_blk failover net_failover virtio_net; do insmod /lib/modules/$m.ko 2>/dev/null; done
echo KEMU-L2-DISK-MARK | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null && echo L2-DISK-WRITTEN
printf '#!/bin/sh\n[ "$1" = bound ] && ip addr add $ip/$mask dev $interface\n' > /tmp/dhcp.sh
chmod +x /tmp/dhcp.sh
ip link set eth0 up
udhcpc -i eth0 -n -q -t 5 -s /tmp/dhcp.sh 2>&1 | grep -o 'lease of [0-9.]* obtained'
ip -4 addr show eth0 | grep -o 'inet [0-9./]*'
"""


#: Press the power button of a running x86-64 default guest through kemu.Machine.
POWERDOWN = """
from kemu import Machine
with Machine.default_guest("x86_64", memory="512M") as vm:
    vm.start()
    vm.console.expect("# ", timeout=240)
    vm.console.run("true", 120)              # the shell (and acpid) are up
    vm.powerdown()
    print("POWERDOWN-STATUS", vm.wait(120))
    print("EVENTS", " ".join(type(e).__name__ for e in vm.events(timeout=1)))
    print(vm.console.output[-2000:])
"""


@pytest.fixture(scope="module")
def boots(tmp_path_factory):
    """Run every boot once; name -> (exit status, console output)."""
    from kemu.guest.debian import default_guest
    try:
        guest = default_guest("x86_64", show_progress=False)
        initrd = nested.l2_initrd(guest.initrd)
        vmlinux = nested.extract_vmlinux(guest.kernel, nested.nested_dir() / "vmlinux-cloud")
        io_initrd = nested.l2_initrd(guest.initrd, "l2-io-initrd.cpio.gz", IO_INIT)
    except GuestBuildError as e:
        pytest.skip(f"cannot build the x86-64 guest here: {e}")
    disk = "${TMPDIR:-/tmp}/kemu-l2-disk.raw"
    io = _kemu(guest.kernel, io_initrd, guest.append, 1, "-drive",
               "file=DISK,format=raw,if=virtio", "-nic", "user").replace("DISK", disk)
    runs = {
        "bzimage": _kemu(guest.kernel, initrd, guest.append, 1, "-device", "virtio-rng-device"),
        "smp2": _kemu(guest.kernel, initrd, guest.append, 2),
        "pvh": _kemu(vmlinux, initrd, guest.append, 1),
        # No NIC in L1: a dummy interface gives passt addresses and a route to copy.
        "io": (f"{{ [ -n \"$KEMU_NESTED\" ] && {nested.L1_DUMMY_NETWORK}; }}; "
               f"truncate -s 16M {disk} && {io}; rc=$?; "
               f"echo \"L1-DISK: $(head -c 17 {disk})\"; (exit $rc)"),
        # The ACPI power button through the API: the guest's acpid powers it off.
        "powerdown": f"{shlex.quote(sys.executable)} -c {shlex.quote(POWERDOWN)}",
        # What plain `kemu run` picks in L1 (hardware-like KVM): the x86-64 guest.
        "run": (f"printf 'uname -m\\npoweroff -f\\n' | {shlex.quote(sys.executable)} "
                "-m kemu.cli run -no-reboot"),
    }
    try:
        return nested.run_each_on_real_kvm(runs, CHECKOUT, BOOT_TIMEOUT)
    except nested.RealKvmUnavailable as e:
        pytest.skip(str(e))


def _report(text: str) -> dict[str, str]:
    m = re.search(rf"{nested.L2_REPORT} (.*)", text)
    assert m, f"the guest did not report; console:\n{text[-3000:]}"
    return dict(kv.split("=", 1) for kv in m.group(1).split())


def test_bzimage_boots_to_busybox_and_powers_off(boots):
    status, text = boots["bzimage"]
    report = _report(text)
    assert report["arch"] == "x86_64"
    assert report["cpus"] == "1"
    assert report["virtio"] == "1" and report["rng"] == "virtio_rng.0"   # found via the DSDT
    assert "reboot: Power down" in text           # ACPI S5 through the sleep registers
    assert status == 0, text[-3000:]


def test_smp2_linux_brings_up_both_vcpus(boots):
    status, text = boots["smp2"]
    assert _report(text)["cpus"] == "2"
    assert status == 0, text[-3000:]


def test_pvh_vmlinux_boots(boots):
    status, text = boots["pvh"]
    assert _report(text)["arch"] == "x86_64"
    assert status == 0, text[-3000:]


def test_linux_writes_its_disk_and_gets_a_dhcp_lease(boots):
    status, text = boots["io"]
    assert "L2-DISK-WRITTEN" in text, text[-3000:]
    assert "L1-DISK: KEMU-L2-DISK-MARK" in text        # the sector reached the image file
    m = re.search(r"lease of (10\.0\.2\.\d+) obtained", text)
    assert m, f"no DHCP lease from passt:\n{text[-3000:]}"
    assert f"inet {m.group(1)}/" in text
    assert _report(text)["virtio"] == "2"
    assert status == 0, text[-3000:]


def test_kemu_run_picks_the_x86_64_guest_on_kvm(boots):
    status, text = boots["run"]
    assert "x86-64 guest on KVM" in text
    assert re.search(r"^x86_64$", text, re.MULTILINE), text[-3000:]
    assert status == 0, text[-3000:]


def test_acpi_power_button_powers_the_guest_off(boots):
    status, text = boots["powerdown"]
    assert "POWERDOWN-STATUS 0" in text, text[-3000:]
    assert "Powerdown" in text and "Shutdown" in text
    assert status == 0, text[-3000:]
