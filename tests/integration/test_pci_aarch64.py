"""PCI Express on the virt board with Linux: virtio-pci disks and NICs.

The default aarch64 guest (Debian's cloud kernel: the generic ECAM host driver
built in, virtio_pci as a module in the initramfs) gets ``-device
virtio-blk-pci`` on ``-drive if=none``: the disk shows in /sys/bus/pci as
1af4:1042 bound to virtio-pci, and a write from the guest reaches the image
file.  The same guest under qemu-system-aarch64 with the same command line
(``disable-legacy=on``: kemu's devices are modern-only, QEMU's on pcie.0 are
transitional by default) shows the same PCI functions.  Interrupts are MSI-X
through the GICv2m frame.  A ``virtio-net-pci`` NIC on ``-netdev user`` takes
a DHCP lease.
"""

from __future__ import annotations

import re
import shutil

import pytest
from kemu.testing.stdio_console import Console

MARKER = b"written-through-virtio-pci\n"

#: One line per PCI function: address, IDs, class, revision, subsystem, driver, BAR 4's
#: size and flags (from the resource file: start end flags per BAR).
LIST_PCI = (
    'for d in /sys/bus/pci/devices/*; do set -- $(sed -n 5p $d/resource); '
    'echo "PCI $(basename $d) $(cat $d/vendor):$(cat $d/device) $(cat $d/class) '
    '$(cat $d/revision) $(cat $d/subsystem_vendor):$(cat $d/subsystem_device) '
    '$(basename "$(readlink $d/driver)") bar4=$(( $2 - $1 + 1 )):$3"; done')


def pci_functions(console) -> list[str]:
    console.expect(rb"kemu guest ready", 300)
    console.expect(rb"# ", 60)
    out = console.run(LIST_PCI)
    return sorted(line for line in out.splitlines() if line.startswith("PCI "))


def blk_args(image) -> list[str]:
    return ["-nic", "none", "-device", "virtio-blk-pci,drive=d0,addr=3,disable-legacy=on",
            "-drive", f"if=none,id=d0,file={image},format=raw"]


def test_virtio_blk_pci_disk_write_reaches_image_and_matches_qemu(guest, console_factory,
                                                                   tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 << 20))
    c = console_factory("run", *blk_args(image))
    ours = pci_functions(c)
    assert any(" 0x1af4:0x1042 0x010000 0x01 0x1af4:0x1100 virtio-pci bar4=16384:" in line
               and line.startswith("PCI 0000:00:03.0") for line in ours), ours
    assert any(line.startswith("PCI 0000:00:00.0 0x1b36:0x0008 0x060000") for line in ours)
    assert "vda" in c.run("cat /proc/partitions")
    # The disk's interrupts are MSI-X messages through the GICv2m frame, as under QEMU.
    interrupts = c.run("cat /proc/interrupts")
    msi = re.search(r"^\s*\d+:\s+(\d+)\s+MSI \d+\s+Edge\s+virtio\d+-req", interrupts, re.M)
    assert msi and int(msi.group(1)) > 0, interrupts
    c.run(f"printf '{MARKER.decode().strip()}\\n' | dd of=/dev/vda bs=512 seek=7 conv=fsync")
    c.send("poweroff -f\n")
    assert c.wait(60) == 0
    assert image.read_bytes()[7 * 512:7 * 512 + len(MARKER)] == MARKER

    qemu = shutil.which("qemu-system-aarch64")
    if qemu is None:
        pytest.skip("qemu-system-aarch64 is not installed: no comparison with QEMU")
    theirs_vm = Console(["-M", "virt", "-cpu", "cortex-a57", "-m", "256", "-nographic",
                         "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
                         "-append", guest.append, *blk_args(image)], command=[qemu])
    try:
        theirs = pci_functions(theirs_vm)
    finally:
        theirs_vm.close()
    # QEMU's virt adds MSI-X (BAR 1); the functions, their IDs, drivers and BAR 4 agree.
    assert ours == theirs, f"kemu: {ours}\nQEMU: {theirs}"


@pytest.mark.skipif(shutil.which("passt") is None, reason="passt is not installed")
def test_virtio_net_pci_gets_a_dhcp_lease(guest, console_factory):
    c = console_factory("run", "-netdev", "user,id=n0",
                        "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:99")
    m = c.expect(rb"kemu: eth0: ([0-9.]+)/\d+ from DHCP, gateway ([0-9.]+)", 300)
    c.expect(rb"# ", 60)
    assert "52:54:00:12:34:99" in c.run("cat /sys/class/net/eth0/address")
    assert "virtio-pci" in c.run("basename $(readlink /sys/class/net/eth0/device/../driver)")
    assert m.group(1).decode() in c.run("ip -4 addr show eth0")
    c.send("poweroff -f\n")
    assert c.wait(60) == 0


def test_rng_serial_and_vsock_on_pci(guest, console_factory):
    """virtio-rng-pci, virtio-serial-pci and vhost-vsock-pci: the device models of
    virtio-mmio, each found by Linux through virtio-pci at the slot asked for."""
    c = console_factory("run", "-nic", "none", "-device", "virtio-rng-pci,addr=4",
                        "-device", "virtio-serial-pci,addr=5", "-device", "virtconsole",
                        "-device", "vhost-vsock-pci,guest-cid=7,addr=6")
    functions = pci_functions(c)
    for slot, device in ((4, "0x1044"), (5, "0x1043"), (6, "0x1053")):
        assert any(line.startswith(f"PCI 0000:00:0{slot}.0 0x1af4:{device} ")
                   and " virtio-pci " in line for line in functions), functions
    assert "virtio_rng" in c.run("cat /sys/class/misc/hw_random/rng_current")
    assert len(set(c.run("head -c 64 /dev/hwrng | od -An -tx1 -v").split())) > 8
    c.run("echo pci-$((6 * 7))-console > /dev/hvc0")    # printed by kemu as "pci-42-console"
    assert "0x0013" in c.run("cat /sys/bus/virtio/devices/*/device")
    c.run("test -c /dev/vsock")
    c.send("poweroff -f\n")
    assert c.wait(60) == 0
    assert b"pci-42-console" in c.buffer


def test_pci_disk_after_guest_reboot(guest, console_factory, tmp_path):
    """A guest reset clears the BARs and devices; Linux enumerates and uses them again."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    c = console_factory("run", *blk_args(image))
    first = pci_functions(c)
    c.send("reboot -f\n")
    assert pci_functions(c) == first
    c.run(f"printf '{MARKER.decode().strip()}\\n' | dd of=/dev/vda bs=512 seek=2 conv=fsync")
    c.send("poweroff -f\n")
    assert c.wait(60) == 0
    assert image.read_bytes()[2 * 512:2 * 512 + len(MARKER)] == MARKER
