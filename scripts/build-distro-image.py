#!/usr/bin/env python3
"""Build the Debian 12 arm64 systemd image for bench/boot_distro.py, once, into the cache.

    scripts/build-distro-image.py [--rebuild] [--size 3G]

Result, in ~/.cache/kemu/distro/debian12-arm64/: ``disk.raw`` (ext4, the whole
disk is the root file system), ``vmlinuz`` and ``initrd.img`` (Debian's
linux-image-arm64 and the initramfs its postinst made), ``manifest.json``.

How, on a host with neither binfmt_misc nor systemd: debootstrap's first
stage downloads and unpacks the packages for arm64 on the host (Debian's
packages, from the mirror the host's apt uses); the tree gets a few files
(fstab, hostname, a systemd-networkd DHCP profile); ``mkfs.ext4 -d`` makes
it a disk image without mounting anything; the second stage (dpkg
configuring every package, the initramfs) then runs inside an arm64 guest:
kemu's default guest kernel and busybox initramfs (``kemu guest build``)
under qemu-system-aarch64, with the image as its virtio disk.  Tens of
minutes; never in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

SUITE = "bookworm"
PACKAGES = ["systemd", "systemd-sysv", "systemd-resolved", "udev", "dbus", "linux-image-arm64",
            "initramfs-tools", "ca-certificates", "iproute2", "kmod", "procps", "e2fsprogs",
            "libpam-systemd"]
HOSTNAME = "debian-kemu"
APPEND = "root=/dev/vda rw console=ttyAMA0"
NETWORK = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n"


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "kemu" / "distro" / "debian12-arm64"


def say(text: str) -> None:
    print(f"build-distro-image: {text}", file=sys.stderr, flush=True)


def host_mirror() -> str:
    """The Debian mirror the host's apt uses (deb822 or one-line sources)."""
    paths = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    paths += [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    for path in paths:
        try:
            text = path.read_text()
        except OSError:
            continue
        for m in re.finditer(r"^URIs:\s*(\S+)", text, re.M):
            if "security" not in m.group(1):
                return m.group(1)
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", text, re.M):
            if "security" not in m.group(1):
                return m.group(1)
    raise SystemExit("build-distro-image: no Debian mirror in the host's apt sources")


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        say(f"installing {package} (for {tool})")
        subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True,
                       stdout=subprocess.DEVNULL)
        path = shutil.which(tool)
    if path is None:
        raise SystemExit(f"build-distro-image: {tool} is missing (apt-get install {package})")
    return path


def first_stage(root: Path, mirror: str) -> None:
    debootstrap = need("debootstrap", "debootstrap")
    say(f"debootstrap first stage ({SUITE}, arm64, {len(PACKAGES)} packages and their "
        "dependencies)")
    subprocess.run([debootstrap, "--foreign", "--arch=arm64", "--variant=minbase",
                    "--include=" + ",".join(PACKAGES), SUITE, str(root), mirror], check=True)
    (root / "etc" / "fstab").write_text("/dev/vda / ext4 defaults 0 1\n")
    (root / "etc" / "hostname").write_text(HOSTNAME + "\n")
    (root / "etc" / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n")
    net = root / "etc" / "systemd" / "network"
    net.mkdir(parents=True, exist_ok=True)
    (net / "20-wired.network").write_text(NETWORK)
    (root / "etc" / "apt" / "sources.list").write_text(
        f"deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\n")


def make_disk(root: Path, disk: Path, size: str) -> None:
    say(f"mkfs.ext4 -d: {disk} ({size})")
    disk.unlink(missing_ok=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(root), str(disk), size],
                   check=True)


SECOND_STAGE = [
    "mount /dev/vda /mnt && mount -t proc proc /mnt/proc && mount -t sysfs sys /mnt/sys"
    " && mount -t devtmpfs dev /mnt/dev",
    "chroot /mnt /debootstrap/debootstrap --second-stage > /dev/null 2>/tmp/err;"
    " echo STAGE2=$?; tail -5 /tmp/err",
    "chroot /mnt sh -c 'passwd -d root && systemctl enable systemd-networkd systemd-resolved"
    " && ln -sf /run/systemd/resolve/stub-resolv.conf /etc/resolv.conf && apt-get clean"
    " && ls /boot'; echo SETUP=$?",
    "umount /mnt/dev /mnt/sys /mnt/proc; umount /mnt; sync; echo SYNCED",
]


