"""A nested harness for testing Linux on real KVM where /dev/kvm is PVM.

On hosts whose /dev/kvm is the PVM module (kvm_pvm), unmodified Linux does
not boot under KVM (docs: PLATFORM.md).  A hardware-like KVM is had by
nesting: QEMU's TCG emulates AMD SVM (``-M q35 -accel tcg -cpu max``), an
L1 Debian Linux (the generic ``linux-image-amd64``, which has kvm-amd and
9p as modules) loads kvm-amd and gets a real /dev/kvm.  The host's root is
shared read-only into L1 over 9p; L1's init mounts it, mounts proc, sys,
devtmpfs and a scratch tmpfs at /run (TMPDIR) inside it, switches root into it and runs
a shell command: the host's own Python, virtualenv and checkout, with no image to
build.  The command's output and exit status come back over L1's serial
console (between markers); then L1 powers off.

::

    from kemu.testing.nested import NestedHarness, nested_unavailable_reason
    if nested_unavailable_reason() is None:
        result = NestedHarness().run("cd /work/main && .venv/bin/python -m kemu.cli ...")
        result.status, result.output, result.seconds

The L1 kernel and busybox come from Debian's archive through the same apt
machinery as :mod:`kemu.guest.debian`, into ``$XDG_CACHE_HOME/kemu/nested``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kemu.errors import GuestBuildError
from kemu.guest import cpio, kmod
from kemu.guest.debian import Apt, cache_dir, fetch_debs, stale_debs, unpack_kernel

QEMU = "qemu-system-x86_64"
L1_KERNEL_PACKAGE = "linux-image-amd64"
#: Modules L1 loads, in this order (dependencies are added by kmod.load_order).
L1_MODULES = ["irqbypass", "ccp", "kvm", "kvm-amd", "virtio_ring", "virtio",
              "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "netfs",
              "fscache", "9pnet", "9pnet_virtio", "9p", "dummy"]
L1_MEMORY_MB = 2048
L1_CPUS = 2
BEGIN = "==NESTED-BEGIN=="
END = "==NESTED-END=="
LAYOUT_VERSION = 1


def nested_dir() -> Path:
    return cache_dir() / "nested"


def nested_unavailable_reason() -> str | None:
    """Why the nested harness cannot run here (None when it can).

    It needs qemu-system-x86_64 (Debian's qemu-system-x86), apt-get and
    dpkg-deb for the L1 kernel (or an L1 kernel already in the cache), and
    a QEMU that emulates SVM with TCG.
    """
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (apt-get install qemu-system-x86)"
    if not (nested_dir() / "manifest").is_file() and (
            shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None):
        return "apt-get and dpkg-deb are needed to fetch the L1 kernel"
    return None


def ensure_qemu() -> None:
    """Install Debian's qemu-system-x86 if qemu-system-x86_64 is missing (as root)."""
    if shutil.which(QEMU) is not None:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise GuestBuildError(f"{QEMU} is missing: apt-get install qemu-system-x86")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-qq", "qemu-system-x86"], env=env,
                   capture_output=True, check=False, timeout=900)
    if shutil.which(QEMU) is None:
        raise GuestBuildError("could not install qemu-system-x86")


@dataclass(frozen=True)
class L1Image:
    kernel: Path
    modules: tuple[Path, ...]
    busybox: Path
    version: str


def prepare_l1() -> L1Image:
    """Fetch (once) Debian's generic amd64 kernel, its modules and busybox-static."""
    out = nested_dir()
    manifest = out / "manifest"
    if manifest.is_file():
        lines = manifest.read_text().split("\n")
        if lines[0] == str(LAYOUT_VERSION):
            version = lines[1]
            root = out / "root"
            mods = kmod.load_order(root / "lib" / "modules" / version, L1_MODULES)
            return L1Image(root / "boot" / f"vmlinuz-{version}", tuple(mods),
                           root / "bin" / "busybox", version)
    out.mkdir(parents=True, exist_ok=True)
    apt = Apt("amd64", cache_dir() / "apt" / "amd64")
    apt.update()
    kernel_pkgs = [d for d in apt.depends(L1_KERNEL_PACKAGE) if d.startswith("linux-image-")]
    if not kernel_pkgs:
        raise GuestBuildError(f"{L1_KERNEL_PACKAGE} names no kernel package")
    packages = [kernel_pkgs[0], "busybox-static"]
    debs = out / "debs"
    debs.mkdir(exist_ok=True)
    uris = apt.uris(packages)
    fetch_debs(stale_debs(uris, debs), debs, lambda n: None)
    root = out / "root"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    _kernel, version = unpack_kernel(debs, [u[1] for u in uris], root, kernel_pkgs[0])
    manifest.write_text(f"{LAYOUT_VERSION}\n{version}\n")
    return prepare_l1()


