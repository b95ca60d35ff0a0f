#!/usr/bin/env python3
"""Build the Debian 12 arm64 systemd disk image (bench/boot_distro.py, issues 15 and 18), once.

    scripts/build-distro-image.py [--rebuild] [--size 3G]
    (scripts/bootstrap.sh --distro installs the tools and runs it)

Result, in ~/.cache/kemu/distro/debian12-arm64/:

* ``disk.raw``: a GPT disk.  Partition 1 is an EFI system partition (FAT)
  with GRUB for arm64 at the removable-media path ``EFI/BOOT/BOOTAA64.EFI``
  and its ``EFI/BOOT/grub.cfg`` (console=ttyAMA0); partition 2 is the ext4
  root: systemd, udev, systemd-networkd (DHCP on any wired NIC),
  systemd-resolved, Debian's linux-image-arm64 and its initramfs, apt.  Root
  has no password: ``root`` at the serial getty on ttyAMA0 logs in.
  The same disk boots two ways: through firmware (``-bios QEMU_EFI.fd``,
  EDK2 then GRUB) or by direct kernel boot.
* ``vmlinuz``, ``initrd.img``: the image's kernel and initramfs, for direct
  kernel boot with the ``append`` line of the manifest.
* ``manifest.json``: the paths, the kernel command line, the root UUID.

How, on a host with neither binfmt_misc nor a mount it may use: debootstrap's
first stage downloads Debian's arm64 packages (from the mirror the host's apt
uses; the .debs are kept in ~/.cache/kemu/distro/debs for a rebuild) and
unpacks them; the second stage (dpkg installs and configures every package,
the kernel's postinst makes the initramfs) runs arm64 binaries with
``proot -q qemu-aarch64-static``: proot catches every execve and runs it
under QEMU's user-mode emulator, so no binfmt_misc is needed; it runs in an
identity-mapped user namespace (no mounts reach the host) under a seccomp
filter that answers statx and faccessat2 with ENOSYS (proot 5.1 does not
translate their paths; glibc and qemu-user fall back to calls it does).
The initramfs carries the virt board's drivers (MODULES=list).  (mmdebstrap
dropped its proot mode; its other modes need binfmt_misc for a foreign
architecture.)  The partitions are written into the disk file without
mounting anything: sfdisk lays out the GPT, ``mkfs.ext4 -d -E offset=``
builds the root file system from the tree, mtools (mformat, mmd, mcopy)
builds the FAT one; GRUB's EFI binary is made by ``grub-mkimage`` from
Debian's grub-efi-arm64-bin, with every module it needs built in.
About 25 minutes on 2 busy shared cores; never in CI.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

SUITE = "bookworm"
PACKAGES = ["systemd", "systemd-sysv", "systemd-resolved", "udev", "dbus", "linux-image-arm64",
            "initramfs-tools", "ca-certificates", "iproute2", "kmod", "procps", "e2fsprogs",
            "libpam-systemd", "grub-efi-arm64-bin", "util-linux-extra"]
HOSTNAME = "debian-kemu"
NETWORK = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n"
#: Documentation and translations are left out of the image (dpkg path filters).
DPKG_EXCLUDES = ("path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\n"
                 "path-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\n"
                 "path-exclude /usr/share/locale/*\npath-include /usr/share/locale/locale.alias\n")
#: The GRUB modules built into BOOTAA64.EFI (nothing is loaded from disk).
GRUB_MODULES = ["part_gpt", "part_msdos", "fat", "ext2", "normal", "linux", "gzio", "search",
                "search_fs_uuid", "configfile", "echo", "test", "efi_gop"]
#: What the initramfs carries: virtio over MMIO and PCI, disks, NIC, the root's ext4.
INITRAMFS_MODULES = ["virtio_mmio", "virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net",
                     "virtio_console", "ext4", "crc32c_generic"]
#: Printed by GRUB before it loads Linux: the benchmark's end of the firmware phase.
GRUB_MARK = "kemu-distro: GRUB loading Linux"
#: Before /usr/bin on the maintainer scripts' PATH (debootstrap puts /sbin, /usr/sbin first).
TMPFILES_STAND_IN = "usr/sbin/systemd-tmpfiles"
SECTOR = 512
MiB = 1 << 20
ESP_START, ESP_SIZE = 1 * MiB, 64 * MiB
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
#: Tools the build runs on the host, and the Debian package of each.
TOOLS = {"debootstrap": "debootstrap", "proot": "proot", "qemu-aarch64-static": "qemu-user-static",
         "mkfs.ext4": "e2fsprogs", "sfdisk": "fdisk", "mformat": "mtools", "mcopy": "mtools",
         "mmd": "mtools", "unshare": "util-linux"}


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "kemu" / "distro" / "debian12-arm64"


def say(text: str) -> None:
    print(f"build-distro-image: {text}", file=sys.stderr, flush=True)


def run(argv: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    """Run a build step; a failure is one line and the tail of what it printed."""
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise SystemExit(f"build-distro-image: {what} failed (status {proc.returncode}):\n"
                         + "\n".join(tail))
    return proc


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


def check_tools() -> None:
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise SystemExit(f"build-distro-image: missing {' '.join(missing)} "
                         "(scripts/bootstrap.sh --distro installs them)")


#: x86-64 system calls that proot 5.1 (Debian 12) does not know, so it passes
#: their paths to the host untranslated: statx (332) and faccessat2 (439).
#: They fail with ENOSYS instead; glibc and qemu-user then fall back to
#: fstatat and faccessat, which proot translates.
UNKNOWN_TO_PROOT = (332, 439)
ENOSYS = 38


def refuse_syscalls_unknown_to_proot() -> None:
    """A seccomp filter (inherited by proot, qemu-user and the tree's programs)
    answering UNKNOWN_TO_PROOT with ENOSYS.  Runs in the child before exec."""
    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                    ("k", ctypes.c_uint)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    ld_nr, jeq, ret = 0x20, 0x15, 0x06            # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K
    n = len(UNKNOWN_TO_PROOT)
    code = [SockFilter(ld_nr, 0, 0, 0)]             # seccomp_data.nr
    code += [SockFilter(jeq, n - i, 0, nr) for i, nr in enumerate(UNKNOWN_TO_PROOT)]
    code += [SockFilter(ret, 0, 0, 0x7FFF0000),     # SECCOMP_RET_ALLOW
             SockFilter(ret, 0, 0, 0x00050000 | ENOSYS)]   # SECCOMP_RET_ERRNO
    prog = SockFprog(len(code), (SockFilter * len(code))(*code))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter for proot")  # NO_NEW_PRIVS, SECCOMP


def in_target(root: Path, argv: list[str], what: str) -> subprocess.CompletedProcess:
    """Run an arm64 program in the tree through proot and qemu-user, as root without
    the power to mount.

    proot passes mount(2) and umount(2) through to the host's kernel, and
    debootstrap's second stage mounts proc and unmounts /proc (under proot,
    the host's).  So the program runs in a user namespace whose ids map
    one-to-one onto the host's: file ownership, setuid bits and chown to
    system users are real, but mounts and device nodes are refused (a
    namespace not the host's own owns no mount table).
    """
    env = dict(os.environ, DEBOOTSTRAP_DIR="/debootstrap", DEBIAN_FRONTEND="noninteractive",
               LC_ALL="C.UTF-8", PATH="/usr/sbin:/usr/bin:/sbin:/bin")
    proot = ["proot", "-q", "qemu-aarch64-static", "-0", "-r", str(root), "-b", "/dev",
             "-b", "/proc", "-b", "/sys", "-w", "/"]
    # unshare makes the namespace and waits on stdin until its id maps are written.
    proc = subprocess.Popen(["unshare", "--user", "--", "sh", "-c", 'read _ && exec "$@"', "sh"]
                            + proot + argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, text=True,
                            preexec_fn=refuse_syscalls_unknown_to_proot)
    mine = os.readlink("/proc/self/ns/user")
    while proc.poll() is None and os.readlink(f"/proc/{proc.pid}/ns/user") == mine:
        time.sleep(0.005)
    if proc.poll() is None:
        for name in ("uid_map", "gid_map"):
            Path(f"/proc/{proc.pid}/{name}").write_text("0 0 4294967295\n")
    out, _ = proc.communicate("\n")
    if proc.returncode != 0:
        raise SystemExit(f"build-distro-image: {what} failed (status {proc.returncode}):\n"
                         + "\n".join(out.strip().splitlines()[-15:]))
    return subprocess.CompletedProcess(proc.args, 0, out, "")


def first_stage(root: Path, mirror: str, debs: Path) -> None:
    say(f"debootstrap first stage ({SUITE}, arm64, minbase + {len(PACKAGES)} packages "
        "and their dependencies)")
    debs.mkdir(parents=True, exist_ok=True)
    run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase",
         f"--cache-dir={debs}", "--include=" + ",".join(PACKAGES), SUITE, str(root), mirror],
        "debootstrap --foreign")
    dpkg_cfg = root / "etc" / "dpkg" / "dpkg.cfg.d"
    dpkg_cfg.mkdir(parents=True, exist_ok=True)
    (dpkg_cfg / "01-kemu-nodoc").write_text(DPKG_EXCLUDES)
    # No fsync per file while building (the image is written once, at the end).
    (dpkg_cfg / "02-kemu-build").write_text("force-unsafe-io\n")
    # The first stage leaves /proc a symlink to /proc (a loop under proot's binding).
    proc = root / "proc"
    if proc.is_symlink():
        proc.unlink()
    proc.mkdir(exist_ok=True)
    # proot 5.1 aborts on systemd-tmpfiles (an assertion on an empty path: the *at()
    # calls with AT_EMPTY_PATH).  Maintainer scripts find this stand-in first on
    # their PATH while building; the guest's systemd-tmpfiles-setup.service
    # creates the same files and directories at every boot.
    stand_in = root / TMPFILES_STAND_IN
    stand_in.write_text("#!/bin/sh\n# kemu's image build: see scripts/build-distro-image.py\nexit 0\n")
    stand_in.chmod(0o755)


def second_stage(root: Path) -> None:
    say("second stage under proot + qemu-aarch64-static: dpkg installs and configures "
        "every package, the kernel's postinst makes the initramfs")
    in_target(root, ["/debootstrap/debootstrap", "--second-stage"], "debootstrap --second-stage")
    (root / TMPFILES_STAND_IN).unlink()


def configure(root: Path, mirror: str, root_uuid: str) -> None:
    (root / "etc" / "fstab").write_text(f"UUID={root_uuid} / ext4 defaults 0 1\n")
    (root / "etc" / "hostname").write_text(HOSTNAME + "\n")
    (root / "etc" / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n")
    net = root / "etc" / "systemd" / "network"
    net.mkdir(parents=True, exist_ok=True)
    (net / "20-wired.network").write_text(NETWORK)
    (root / "etc" / "apt" / "sources.list").write_text(
        f"deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\n")
    in_target(root, ["/bin/sh", "-c",
                     "passwd -d root && systemctl enable systemd-networkd systemd-resolved"
                     " serial-getty@ttyAMA0.service"
                     " && apt-get clean"], "setting up the image (root password, services)")
    # The initramfs holds the virt board's drivers only (MODULES=list): Debian's
    # MODULES=most copies some 1500 modules, one process per step, which under
    # qemu-user takes most of an hour; the installed system keeps every module.
    # The kernel's postinst ran before initramfs-tools was configured in
    # debootstrap's order, so the initramfs is made here.
    conf = root / "etc" / "initramfs-tools"
    (conf / "conf.d").mkdir(parents=True, exist_ok=True)
    (conf / "conf.d" / "kemu-modules").write_text("MODULES=list\n")
    with (conf / "modules").open("a") as f:
        f.write("# the virt board's disks and NIC (scripts/build-distro-image.py)\n"
                + "\n".join(INITRAMFS_MODULES) + "\n")
    if not list((root / "boot").glob("initrd.img-*")):
        say("update-initramfs (under proot)")
        in_target(root, ["update-initramfs", "-c", "-k", "all"], "update-initramfs")
    (root / "etc" / "dpkg" / "dpkg.cfg.d" / "02-kemu-build").unlink(missing_ok=True)
    resolv = root / "etc" / "resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")


def boot_files(root: Path) -> tuple[str, str]:
    """The kernel version in /boot and its initramfs (names relative to /boot)."""
    kernels = sorted(p.name for p in (root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise SystemExit("build-distro-image: no kernel in the image's /boot")
    version = kernels[-1].removeprefix("vmlinuz-")
    if not (root / "boot" / f"initrd.img-{version}").exists():
        raise SystemExit(f"build-distro-image: no initramfs for {version} in /boot")
    return f"vmlinuz-{version}", f"initrd.img-{version}"


def grub_efi(root: Path, root_uuid: str, kernel: str, initrd: str, append: str,
             out: Path) -> str:
    """BOOTAA64.EFI (made in the tree by its own grub-mkimage) and the grub.cfg text."""
    in_target(root, ["grub-mkimage", "-O", "arm64-efi", "-o", "/tmp/BOOTAA64.EFI",
                     "-p", "/EFI/BOOT"] + GRUB_MODULES, "grub-mkimage")
    shutil.move(root / "tmp" / "BOOTAA64.EFI", out)
    return (f"set timeout=0\nset default=0\n"
            f"menuentry 'Debian GNU/Linux 12 (arm64)' {{\n"
            f"  echo '{GRUB_MARK}'\n"
            f"  search --no-floppy --fs-uuid --set=root {root_uuid}\n"
            f"  linux /boot/{kernel} {append}\n"
            f"  initrd /boot/{initrd}\n"
            f"}}\n")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)", text.strip().upper())
    if not m:
        raise SystemExit(f"build-distro-image: bad size {text!r} (say 3G or 3072M)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2) or " "))


def make_disk(disk: Path, size: int, tree: Path, root_uuid: str, esp_files: dict[str, Path],
              ) -> None:
    """GPT, the FAT ESP and the ext4 root, written into ``disk`` at their offsets."""
    root_start = ESP_START + ESP_SIZE
    root_size = (size - root_start - MiB) // MiB * MiB       # the backup GPT at the end
    if root_size < 1024 * MiB:
        raise SystemExit("build-distro-image: --size must be at least 2G")
    disk.unlink(missing_ok=True)
    with disk.open("wb") as f:
        f.truncate(size)
    layout = (f"label: gpt\nunit: sectors\n"
              f"start={ESP_START // SECTOR}, size={ESP_SIZE // SECTOR}, type={ESP_TYPE}, "
              f"name=\"EFI system partition\"\n"
              f"start={root_start // SECTOR}, size={root_size // SECTOR}, type={LINUX_TYPE}, "
              f"name=\"root\"\n")
    run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(disk)], "sfdisk", input=layout)
    say(f"mkfs.ext4 -d: the root file system ({root_size // MiB} MiB)")
    run(["mkfs.ext4", "-q", "-F", "-L", "root", "-U", root_uuid, "-E", f"offset={root_start}",
         "-d", str(tree), str(disk), f"{root_size // 1024}k"], "mkfs.ext4")
    esp = f"{disk}@@{ESP_START}"
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    run(["mformat", "-i", esp, "-T", str(ESP_SIZE // SECTOR), "-h", "64", "-s", "32",
         "-v", "EFI", "-F", "::"], "mformat", env=env)
    run(["mmd", "-i", esp, "::/EFI", "::/EFI/BOOT"], "mmd", env=env)
    for name, path in esp_files.items():
        run(["mcopy", "-i", esp, str(path), f"::/EFI/BOOT/{name}"], "mcopy", env=env)
    if disk.stat().st_size != size:
        raise SystemExit(f"build-distro-image: {disk} grew to {disk.stat().st_size} bytes")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rebuild", action="store_true", help="build again even if cached")
    ap.add_argument("--size", default="3G", help="disk size (default 3G)")
    args = ap.parse_args()
    size = parse_size(args.size)
    if os.geteuid() != 0:
        raise SystemExit("build-distro-image: debootstrap needs root")
    dest = cache_dir()
    manifest = dest / "manifest.json"
    if manifest.exists() and not args.rebuild:
        print(manifest)
        return 0
    check_tools()
    dest.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    root = dest / "rootfs"
    if root.exists():
        shutil.rmtree(root)
    mirror = host_mirror()
    root_uuid = str(uuid.uuid4())
    start = time.monotonic()
    first_stage(root, mirror, dest.parent / "debs")
    t1 = time.monotonic()
    second_stage(root)
    t2 = time.monotonic()
    configure(root, mirror, root_uuid)
    kernel_name, initrd_name = boot_files(root)
    append = f"root=UUID={root_uuid} ro console=ttyAMA0"
    efi = dest / "BOOTAA64.EFI"
    grub_cfg = dest / "grub.cfg"
    grub_cfg.write_text(grub_efi(root, root_uuid, kernel_name, initrd_name, append, efi))
    kernel, initrd = dest / "vmlinuz", dest / "initrd.img"
    shutil.copyfile(root / "boot" / kernel_name, kernel)
    shutil.copyfile(root / "boot" / initrd_name, initrd)
    disk = dest / "disk.raw"
    make_disk(disk, size, root, root_uuid, {"BOOTAA64.EFI": efi, "grub.cfg": grub_cfg})
    shutil.rmtree(root)
    total = time.monotonic() - start
    manifest.write_text(json.dumps({
        "disk": str(disk), "format": "raw", "kernel": str(kernel), "initrd": str(initrd),
        "append": append, "root_uuid": root_uuid, "root_partition": 2,
        "kernel_version": kernel_name.removeprefix("vmlinuz-"), "grub_mark": GRUB_MARK,
        "suite": SUITE, "packages": PACKAGES,
        "build_s": {"first_stage": round(t1 - start), "second_stage": round(t2 - t1),
                    "total": round(total)}}, indent=1) + "\n")
    say(f"done in {total:.0f} s (first stage {t1 - start:.0f} s, second stage "
        f"{t2 - t1:.0f} s)")
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
