"""PCI Express on the x86-64 microvm board: ``-M microvm,pcie=on`` as QEMU spells it.

Debian's cloud amd64 kernel finds the host bridge through ACPI (MCFG and
``\\_SB.PCI0``), assigns the BARs itself, binds virtio-pci to a
virtio-blk-pci disk and a virtio-rng-pci device, takes MSI-X interrupts
(delivered with KVM_SIGNAL_MSI) and writes a sector that must reach the
image file.  The same command line runs under qemu-system-x86_64 in the same
L1 and the guest's view of the bus (/sys/bus/pci: address, vendor, device)
must be the same (``disable-legacy=on``: kemu's virtio-pci devices are
modern-only, QEMU's on the root bus are transitional by default).

Linux runs on real KVM: directly where /dev/kvm is hardware-backed, else in
the nested harness (:mod:`kemu.testing.nested`), both boards' boots in one
L1 run.  Skips, saying why, when neither is possible.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from kemu.errors import GuestBuildError
from kemu.testing import nested

pytestmark = pytest.mark.slow

CHECKOUT = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 300

#: /init's work before its report: virtio-pci and the disk driver, the bus as the
#: guest sees it, a sector written with fsync, and how many MSI(-X) vectors it uses.
PCIE_INIT = """
for m in virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do insmod /lib/modules/$m.ko 2>/dev/null; done
echo "PCI-BUS $(for d in /sys/bus/pci/devices/*; do printf '%s=%s:%s,' ${d##*/} $(cat $d/vendor) $(cat $d/device); done)"
echo KEMU-L2-PCIE-MARK | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null && echo L2-DISK-WRITTEN
echo "MSI-VECTORS $(grep -c PCI-MSI /proc/interrupts)"
"""


def _command(binary: str, kernel: Path, initrd: Path, append: str, disk: str) -> str:
    args = ["-M", "microvm,pcie=on", "-accel", "kvm", "-m", "512", "-smp", "1",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
            "-serial", "stdio", "-display", "none", "-no-reboot",
            "-drive", f"file={disk},format=raw,if=none,id=d0",
            "-device", "virtio-blk-pci,drive=d0,disable-legacy=on",
            "-device", "virtio-rng-pci,disable-legacy=on"]
    return f"{binary} {shlex.join(args)}"


@pytest.fixture(scope="module")
def boots():
    """Both VMMs' boots in one run: name -> (exit status, console output)."""
    from kemu.guest.debian import default_guest
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    try:
        guest = default_guest("x86_64", show_progress=False)
        initrd = nested.l2_initrd(guest.initrd, "l2-pcie-initrd.cpio.gz", PCIE_INIT)
    except GuestBuildError as e:
        pytest.skip(f"cannot build the x86-64 guest here: {e}")
    append = " ".join(w for w in guest.append.split() if w != "pci=off")
    runs = {}
    for name, binary in (("kemu", f"{shlex.quote(sys.executable)} -m kemu.cli"),
                         ("qemu", qemu)):
        disk = f"${{TMPDIR:-/tmp}}/kemu-l2-pcie-{name}.raw"
        cmd = _command(binary, guest.kernel, initrd, append, "DISK").replace("DISK", disk)
        runs[name] = (f"truncate -s 16M {disk} && {cmd}; rc=$?; "
                      f"echo \"L1-DISK: $(head -c 17 {disk})\"; (exit $rc)")
    try:
        return nested.run_each_on_real_kvm(runs, CHECKOUT, BOOT_TIMEOUT)
    except nested.RealKvmUnavailable as e:
        pytest.skip(str(e))


def _bus(text: str) -> list[str]:
    m = re.search(r"PCI-BUS (\S*)", text)
    assert m, f"the guest did not list its PCI bus:\n{text[-3000:]}"
    return sorted(filter(None, m.group(1).split(",")))


def test_linux_finds_virtio_pci_devices_on_the_microvm_pcie_bus(boots):
    status, text = boots["kemu"]
    bus = _bus(text)
    # The host bridge (QEMU's gpex root, 1b36:0008) and the two virtio 1.x functions.
    assert "0000:00:00.0=0x1b36:0x0008" in bus, bus
    assert sum(1 for d in bus if d.endswith("=0x1af4:0x1042")) == 1, bus    # virtio-blk
    assert sum(1 for d in bus if d.endswith("=0x1af4:0x1044")) == 1, bus    # virtio-rng
    assert status == 0, text[-3000:]


def test_a_sector_written_over_virtio_blk_pci_reaches_the_image(boots):
    status, text = boots["kemu"]
    assert "L2-DISK-WRITTEN" in text, text[-3000:]
    assert "L1-DISK: KEMU-L2-PCIE-MARK" in text
    m = re.search(r"MSI-VECTORS (\d+)", text)
    assert m and int(m.group(1)) >= 2, text[-3000:]     # MSI-X through KVM_SIGNAL_MSI
    assert "rng=virtio_rng.0" in text                   # virtio-rng-pci bound
    assert status == 0


def test_the_guest_sees_the_same_bus_as_under_qemu(boots):
    qstatus, qtext = boots["qemu"]
    assert qstatus == 0 and "L1-DISK: KEMU-L2-PCIE-MARK" in qtext, qtext[-3000:]
    assert _bus(boots["kemu"][1]) == _bus(qtext)
