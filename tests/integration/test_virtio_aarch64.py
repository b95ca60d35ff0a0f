"""Virtio devices on the aarch64 virt board under TCG, driven by Debian's kernel."""

import re
import subprocess
import sys

KEMU = [sys.executable, "-m", "kemu.cli"]


def boot(args, script: str, timeout=180):
    proc = subprocess.run(KEMU + ["run", *args], input=script.encode(), capture_output=True,
                          timeout=timeout)
    out = proc.stdout.decode(errors="replace").replace("\r", "")
    assert proc.returncode == 0, f"{proc.stderr.decode()}\n{out[-3000:]}"
    return out


def test_rng_gives_entropy(guest):
    out = boot(["-device", "virtio-rng-device"],
               "cat /sys/class/misc/hw_random/rng_current\n"
               "echo DISTINCT=$(head -c 4096 /dev/hwrng | od -An -tx1 -v | tr -s ' ' '\\n'"
               " | sort -u | wc -l)\n"
               "poweroff -f\n")
    assert "virtio_rng.0" in out
    distinct = int(re.search(r"DISTINCT=(\d+)", out).group(1))
    assert distinct > 200                      # 4 KiB of real entropy covers most byte values
def test_disk_write_sync_poweroff_reaches_the_host_file(guest, tmp_path):
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * (64 << 20))
    with open(disk, "r+b") as f:               # something for the guest to read
        f.seek(7 * 512)
        f.write(b"written-by-the-host")
    out = boot(["--disk", str(disk)],
               "cat /sys/block/vda/size\n"
               "dd if=/dev/vda bs=512 skip=7 count=1 2>/dev/null | head -c 19; echo\n"
               "mke2fs -q /dev/vda && mount /dev/vda /mnt && echo hello-from-guest > /mnt/f"
               " && sync && umount /mnt && echo fs-ok\n"
               "echo raw-block-data | dd of=/dev/vda bs=512 seek=100000 conv=fsync 2>/dev/null\n"
               "poweroff -f\n")
    assert "131072" in out                      # 64 MiB in 512-byte sectors
    assert "written-by-the-host" in out
    assert "fs-ok" in out
    data = disk.read_bytes()
    assert data[100000 * 512:100000 * 512 + 14] == b"raw-block-data"
    assert b"hello-from-guest" in data          # the file's data block


def test_qemu_drive_spelling_and_read_only(guest, tmp_path):
    disk = tmp_path / "ro.raw"
    disk.write_bytes(b"R" * (1 << 20))
    out = boot(["-drive", f"file={disk},format=raw,if=virtio,readonly=on"],
               "cat /sys/block/vda/ro\n"
               "echo x | dd of=/dev/vda bs=512 count=1 conv=fsync; echo rc=$?\n"
               "poweroff -f\n")
    assert "\n1\n" in out
    assert disk.read_bytes() == b"R" * (1 << 20)


def test_missing_image_is_one_line(guest, tmp_path):
    proc = subprocess.run(KEMU + ["run", "--disk", str(tmp_path / "nope.img")],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_linux_finds_its_disk_on_legacy_virtio_mmio(guest, tmp_path):
    """-global virtio-mmio.force-legacy=on (QEMU 7.2's default on virt): Linux's
    virtio_mmio driver speaks version 1 and the disk works; VIRTIO_F_VERSION_1
    (feature bit 32) stays off."""
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"legacy-disk-data" + b"\0" * ((8 << 20) - 16))
    # The disk on virtio-mmio explicitly: a plain disk is virtio-blk-pci on virt, as QEMU's.
    out = boot(["-global", "virtio-mmio.force-legacy=on",
                "-drive", f"if=none,id=d0,format=raw,file={disk}",
                "-device", "virtio-blk-device,drive=d0"],
               "for d in /sys/bus/virtio/devices/*; do"
               " echo DEV $(cat $d/device) V1=$(cut -c33 $d/features); done\n"
               "dd if=/dev/vda bs=16 count=1 2>/dev/null; echo\n"
               "poweroff -f\n")
    assert "DEV 0x0002 V1=0" in out
    assert "legacy-disk-data" in out
