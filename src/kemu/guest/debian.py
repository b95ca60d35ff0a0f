"""Building the default guest from Debian's packages.

The arm64 guest is Debian's ``linux-image-cloud-arm64`` kernel with an
initramfs holding ``busybox-static`` (arm64) and the virtio modules the
kernel ships as modules.  Packages are located with apt using a private
package list for the foreign architecture (no ``dpkg --add-architecture``
needed), downloaded with a progress bar, checked against the SHA-256 apt
lists, and unpacked with ``dpkg-deb``.  Everything lands in the cache
directory (``$XDG_CACHE_HOME/kemu``); later runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kemu.errors import GuestBuildError
from kemu.guest import cpio, kmod

#: Guest modules loaded at boot (with their dependencies), in this order.
#: virtio_pci: the -device *-pci devices on the virt board's PCIe (the kernel has
#: the generic ECAM host driver built in).
GUEST_MODULES = ["virtio_mmio", "virtio_pci", "virtio_blk", "virtio_net", "virtio_console",
                 "virtio-rng", "vmw_vsock_virtio_transport", "virtio_input", "evdev"]

ARCHES = {
    # qemu_fw_cfg: /sys/firmware/qemu_fw_cfg for the virt board's fw_cfg (-fw_cfg files).
    "aarch64": {"debian": "arm64", "kernel": "linux-image-cloud-arm64", "console": "ttyAMA0",
                "modules": ["qemu_fw_cfg"]},
    # The x86-64 microvm board (KVM): no PCI; the power button is ACPI's (a GED
    # notifying a PNP0C0C device; the cloud kernel has the button driver as a
    # module).  reboot=k
    # resets through the i8042 (the board's reset line); the i8042 options skip
    # probing a mouse, a multiplexer and the keyboard's LEDs (the controller is
    # found through the DSDT's PNP0303, which also maps its IRQ); pci=off skips
    # probing config space nobody answers.  The cloud kernel has virtio_mmio as a
    # module but not CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES (nor an MP table parser):
    # the board announces devices and CPUs in ACPI tables.
    "x86_64": {"debian": "amd64", "kernel": "linux-image-cloud-amd64", "console": "ttyS0",
               "append": "reboot=k i8042.noaux i8042.nomux i8042.dumbkbd pci=off",
               "modules": ["button"]},
}
# Guests with a screen (kemu run -vnc ..., -device virtio-gpu-device): the cloud
# kernels have no DRM, Debian's generic ones have virtio-gpu as a module (and
# fbcon built in).  Built only when a display is asked for; the console shows
# the kernel's messages (console=tty0) and a second shell runs on tty1.
ARCHES["aarch64-display"] = {**ARCHES["aarch64"], "kernel": "linux-image-arm64",
                             "modules": ["virtio-gpu"], "screen": True}
ARCHES["x86_64-display"] = {**ARCHES["x86_64"], "kernel": "linux-image-amd64",
                            "modules": ["button", "virtio-gpu"], "screen": True}

#: A shell on the screen (tty1) beside the one on the serial console.
SCREEN_SHELL = """(echo "kemu guest ready: $(uname -sr) on $(uname -m) (tty1)"; \
  exec setsid sh -c 'exec sh -l </dev/tty1 >/dev/tty1 2>&1') >/dev/tty1 2>&1 &
"""

#: Bumped when the initramfs layout changes in a way the code below does not show.
LAYOUT_VERSION = 11


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kemu"


@dataclass(frozen=True)
class GuestImage:
    arch: str
    kernel: Path
    initrd: Path
    append: str
    kernel_version: str

    @property
    def ready(self) -> bool:
        return self.kernel.is_file() and self.initrd.is_file()


def guest_dir(arch: str) -> Path:
    return cache_dir() / "guests" / arch


def recipe_id() -> str:
    """Names this version of the recipe (the code that builds the guest): guests of
    different kemu versions (say, two checkouts sharing one cache) live side by
    side, each under its own manifest and initramfs, instead of each replacing the
    other's and rebuilding at every run."""
    digest = hashlib.sha256(str(LAYOUT_VERSION).encode())
    for module in (__file__, cpio.__file__, kmod.__file__):
        digest.update(Path(module).read_bytes())
    return digest.hexdigest()[:12]


def manifest_path(arch: str) -> Path:
    return guest_dir(arch) / f"manifest-{recipe_id()}.json"