def second_stage(disk: Path) -> None:
    from kemu.guest.debian import default_guest
    guest = default_guest("aarch64", show_progress=False)
    qemu = need("qemu-system-aarch64", "qemu-system-arm")
    say("second stage in an arm64 guest (qemu-system-aarch64, TCG): dpkg configures "
        "every package, the kernel's postinst makes its initramfs; 30-60 min "
        "(about 55 min here on 2 shared cores)")
    proc = subprocess.Popen(
        [qemu, "-M", "virt", "-cpu", "max", "-smp", "2", "-accel", "tcg,thread=multi",
         "-m", "2048", "-nographic", "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
         "-append", guest.append, "-drive", f"file={disk},format=raw,if=none,id=root",
         "-device", "virtio-blk-device,drive=root"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = bytearray()
    lock = threading.Lock()

    def reader() -> None:
        while data := proc.stdout.read1(4096):
            with lock:
                out.extend(data)
    threading.Thread(target=reader, daemon=True).start()

    def expect(pattern: bytes, timeout: float) -> re.Match:
        end = time.monotonic() + timeout
        start = len(out)
        while time.monotonic() < end:
            with lock:
                m = re.search(pattern, bytes(out[start:]))
            if m:
                return m
            if proc.poll() is not None:
                break
            time.sleep(0.5)
        proc.kill()
        raise SystemExit(f"build-distro-image: {pattern!r} not seen; the guest printed:\n"
                         f"{out[-3000:].decode(errors='replace')}")

    expect(rb"kemu guest ready", 600)
    for command in SECOND_STAGE:
        proc.stdin.write(command.encode() + b"\n")
        proc.stdin.flush()
        if "STAGE2" in command:
            m = expect(rb"STAGE2=(\d+)", 3 * 3600)
            if m.group(1) != b"0":
                proc.kill()
                raise SystemExit("build-distro-image: debootstrap's second stage failed:\n"
                                 + out[-3000:].decode(errors="replace"))
            say("second stage done")
        elif "SETUP" in command:
            m = expect(rb"SETUP=(\d+)", 600)
            if m.group(1) != b"0":
                proc.kill()
                raise SystemExit("build-distro-image: setting up the image failed:\n"
                                 + out[-3000:].decode(errors="replace"))
        elif "SYNCED" in command:
            expect(rb"SYNCED", 600)
    proc.stdin.write(b"poweroff -f\n")
    proc.stdin.flush()
    proc.wait(120)


def extract_boot_files(disk: Path, dest: Path) -> tuple[Path, Path]:
    """Debian's kernel and initramfs, out of the image with debugfs (nothing mounted)."""
    listing = subprocess.run(["debugfs", "-R", "ls /boot", str(disk)], capture_output=True,
                             text=True, check=True).stdout
    kernels = sorted(re.findall(r"vmlinuz-\S+", listing))
    initrds = sorted(re.findall(r"initrd\.img-\S+", listing))
    if not kernels or not initrds:
        raise SystemExit(f"build-distro-image: no kernel or initramfs in /boot: {listing!r}")
    kernel, initrd = dest / "vmlinuz", dest / "initrd.img"
    for name, out in ((kernels[-1], kernel), (initrds[-1], initrd)):
        subprocess.run(["debugfs", "-R", f"dump /boot/{name} {out}", str(disk)],
                       capture_output=True, check=True)
        if not out.exists() or out.stat().st_size == 0:
            raise SystemExit(f"build-distro-image: could not extract /boot/{name}")
    return kernel, initrd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rebuild", action="store_true", help="build again even if cached")
    ap.add_argument("--size", default="3G", help="disk size (default 3G)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("build-distro-image: debootstrap needs root")
    dest = cache_dir()
    manifest = dest / "manifest.json"
    if manifest.exists() and not args.rebuild:
        print(manifest)
        return 0
    dest.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    root = dest / "rootfs"
    if root.exists():
        shutil.rmtree(root)
    disk = dest / "disk.raw"
    start = time.monotonic()
    first_stage(root, host_mirror())
    make_disk(root, disk, args.size)
    shutil.rmtree(root)
    second_stage(disk)
    kernel, initrd = extract_boot_files(disk, dest)
    manifest.write_text(json.dumps({"disk": str(disk), "kernel": str(kernel),
                                    "initrd": str(initrd), "append": APPEND,
                                    "suite": SUITE, "packages": PACKAGES}, indent=1) + "\n")
    say(f"done in {time.monotonic() - start:.0f} s")
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