def l1_init(command: str, env: dict[str, str]) -> bytes:
    """L1's /init: modules, the host root over 9p, switch_root, the command, power off."""
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    inner = (f"{exports}({command}\n) < /dev/null 2>&1\n"
             f'echo "{END} status=$?"\n'
             "echo o > /proc/sysrq-trigger; sleep 60\n")
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mkdir -p /proc /sys /dev /host
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules); do insmod /lib/modules/$m || echo "nested: insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 host /host || echo "nested: no 9p"
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
# devtmpfs has no pts directory: without devpts there are no ptys (libvirt's consoles).
mkdir -p /host/dev/pts && mount -t devpts -o ptmxmode=0666 devpts /host/dev/pts
# Scratch space in /run: /tmp stays the host's (read-only) so that checkouts and
# test files under /tmp remain visible; TMPDIR and HOME point at the scratch.
mount -t tmpfs tmpfs /host/run 2>/dev/null
mkdir -p /host/run/tmp
[ -e /dev/kvm ] || echo "nested: no /dev/kvm in L1"
echo {BEGIN}
# switch_root, not chroot: the host root becomes the root of L1's mount namespace,
# so what refuses to run chrooted (user namespaces: passt's sandbox) works.  The
# initramfs is gone then: the host's shell reports the status and powers off.
exec switch_root /host /bin/sh -c {shlex.quote(inner)}
""".encode()


def build_l1_initramfs(l1: L1Image, command: str, env: dict[str, str]) -> bytes:
    entries = [cpio.directory(d) for d in ("bin", "sbin", "dev", "proc", "sys", "host",
                                           "lib", "lib/modules")]
    entries += [cpio.chardev("dev/console", 5, 1), cpio.chardev("dev/null", 1, 3, 0o666),
                cpio.file("bin/busybox", l1.busybox.read_bytes(), 0o755)]
    names = []
    for path in l1.modules:
        name = path.name.split(".ko")[0] + ".ko"
        entries.append(cpio.file(f"lib/modules/{name}", kmod.read_module(path)))
        names.append(name)
    entries.append(cpio.file("modules", " ".join(names).encode() + b"\n"))
    entries.append(cpio.file("init", l1_init(command, env), 0o755))
    return cpio.initramfs(entries, level=1)


@dataclass(frozen=True)
class NestedResult:
    status: int | None          # the command's exit status (None: no END marker seen)
    output: str                 # what the command printed
    console: str                # L1's whole serial console
    seconds: float              # the whole L1 run, boot included


def precompile_kemu() -> None:
    """Byte-compile kemu's modules here, once: L1 sees the host read-only, so a
    Python there cannot cache what it compiles, and under QEMU's TCG (files over
    9p) importing kemu took 42-55 s without the cache against 20-29 s with it."""
    import compileall
    import kemu
    compileall.compile_dir(str(Path(kemu.__file__).parent), quiet=2)


class NestedHarness:
    """Runs shell commands inside an L1 Linux with a real /dev/kvm."""

    def __init__(self, memory_mb: int = L1_MEMORY_MB, cpus: int = L1_CPUS) -> None:
        ensure_qemu()
        self.l1 = prepare_l1()
        self.memory_mb = memory_mb
        self.cpus = cpus

    def qemu_command(self, initrd: Path) -> list[str]:
        return [QEMU, "-M", "q35", "-accel", "tcg", "-cpu", "max", "-m", str(self.memory_mb),
                "-smp", str(self.cpus), "-nodefaults", "-display", "none", "-no-reboot",
                "-serial", "stdio", "-monitor", "none",
                "-kernel", str(self.l1.kernel), "-initrd", str(initrd),
                "-append", "console=ttyS0 quiet panic=-1 rdinit=/init",
                "-virtfs", ("local,path=/,mount_tag=host,security_model=none,readonly=on,"
                            "multidevs=remap")]

    def run(self, command: str, timeout: float = 600.0,
            env: dict[str, str] | None = None) -> NestedResult:
        """Run ``command`` (sh syntax) in the host's root, inside L1, as root."""
        precompile_kemu()
        env = {"HOME": "/run/tmp", "TMPDIR": "/run/tmp", "PYTHONDONTWRITEBYTECODE": "1",
               "TERM": "dumb",
               "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               **(env or {})}
        with tempfile.TemporaryDirectory(prefix="kemu-nested-") as tmp:
            initrd = Path(tmp) / "l1.cpio.gz"
            initrd.write_bytes(build_l1_initramfs(self.l1, command, env))
            t0 = time.monotonic()
            try:
                proc = subprocess.run(self.qemu_command(initrd), capture_output=True,
                                      timeout=timeout, check=False, stdin=subprocess.DEVNULL)
                console = proc.stdout.decode(errors="replace")
            except subprocess.TimeoutExpired as e:
                console = (e.stdout or b"").decode(errors="replace")
                console += f"\n[nested: L1 timed out after {timeout:.0f} s]"
            seconds = time.monotonic() - t0
        console = console.replace("\r\n", "\n")
        status = None
        output = ""
        begin = console.find(BEGIN)
        m = re.search(re.escape(END) + r" status=(\d+)", console)
        if begin >= 0:
            output = console[begin + len(BEGIN) + 1:m.start() if m else len(console)]
        if m:
            status = int(m.group(1))
        return NestedResult(status, output, console, seconds)

    def kvm_works(self) -> NestedResult:
        """A quick probe: L1 has a /dev/kvm that opens as KVM API 12."""
        return self.run("python3 -c 'import fcntl, os; fd = os.open(\"/dev/kvm\", os.O_RDWR);"
                        " print(\"KVM_API\", fcntl.ioctl(fd, 0xAE00))'")


def run_each_on_real_kvm(runs: dict[str, str], cwd: Path,
                         timeout_each: float) -> dict[str, tuple[int, str]]:
    """Run each named shell command of ``runs`` in turn from ``cwd``, each under
    ``timeout_each`` seconds, in one :func:`run_on_real_kvm` (one L1 boot for all);
    returns name -> (exit status, output without carriage returns)."""
    script = f"cd {shlex.quote(str(cwd))}\n" + "".join(
        f"echo '==RUN {name}=='; timeout {int(timeout_each)} sh -c {shlex.quote(cmd)}; "
        f"echo \"==RC {name}=$?==\"\n" for name, cmd in runs.items())
    output = run_on_real_kvm(script, timeout_each * len(runs) + 120)
    out = {}
    for name in runs:
        m = re.search(rf"==RUN {name}==\n(.*?)==RC {name}=(\d+)==", output, re.DOTALL)
        if not m:
            raise AssertionError(f"no result for {name}:\n{output[-4000:]}")
        out[name] = (int(m.group(2)), m.group(1).replace("\r", ""))
    return out


#: The L2 guest's /init for boot tests: modules, one report line, power off.
L2_MODULES = ["virtio_ring", "virtio", "virtio_mmio", "virtio-rng"]
L2_REPORT = "KEMU-L2"


#: Shell lines for L1 that give it a routable interface without a NIC (a dummy
#: device with QEMU's user-mode addresses), so that passt, which copies the
#: host's addresses and routes for its guest, has something to copy.
L1_DUMMY_NETWORK = ("ip link add kemu0 type dummy && ip addr add 10.0.2.15/24 dev kemu0 && "
                    "ip link set kemu0 up && ip route add default via 10.0.2.2")


def l2_init(extra: str = "") -> bytes:
    loads = " ".join(L2_MODULES)
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mkdir -p /proc /sys /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {loads}; do insmod /lib/modules/$m.ko 2>/dev/null; done
{extra}
echo "{L2_REPORT} arch=$(uname -m) cpus=$(grep -c ^processor /proc/cpuinfo) \
virtio=$(ls /sys/bus/virtio/devices 2>/dev/null | wc -l) \
rng=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null) \
uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
""".encode()


def l2_initrd(base_initrd: Path, name: str = "l2-initrd.cpio.gz", extra: str = "") -> Path:
    """The default guest's initramfs with /init replaced by :func:`l2_init` (a second
    archive appended: the kernel unpacks both, the later /init wins).  Written on
    the host, into the cache, since L1 sees the host read-only."""
    out = nested_dir() / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base_initrd.read_bytes() + cpio.initramfs(
        [cpio.file("init", l2_init(extra), 0o755)]))
    return out


def extract_vmlinux(bzimage: Path, out: Path) -> Path:
    """The ELF vmlinux inside a bzImage (boot.rst: ``payload_offset`` and
    ``payload_length`` locate the compressed kernel; Debian's amd64 payload is
    LZ4, legacy frame), decompressed with the ``lz4`` tool, for PVH boots."""
    import struct
    if out.is_file() and out.stat().st_mtime >= bzimage.stat().st_mtime:
        return out
    data = bzimage.read_bytes()
    setup_size = ((data[0x1F1] or 4) + 1) * 512
    offset, length = struct.unpack_from("<II", data, 0x248)
    payload = data[setup_size + offset:setup_size + offset + length]
    if payload[:4] != b"\x02\x21\x4c\x18":
        raise GuestBuildError(f"{bzimage}: the payload is not LZ4 (legacy frame)")
    if shutil.which("lz4") is None:
        raise GuestBuildError("extracting vmlinux needs the lz4 tool (apt-get install lz4)")
    proc = subprocess.run(["lz4", "-dc"], input=payload, capture_output=True, check=False)
    # The payload is followed by the decompressed size; lz4 may warn about it.
    if not proc.stdout.startswith(b"\x7fELF"):
        raise GuestBuildError(f"lz4 -dc: {proc.stderr.decode(errors='replace').strip()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(proc.stdout)
    return out


L1_PANIC = "Kernel panic - not syncing"


class RealKvmUnavailable(Exception):
    """Neither a hardware-backed /dev/kvm here nor the nested harness: the reason."""


def run_on_real_kvm(script: str, timeout: float, env: dict[str, str] | None = None) -> str:
    """Run ``script`` (sh syntax, as root) where KVM is hardware-like and return its
    output: here when /dev/kvm is hardware-backed, else inside L1 of the nested
    harness (the default guests built here: ``KEMU_NESTED`` and the host's cache,
    plus ``env``).  Raises :class:`RealKvmUnavailable` (one line) when neither is
    possible, and :class:`GuestBuildError` when L1 did not finish."""
    from kemu.accel.kvm import kvm_is_hardware_backed
    if kvm_is_hardware_backed():
        proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL)
        return proc.stdout + proc.stderr
    reason = nested_unavailable_reason()
    if reason:
        raise RealKvmUnavailable(f"/dev/kvm is not hardware-backed and the nested harness "
                                 f"cannot run: {reason}")
    try:
        harness = NestedHarness()
    except GuestBuildError as e:
        raise RealKvmUnavailable(f"nested harness unavailable: {e}") from None
    l1_env = {"KEMU_NESTED": "1", "XDG_CACHE_HOME": str(cache_dir().parent), **(env or {})}
    result = harness.run(script, timeout=timeout, env=l1_env)
    if result.status is None and L1_PANIC in result.console:
        # L1's own kernel died (seen once in ~20 whole runs: a stack-guard fault in
        # L1's KVM while QEMU ran in L1 -- QEMU's TCG emulation of SVM under L1,
        # not the VMM under test).  L1 exits at once (panic=-1, -no-reboot): boot
        # it again, once, and say so in the output.
        first = result.console[result.console.find(L1_PANIC):][:200]
        result = harness.run(script, timeout=timeout, env=l1_env)
        result = NestedResult(result.status,
                              f"[nested: L1's kernel panicked, ran again: {first!r}]\n"
                              + result.output, result.console, result.seconds)
    if "nested: no /dev/kvm" in result.console:
        raise RealKvmUnavailable("nested SVM is not available: L1 has no /dev/kvm")
    if result.status is None:
        raise GuestBuildError(f"L1 did not finish:\n{result.console[-4000:]}")
    return result.output