def cached_guest(arch: str = "aarch64", check_packages: bool = False) -> GuestImage | None:
    """The guest in the cache if it is complete: a manifest of this recipe whose
    kernel and initramfs are there with the SHA-256 recorded when they were
    built (and, with ``check_packages``, the packages they were built from are
    there with the SHA-256 apt's signed lists gave); else None."""
    try:
        data = json.loads(manifest_path(arch).read_text())
        image = GuestImage(arch, Path(data["kernel"]), Path(data["initrd"]), data["append"],
                           data["kernel_version"])
        made = [(image.kernel, *data["files"]["kernel"]), (image.initrd, *data["files"]["initrd"])]
        debs = [(guest_dir(arch) / "debs" / name, size, sha) for name, size, sha in data["debs"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all(is_verified(path, size, sha) for path, size, sha in made):
        return None
    if check_packages and not all(is_verified(path, size, sha) for path, size, sha in debs):
        return None
    return image


#: udhcpc's script: address, route and DNS from the lease, and one line saying so.
DHCP_SCRIPT = rb"""#!/bin/sh
case "$1" in
deconfig) ip -4 addr flush dev "$interface"; ip link set dev "$interface" up ;;
bound|renew)
  ip -4 addr flush dev "$interface"
  ip addr add "$ip/${mask:-24}" dev "$interface"
  [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
  for r in $router; do ip route replace default via "$r" dev "$interface"; break; done
  : > /etc/resolv.conf
  for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
  [ "$1" = bound ] && echo "kemu: $interface: $ip/${mask:-24} from DHCP, gateway ${router%% *}, DNS ${dns:-none}" > /dev/console ;;
esac
exit 0
"""

#: A DHCP lease on each NIC (up to 3 s in the foreground, then in the background
#: until one comes).
CONFIGURE_NICS = """for n in /sys/class/net/*; do
  i=${n##*/}
  [ "$i" = lo ] && continue
  ip link set "$i" up
  udhcpc -i "$i" -s /etc/udhcpc.script -q -b -t 3 -T 1 >/dev/null 2>&1
done
"""

#: One line per disk saying how to mount it.
DESCRIBE_DISKS = """for b in /sys/block/vd*; do
  [ -e "$b" ] || continue
  d=${b##*/}
  p=$(cd "$b" && ls -d "$d"* 2>/dev/null | head -n 1)
  echo "kemu: disk /dev/$d ($(( $(cat "$b/size") / 2048 )) MiB): mount /dev/${p:-$d} /mnt to use it (mke2fs /dev/$d first if it is blank)"
done
"""

#: The power button (virtio-input or ACPI, KEY_POWER) runs /etc/acpi/PWRF/00000080.
#: acpid opens the event devices there are when it starts, which devtmpfs creates a
#: moment after their drivers load: wait until every input has its node.  With no
#: input device at all there is nothing for acpid to read: it is not started.
START_ACPID = """for i in 1 2 3 4 5 6 7 8 9 10; do
  n=$(ls /sys/class/input 2>/dev/null | grep -c event)
  [ "$n" != 0 ] && [ "$n" = $(ls /dev/input 2>/dev/null | grep -c event) ] && break
  sleep 0.1
done
[ "$n" != 0 ] && acpid -f -d &
"""


def init_script(console: str, modules: list[str], screen: bool = False) -> bytes:
    loads = "\n".join(f"insmod /lib/modules/{m} 2>/dev/null" for m in modules)
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mkdir -p /proc /sys /dev /tmp /mnt /root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
{loads}
hostname kemu
ip link set lo up 2>/dev/null
{CONFIGURE_NICS}{DESCRIBE_DISKS}{START_ACPID}{SCREEN_SHELL if screen else ""}echo "kemu guest ready: $(uname -sr) on $(uname -m)"
setsid cttyhack sh -l
poweroff -f
""".encode()


def build_initramfs(busybox: bytes, modules: list[Path], console: str,
                    screen: bool = False) -> bytes:
    entries = [cpio.directory(d) for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "mnt",
                                           "root", "etc", "lib", "lib/modules")]
    entries += [cpio.chardev("dev/console", 5, 1), cpio.chardev("dev/null", 1, 3, 0o666),
                cpio.file("bin/busybox", busybox, 0o755),
                cpio.file("etc/profile", b"export PS1='# '\nexport HOME=/root\ncd /root\n"),
                cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
                cpio.file("etc/group", b"root:x:0:\n"),
                cpio.file("etc/udhcpc.script", DHCP_SCRIPT, 0o755),
                cpio.directory("etc/acpi"), cpio.directory("etc/acpi/PWRF"),
                cpio.file("etc/acpi/PWRF/00000080",
                          b"#!/bin/sh\necho 'kemu: power button pressed, powering off'"
                          b" > /dev/console\nsync\npoweroff -f\n", 0o755)]
    names = []
    for path in modules:
        name = path.name.split(".ko")[0] + ".ko"
        entries.append(cpio.file(f"lib/modules/{name}", kmod.read_module(path)))
        names.append(name)
    entries.append(cpio.file("init", init_script(console, names, screen), 0o755))
    return cpio.initramfs(entries)


def _reason(apt_output: str) -> str:
    """The most telling line of apt's output, for a one-line error."""
    lines = [line.strip() for line in apt_output.splitlines() if line.strip()]
    for marker in ("Unable to connect", "Could not resolve", "Temporary failure", "Failed",
                   "E: ", "Err:"):
        for line in lines:
            if marker in line:
                return line.rstrip(":")
    return lines[-1] if lines else "failed"


class Apt:
    """apt for a foreign architecture with a private state directory."""

    def __init__(self, arch: str, state: Path) -> None:
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise GuestBuildError("building the default guest needs apt-get and dpkg-deb "
                                  "(a Debian or Ubuntu host)")
        self.state = state
        (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (state / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        self.options = ["-o", f"APT::Architecture={arch}", "-o", f"APT::Architectures={arch}",
                        "-o", f"Dir::State::Lists={state / 'lists'}",
                        "-o", f"Dir::Cache={state / 'cache'}",
                        "-o", "Dir::State::status=/dev/null",
                        "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root"]

    def _run(self, *args: str) -> str:
        try:
            proc = subprocess.run(["apt-get", *self.options, *args], capture_output=True,
                                  text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise GuestBuildError("apt-get timed out (no network access?)") from None
        if proc.returncode != 0:
            raise GuestBuildError(f"apt-get {args[0]}: {_reason(proc.stdout + proc.stderr)}")
        return proc.stdout + proc.stderr

    def update(self) -> None:
        out = self._run("update")
        if not any((self.state / "lists").glob("*Packages*")):
            raise GuestBuildError("cannot fetch Debian's package lists (no network access?): "
                                  f"{_reason(out)}")

    def depends(self, package: str) -> list[str]:
        proc = subprocess.run(["apt-cache", *self.options, "depends", package],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise GuestBuildError(f"apt-cache: no package {package}")
        return [line.split(":", 1)[1].strip() for line in proc.stdout.splitlines()
                if line.strip().startswith("Depends:")]

    def uris(self, packages: list[str]) -> list[tuple[str, str, int, str]]:
        """(url, filename, size, sha256) of each package's .deb."""
        out = self._run("--print-uris", "download", *packages)
        result = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0].startswith("'"):
                url = parts[0].strip("'")
                algo, _, digest = (parts[3] if len(parts) > 3 else "").partition(":")
                if algo.upper() != "SHA256" or len(digest) != 64:
                    raise GuestBuildError(f"apt gives no SHA-256 for {parts[1]}: "
                                          "refusing to use it unchecked")
                result.append((url, parts[1], int(parts[2]), digest.lower()))
        if len(result) != len(packages):
            raise GuestBuildError(f"apt could not locate all of: {' '.join(packages)}")
        return result


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def is_verified(path: Path, size: int, sha256: str) -> bool:
    """Whether the cached ``path`` is exactly the package apt's signed lists describe."""
    try:
        return path.stat().st_size == size and sha256_of(path) == sha256
    except OSError:
        return False


def stale_debs(uris: list[tuple[str, str, int, str]], debs: Path
               ) -> list[tuple[str, str, int, str]]:
    """The packages of ``uris`` (from :meth:`Apt.uris`) with no verified copy in ``debs``."""
    return [u for u in uris if not is_verified(debs / u[1], u[2], u[3])]


def fetch_debs(uris: list[tuple[str, str, int, str]], debs: Path, progress) -> None:
    """Download each of ``uris`` into ``debs``, checked against its SHA-256."""
    for url, name, size, sha in uris:
        download(url, debs / name, size, sha, progress)


def download(url: str, dest: Path, size: int, sha256: str, progress) -> None:
    """Fetch ``url`` into ``dest``: written beside it under a private name, checked
    against apt's SHA-256, then renamed into place (concurrent builds do not mix)."""
    digest = hashlib.sha256()
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(name)
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, os.fdopen(fd, "wb") as out:
            while True:
                chunk = resp.read(1 << 16)
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                progress(len(chunk))
        if digest.hexdigest() != sha256:
            raise GuestBuildError(f"download of {url}: SHA-256 mismatch")
        tmp.replace(dest)
    except OSError as e:
        raise GuestBuildError(f"download of {url} failed: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(dest: Path, data: bytes | None = None, source: Path | None = None) -> None:
    """Replace ``dest`` with ``data`` (or a copy of ``source``) all at once: written
    beside it, synced, then renamed, so a reader, a concurrent build or an interrupted
    one never sees half a file."""
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            if source is not None:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            else:
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        tmp.replace(dest)
    except OSError as e:
        raise GuestBuildError(f"cannot write {dest}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def unpack_kernel(debs: Path, names: list[str], root: Path, kernel_package: str
                  ) -> tuple[Path, str]:
    """Unpack the ``.deb`` files ``names`` (in ``debs``) into ``root`` with dpkg-deb;
    the kernel image they hold and its version."""
    for name in names:
        proc = subprocess.run(["dpkg-deb", "-x", str(debs / name), str(root)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise GuestBuildError(f"dpkg-deb -x {name}: {proc.stderr.strip()}")
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise GuestBuildError(f"{kernel_package} contains no /boot/vmlinuz")
    return kernels[0], kernels[0].name[len("vmlinuz-"):]


def build_guest(arch: str = "aarch64", show_progress: bool = True) -> GuestImage:
    """Fetch packages and assemble the guest; returns where it is."""
    from tqdm import tqdm

    if arch not in ARCHES:
        raise GuestBuildError(f"no default guest for {arch} (have: {', '.join(ARCHES)})")
    spec = ARCHES[arch]
    out_dir = guest_dir(arch)
    out_dir.mkdir(parents=True, exist_ok=True)
    apt = Apt(spec["debian"], cache_dir() / "apt" / spec["debian"])
    steps = tqdm(total=4, desc="kemu: building the default guest", unit="step",
                 disable=not show_progress, leave=False)
    steps.set_postfix_str("package lists")
    apt.update()
    steps.update()
    kernel_pkgs = [d for d in apt.depends(spec["kernel"]) if d.startswith("linux-image-")]
    if not kernel_pkgs:
        raise GuestBuildError(f"{spec['kernel']} names no kernel package")
    packages = [kernel_pkgs[0], "busybox-static"]
    uris = apt.uris(packages)
    debs = out_dir / "debs"
    debs.mkdir(exist_ok=True)
    # A cached package is used only if it is exactly what apt's signed lists say;
    # anything else in its place is fetched again.
    missing = stale_debs(uris, debs)
    total = sum(u[2] for u in missing)
    steps.set_postfix_str("downloading")
    with tqdm(total=total, unit="B", unit_scale=True, desc="kemu: downloading",
              disable=not show_progress or total == 0, leave=False) as bar:
        fetch_debs(missing, debs, bar.update)
    steps.update()
    steps.set_postfix_str("unpacking")
    with tempfile.TemporaryDirectory(prefix="kemu-guest-") as tmp:
        root = Path(tmp)
        kernel, version = unpack_kernel(debs, [u[1] for u in uris], root, kernel_pkgs[0])
        busybox = root / "bin" / "busybox"
        if not busybox.is_file():
            raise GuestBuildError("busybox-static contains no /bin/busybox")
        steps.update()
        steps.set_postfix_str("initramfs")
        modules = kmod.load_order(root / "lib" / "modules" / version,
                                  GUEST_MODULES + spec.get("modules", []))
        initrd = build_initramfs(busybox.read_bytes(), modules, spec["console"],
                                 spec.get("screen", False))
        kernel_path = out_dir / f"vmlinuz-{version}"
        write_atomically(kernel_path, source=kernel)
        initrd_path = out_dir / f"initramfs-{recipe_id()}.cpio.gz"
        write_atomically(initrd_path, initrd)
        # Hashed from what was written, not from the files (a concurrent build may
        # have replaced them since).
        files = {"kernel": [kernel.stat().st_size, sha256_of(kernel)],
                 "initrd": [len(initrd), hashlib.sha256(initrd).hexdigest()]}
    steps.update()
    steps.close()
    append = f"console={spec['console']} rdinit=/init quiet cryptomgr.notests"
    if spec.get("screen"):
        append = f"console=tty0 {append}"     # the last console= is /dev/console
    if spec.get("append"):
        append = f"{append} {spec['append']}"
    image = GuestImage(arch, kernel_path, initrd_path, append, version)
    write_atomically(manifest_path(arch), json.dumps({
        "recipe": recipe_id(), "kernel": str(image.kernel), "initrd": str(image.initrd),
        "append": image.append, "kernel_version": version, "files": files,
        "debs": [[name, size, sha] for _url, name, size, sha in uris]}, indent=1).encode())
    return image


def default_guest(arch: str = "aarch64", show_progress: bool = True) -> GuestImage:
    """The cached guest when it is complete, else a freshly built one."""
    return cached_guest(arch) or build_guest(arch, show_progress)
