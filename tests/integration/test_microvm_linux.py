"""Real Linux on real KVM under kemu's x86-64 microvm board.

Debian's cloud amd64 kernel (the default x86-64 guest) with a busybox
initramfs whose /init prints one report line (``uname -m``, CPUs, virtio
devices) and powers off, booted by ``kemu -M microvm -accel kvm`` as a
bzImage (-smp 1 and 2, with a virtio-rng device found through the DSDT) and
as the extracted vmlinux through its PVH entry.

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

from kemu.accel.kvm import kvm_is_hardware_backed
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


@pytest.fixture(scope="module")
def boots(tmp_path_factory):
    """Run every boot once; name -> (exit status, console output)."""
    from kemu.guest.debian import default_guest
    hardware = kvm_is_hardware_backed()
    if not hardware:
        reason = nested.nested_unavailable_reason()
        if reason:
            pytest.skip(f"/dev/kvm is not hardware-backed and the nested harness "
                        f"cannot run: {reason}")
    try:
        guest = default_guest("x86_64", show_progress=False)
        initrd = nested.l2_initrd(guest.initrd)
        vmlinux = nested.extract_vmlinux(guest.kernel, nested.nested_dir() / "vmlinux-cloud")
    except GuestBuildError as e:
        pytest.skip(f"cannot build the x86-64 guest here: {e}")
    runs = {
        "bzimage": _kemu(guest.kernel, initrd, guest.append, 1, "-device", "virtio-rng-device"),
        "smp2": _kemu(guest.kernel, initrd, guest.append, 2),
        "pvh": _kemu(vmlinux, initrd, guest.append, 1),
    }
    script = "".join(f"echo '==RUN {name}=='; timeout {BOOT_TIMEOUT} {cmd}; "
                     f"echo \"==RC {name}=$?==\"\n" for name, cmd in runs.items())
    script = f"cd {shlex.quote(str(CHECKOUT))}\n" + script
    if hardware:
        import subprocess
        proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                              timeout=BOOT_TIMEOUT * len(runs), check=False)
        output = proc.stdout + proc.stderr
    else:
        try:
            harness = nested.NestedHarness()
        except GuestBuildError as e:
            pytest.skip(f"nested harness unavailable: {e}")
        result = harness.run(script, timeout=BOOT_TIMEOUT * len(runs) + 120)
        if "nested: no /dev/kvm" in result.console:
            pytest.skip("nested SVM is not available: L1 has no /dev/kvm")
        assert result.status is not None, f"L1 did not finish:\n{result.console[-4000:]}"
        output = result.output
    out = {}
    for name in runs:
        m = re.search(rf"==RUN {name}==\n(.*?)==RC {name}=(\d+)==", output, re.DOTALL)
        assert m, f"no result for {name}:\n{output[-4000:]}"
        out[name] = (int(m.group(2)), m.group(1).replace("\r", ""))
    return out


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
