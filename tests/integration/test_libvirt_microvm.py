"""libvirt manages kemu's x86-64 microvm on KVM (issue 13): the same domain XML
(``<type arch='x86_64' machine='microvm'>``, direct kernel boot, a virtio-mmio disk,
a pty serial console) with ``<emulator>`` = kemu-system-x86_64 and =
qemu-system-x86_64, through the libvirt Python binding: define, start, the console,
a guest write reaching the image, dominfo and block statistics, suspend, resume,
reboot, shutdown, destroy, undefine, and domcapabilities.

Linux needs real KVM: where /dev/kvm is hardware-backed the driver
(``libvirt_microvm_l1.py``) runs here; where it is PVM it runs in the nested
harness's L1 (:mod:`kemu.testing.nested`), with its own private libvirtd, in one
L1 boot.  The driver reports what it saw as JSON; the checks are here.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from kemu.testing import nested
from kemu.testing.libvirtd import missing_tools

pytestmark = pytest.mark.slow
pytest.importorskip("libvirt", reason="the libvirt Python binding is not installed "
                    "(scripts/bootstrap.sh --test installs it)")

CHECKOUT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("libvirt_microvm_l1.py")
KEMU = Path(sys.executable).parent / "kemu-system-x86_64"
QEMU = shutil.which("qemu-system-x86_64")
MARK = "L1-RESULT "
STEPS = ["define", "start", "console", "disk", "suspend-resume", "reboot", "shutdown",
         "destroy", "undefine"]


@pytest.fixture(scope="module")
def seen():
    """Run the driver once (in L1 where KVM is PVM); name -> observations."""
    from kemu.errors import GuestBuildError
    from kemu.guest.debian import default_guest

    why = missing_tools()
    if why:
        pytest.skip(why)
    if not KEMU.exists():
        pytest.skip(f"{KEMU} is not installed (pip install -e . makes it)")
    try:
        guest = default_guest("x86_64", show_progress=False)
    except GuestBuildError as e:
        pytest.skip(f"cannot build the x86-64 guest here: {e}")
    emulators = [f"kemu={KEMU}"] + ([f"qemu={QEMU}"] if QEMU else [])
    scratch = "${TMPDIR:-/tmp}/lvmv"
    command = (f"mkdir -p {scratch} && cd {shlex.quote(str(CHECKOUT))} && "
               + shlex.join([sys.executable, str(DRIVER), "SCRATCH", str(guest.kernel),
                             str(guest.initrd), guest.append, *emulators])
               .replace("SCRATCH", scratch))
    try:
        output = nested.run_on_real_kvm(command, 1800)
    except nested.RealKvmUnavailable as e:
        pytest.skip(str(e))
    line = next((ln for ln in output.splitlines() if ln.startswith(MARK)), None)
    assert line, f"the driver reported nothing:\n{output[-4000:]}"
    results = json.loads(line[len(MARK):])
    assert "error" not in results, json.dumps(results, indent=1)[-4000:]
    return results


def _check_lifecycle(run: dict, name: str) -> None:
    assert run["steps"] == STEPS, json.dumps(run, indent=1)[-5000:]
    assert run["hardware"]["arch"] == "x86_64"
    assert run["hardware"]["cpus"] == "1"
    assert run["hardware"]["hypervisor"] == "1"          # a KVM guest
    assert run["disk"] == f"kemu-libvirt-mv-{name}"     # the guest's write is in the image
    assert run["info"] == {"state": 1, "max KiB": 256 << 10, "vcpus": 1}   # running
    if name == "kemu":
        assert run["write requests"] >= 1
    else:
        # libvirt 9.0 looks for a virtio disk's statistics under
        # /machine/peripheral/ID/virtio-backend, which QEMU's virtio-mmio does not have.
        assert run.get("write requests", 0) >= 1 or "cannot find statistics" in run.get(
            "block stats error", ""), run
    assert run["answered while paused"] is False
    assert run["state after reboot"] == 1                # running again
    assert run["power button seen"] is True
    assert run["listed after undefine"] is False


def test_kemu_microvm_domain_lifecycle(seen):
    _check_lifecycle(seen["kemu"], "kemu")


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_the_same_xml_under_qemu(seen):
    _check_lifecycle(seen["qemu"], "qemu")


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_the_guest_sees_the_same_hardware_under_kemu_and_qemu(seen):
    if "hardware" not in seen["kemu"] or "hardware" not in seen["qemu"]:
        pytest.skip("needs both lifecycle runs to reach the console")
    assert seen["kemu"]["hardware"] == seen["qemu"]["hardware"]


def test_domcapabilities_offer_microvm_on_kvm(seen):
    from kemu.machines.x86_microvm import MAX_VCPUS
    caps = seen["domcapabilities"]
    assert caps == {"domain": "kvm", "machine": "microvm", "arch": "x86_64",
                    "vcpu max": str(MAX_VCPUS), "host-passthrough": "yes"}, caps
