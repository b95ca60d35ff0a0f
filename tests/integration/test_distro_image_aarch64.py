"""The Debian 12 arm64 systemd disk image (scripts/build-distro-image.py), under kemu and QEMU.

Skipped when the image has not been built (``scripts/bootstrap.sh --distro``
builds it once, in about 15 minutes; never in CI).  Each test boots the
same image, opened with ``-snapshot`` so it stays pristine, under kemu and
under qemu-system-aarch64 with the same command line:

* direct kernel boot (Debian's kernel and initramfs taken out of the image,
  virtio disk, user networking): the guest reaches ``running`` with no
  failed unit, its UTC clock is the host's (the PL031 RTC),
  systemd-detect-virt names QEMU's virt board, the PMU is there for perf,
  and ``systemctl poweroff`` ends the VMM with status 0;
* through firmware: ``-bios QEMU_EFI.fd`` runs EDK2, which finds GRUB on
  the disk's EFI system partition, GRUB loads Linux; the guest sees EFI
  (/sys/firmware/efi) and reaches ``running`` as above.  Under kemu this
  skips, in one line, while kemu refuses ``-bios``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kemu.testing.stdio_console import KEMU, Console


def _bench():
    """bench/boot_distro.py: the image's place and both command lines, shared."""
    path = Path(__file__).resolve().parents[2] / "bench" / "boot_distro.py"
    spec = importlib.util.spec_from_file_location("boot_distro", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()
MANIFEST, FIRMWARE = bench.MANIFEST, bench.FIRMWARE
direct_boot_args, firmware_boot_args = bench.direct_boot_args, bench.firmware_boot_args
#: CPU seconds a boot to the login prompt may take (TCG, 2 shared cores).
LOGIN_TIMEOUT = 900


@pytest.fixture(scope="module")
def image() -> dict:
    if not MANIFEST.exists():
        pytest.skip(f"no distro image at {MANIFEST.parent} (scripts/bootstrap.sh --distro "
                    "builds it once, in about 15 minutes)")
    return json.loads(MANIFEST.read_text())


@pytest.fixture(params=["kemu", "qemu"])
def vmm(request) -> list[str]:
    if request.param == "kemu":
        return KEMU
    qemu = shutil.which("qemu-system-aarch64")
    if qemu is None:
        pytest.skip("qemu-system-aarch64 is missing (apt-get install qemu-system-arm)")
    return [qemu]


@pytest.fixture
def start():
    consoles: list[Console] = []

    def start(command: list[str], args: list[str]) -> Console:
        consoles.append(Console(args, command=command))
        return consoles[-1]
    yield start
    for c in consoles:
        c.close()


def log_in_and_check(vm: Console) -> None:
    """From the login prompt: running, no failed unit, clock, virt; then power off."""
    vm.expect(rb"login: ", timeout=LOGIN_TIMEOUT)
    vm.send("root\n")
    vm.expect(rb"# ", timeout=120)
    vm.send("export TERM=dumb\n")
    state = vm.run("systemctl is-system-running --wait || true", timeout=600).split()
    assert state and state[-1] == "running", vm.run("systemctl --failed --no-legend --plain")
    assert vm.run("systemctl --failed --no-legend --plain | wc -l").split()[-1] == "0"
    # The guest's answer may take long on a busy host: its time must fall between the
    # host's before the command was sent and after the answer came (10 s either side).
    sent = time.time()
    guest_now = int(vm.run("date -u +%s").split()[-1])
    answered = time.time()
    assert sent - 10 <= guest_now <= answered + 10, \
        f"guest clock {guest_now} outside [{sent:.0f}, {answered:.0f}] +- 10 s"
    assert vm.run("systemd-detect-virt").split()[-1] == "qemu"


def power_off(vm: Console) -> None:
    vm.send("systemctl poweroff\n")
    assert vm.wait(300) == 0


# Under kemu only: QEMU boots the same image in the firmware test below and in the
# benchmark (each boot is one to two minutes of the suite's time).
@pytest.mark.parametrize("vmm", ["kemu"], indirect=True)
def test_direct_kernel_boot_to_running(image, vmm, start):
    vm = start(vmm, direct_boot_args(image))
    log_in_and_check(vm)
    assert "armv8_pmuv3" in vm.run("ls /sys/bus/event_source/devices")
    power_off(vm)


def refused(vm: Console, wall: float = 60.0) -> str | None:
    """kemu's one-line refusal if it ends at once without printing to the console,
    else None (it runs: the firmware printed something, or it is still going)."""
    end = time.monotonic() + wall
    while time.monotonic() < end and not vm.buffer:
        try:
            vm.proc.wait(0.1)
        except subprocess.TimeoutExpired:
            continue
        if vm.proc.returncode != 0 and not vm.buffer:
            return vm.stderr.strip().splitlines()[-1] if vm.stderr.strip() else "no message"
        break
    return None


def test_firmware_boot_through_edk2_and_grub(image, vmm, start):
    if not FIRMWARE.exists():
        pytest.skip(f"{FIRMWARE} is missing (apt-get install qemu-efi-aarch64)")
    vm = start(vmm, firmware_boot_args(image))
    if vmm is KEMU and (reason := refused(vm)):
        pytest.skip(f"kemu does not run -bios yet: {reason}")
    vm.expect(image["grub_mark"].encode(), timeout=LOGIN_TIMEOUT)
    vm.expect(bench.EFI_STUB, timeout=LOGIN_TIMEOUT)
    log_in_and_check(vm)
    vm.run("test -d /sys/firmware/efi")
    assert vm.run("cat /proc/cmdline").find(f"root=UUID={image['root_uuid']}") >= 0
    power_off(vm)
