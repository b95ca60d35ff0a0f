"""qcow2 disks written by a Linux guest under kemu, checked with QEMU's own qemu-img.

One boot of the default aarch64 guest with two qcow2 disks: an overlay that
qemu-img made on a raw base (the guest reads the base through it and
overwrites parts of it, one sector inside a cluster the base still backs),
and an empty image made by ``kemu img create`` that the guest formats and
fills.  Afterwards qemu-img finds no errors in either, the overlay compares
equal to the expected bytes, and the base is untouched.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest

KEMU = [sys.executable, "-m", "kemu.cli"]
MiB = 1 << 20
BASE_SIZE = 64 * MiB
NEW_SIZE = 32 * MiB
PATTERN_OFFSET = 8 * MiB          # where the guest writes 1 MiB of `yes KEMU`


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def written(guest, tmp_path_factory):
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed (apt-get install qemu-utils)")
    tmp = tmp_path_factory.mktemp("qcow2-guest")
    base = tmp / "base.raw"
    base.write_bytes(os.urandom(BASE_SIZE))
    overlay = tmp / "overlay.qcow2"
    proc = qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay))
    assert proc.returncode == 0, proc.stderr
    new = tmp / "new.qcow2"
    proc = subprocess.run(KEMU + ["img", "create", "-f", "qcow2", str(new), str(NEW_SIZE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    base_digest = hashlib.sha256(base.read_bytes()).hexdigest()
    script = (
        # Which device is which: the overlay is the 64 MiB one.
        "for d in vda vdb; do if [ $(cat /sys/block/$d/size) = 131072 ]; then OV=/dev/$d;"
        " else NEW=/dev/$d; fi; done\n"
        "echo BASE-SECTOR-9=$(dd if=$OV bs=512 skip=9 count=1 2>/dev/null | md5sum)\n"
        f"yes KEMU | head -c {MiB} | dd of=$OV bs=64k seek={PATTERN_OFFSET // 65536}"
        " conv=fsync 2>/dev/null && echo PATTERN-OK\n"
        "printf sector-three | dd of=$OV bs=512 seek=3 conv=sync,fsync 2>/dev/null"
        " && echo SECTOR-OK\n"
        "mke2fs -q $NEW && mount $NEW /mnt && yes qcow2-file | head -c 3000000 > /mnt/f"
        " && sync && umount /mnt && echo FS-OK\n"
        "mount -o ro $NEW /mnt && echo FILE=$(md5sum < /mnt/f) && umount /mnt\n"
        "poweroff -f\n")
    proc = subprocess.run(KEMU + ["run", "-drive", f"file={overlay},format=qcow2,if=virtio",
                                  "--disk", str(new)],
                          input=script.encode(), capture_output=True, timeout=300)
    out = proc.stdout.decode(errors="replace").replace("\r", "")
    assert proc.returncode == 0, f"{proc.stderr.decode()}\n{out[-3000:]}"
    return {"base": base, "overlay": overlay, "new": new, "out": out, "tmp": tmp,
            "base_digest": base_digest}


def test_guest_reads_the_backing_file_through_the_overlay(written):
    sector = written["base"].read_bytes()[9 * 512:10 * 512]
    m = re.search(r"BASE-SECTOR-9=([0-9a-f]{32})", written["out"])
    assert m and m.group(1) == hashlib.md5(sector).hexdigest()


def test_overlay_passes_qemu_img_check_and_compare(written):
    out = written["out"]
    assert "PATTERN-OK" in out and "SECTOR-OK" in out
    proc = qemu_img("check", str(written["overlay"]))
    assert proc.returncode == 0 and "No errors were found" in proc.stdout, proc.stdout
    expected = bytearray(written["base"].read_bytes())
    expected[PATTERN_OFFSET:PATTERN_OFFSET + MiB] = (b"KEMU\n" * (MiB // 5 + 1))[:MiB]
    expected[3 * 512:4 * 512] = b"sector-three".ljust(512, b"\0")
    want = written["tmp"] / "expected.raw"
    want.write_bytes(expected)
    proc = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(written["overlay"]), str(want))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The base was opened read-only: not one byte changed.
    assert hashlib.sha256(written["base"].read_bytes()).hexdigest() == written["base_digest"]


def test_kemu_created_image_formatted_by_the_guest_is_clean(written):
    out = written["out"]
    assert "FS-OK" in out
    m = re.search(r"FILE=([0-9a-f]{32})", out)
    assert m and m.group(1) == hashlib.md5((b"qcow2-file\n" * 300000)[:3000000]).hexdigest()
    proc = qemu_img("check", "--output=json", str(written["new"]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"check-errors": 0' in proc.stdout
    # QEMU reads the guest's file system back: the file's bytes are in the image.
    raw = written["tmp"] / "new.raw"
    assert qemu_img("convert", "-O", "raw", str(written["new"]), str(raw)).returncode == 0
    assert b"qcow2-file\nqcow2-file\n" in raw.read_bytes()
