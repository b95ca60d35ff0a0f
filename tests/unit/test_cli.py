"""Bad command lines and files: one line on stderr, exit status 2, no traceback."""

import os
import shutil
import struct
import subprocess
import sys

import pytest

from kemu.boot.linux_arm64 import ARM64_MAGIC, HEADER
from kemu.options import parse_qemu_options, parse_size
from kemu.errors import ConfigError
from kemu.machines.config import MachineConfig

KEMU = [sys.executable, "-m", "kemu.cli"]


def run(*args, **kw):
    return subprocess.run(KEMU + list(args), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, **kw)


def one_line_error(proc, status=2):
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kemu: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_qemu_options_parse():
    cfg = parse_qemu_options(["-M", "virt,gic-version=2", "-cpu", "cortex-a72", "-m", "1G",
                              "-smp", "cpus=1", "-kernel", "k", "-initrd", "i", "-append",
                              "console=ttyAMA0", "-nographic", "-no-reboot", "-S",
                              "-accel", "tcg,thread=single", "-name", "vm1", "-display", "none"],
                             MachineConfig())
    assert (cfg.machine, cfg.cpu, cfg.memory, cfg.smp) == ("virt", "cortex-a72", 1 << 30, 1)
    assert str(cfg.kernel) == "k" and str(cfg.initrd) == "i" and cfg.append == "console=ttyAMA0"
    assert cfg.no_reboot and cfg.start_paused and cfg.name == "vm1"
    assert cfg.extra["serial"] == "mon:stdio"


@pytest.mark.parametrize("text,value", [("256", 256 << 20), ("256M", 256 << 20),
                                        ("2G", 2 << 30), ("512MiB", 512 << 20)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("argv", [["-m", "lots"], ["-smp", "x"], ["-bogus"], ["-drive", "f"],
                                  ["-serial", "tcp:1"], ["-kernel"], ["stray"]])
def test_bad_options_raise_config_error(argv):
    with pytest.raises(ConfigError):
        parse_qemu_options(argv, MachineConfig())


def test_unknown_option():
    assert "unknown option" in one_line_error(run("-frobnicate"))


def test_missing_kernel_file(tmp_path):
    assert "not found" in one_line_error(run("-kernel", str(tmp_path / "nope")))


def test_unreadable_initrd(tmp_path):
    kernel = tmp_path / "Image"
    kernel.write_bytes(HEADER.pack(0, 0, 0, 1 << 20, 0b1010, 0, 0, 0, ARM64_MAGIC, 0))
    initrd = tmp_path / "initrd"
    initrd.mkdir()
    assert "initrd" in one_line_error(run("-kernel", str(kernel), "-initrd", str(initrd)))


def test_not_an_aarch64_elf(tmp_path):
    bad = tmp_path / "vmlinux"
    bad.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 9 + b"\x02\x00\x3e\x00" + b"\0" * 4096)
    assert "not aarch64" in one_line_error(run("-kernel", str(bad)))


def test_too_little_memory(tmp_path):
    kernel = tmp_path / "Image"
    kernel.write_bytes(HEADER.pack(0, 0, 0, 60 << 20, 0b1010, 0, 0, 0, ARM64_MAGIC, 0))
    assert "too little memory" in one_line_error(run("-m", "64", "-kernel", str(kernel)))


def test_unsupported_machine_and_smp(tmp_path):
    assert "unsupported machine" in one_line_error(run("-M", "pc", "-kernel", "x"))
    assert "1 to 8 CPUs" in one_line_error(run("-smp", "9", "-kernel", "x"))


def test_no_kernel():
    assert "no kernel" in one_line_error(run("-m", "128"))


def test_no_network_for_the_default_guest(tmp_path, need):
    need("apt-get")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), http_proxy="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9")
    line = one_line_error(run("guest", "build", env=env))
    assert "no network access" in line


def test_help_and_version():
    assert run("--help").returncode == 0
    assert run("--version").stdout.startswith("kemu ")


def test_guest_jumping_into_nothing_takes_its_abort(tmp_path):
    # An arm64 Image that branches to an address with no memory: the CPU takes
    # an instruction abort to the guest's vector (a synchronous external
    # abort, as on QEMU's virt), which prints ESR and FAR and powers off.
    from test_tcg_aarch64 import assemble
    guests = os.path.join(os.path.dirname(__file__), "..", "guests")
    with open(os.path.join(guests, "pl011_hex.S")) as f:
        hex_routine = f.read()
    kernel = tmp_path / "Image"
    kernel.write_bytes(assemble(tmp_path, f"""
        b start
        .word 0
        .quad 0, 0x100000, 0xa, 0, 0, 0     // text_offset, image_size, flags
        .ascii "ARM\\x64"
        .word 0
    start:
        adr x1, vectors
        msr vbar_el1, x1
        isb
        ldr x1, =0x700000000                // outside RAM and devices
        br x1
    {hex_routine}
        .ltorg
        .balign 2048
    vectors:
        .skip 0x200                         // current EL with SP_ELx, synchronous
        mrs x0, esr_el1
        bl hex
        mrs x0, far_el1
        bl hex
        ldr x0, =0x84000008                 // PSCI SYSTEM_OFF
        hvc #0
        .ltorg"""))
    proc = run("-m", "128", "-nographic", "-kernel", str(kernel))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0000000086000010", "0000000700000000"]


def test_accel_and_machine_imply_each_other():
    assert parse_qemu_options(["-accel", "kvm"], MachineConfig()).machine == "microvm"
    assert parse_qemu_options(["-enable-kvm"], MachineConfig()).machine == "microvm"
    assert parse_qemu_options(["-M", "microvm"], MachineConfig()).accel == "kvm"
    cfg = parse_qemu_options(["-M", "virt", "-accel", "tcg"], MachineConfig())
    assert (cfg.machine, cfg.accel) == ("virt", "tcg")
    with pytest.raises(ConfigError, match="the virt board runs on TCG here"):
        parse_qemu_options(["-M", "virt", "-enable-kvm"], MachineConfig())


def test_virt_on_kvm_is_one_line(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x" * 4096)
    line = one_line_error(run("-M", "virt", "-enable-kvm", "-kernel", str(kernel)))
    assert line == "kemu: the virt board runs on TCG here, not KVM (use -accel tcg, " \
        "or -M microvm for kvm)"


def test_default_guest_choice(monkeypatch):
    import kemu.accel.kvm as kvm
    from kemu.cli import choose_default_guest
    assert choose_default_guest(None, "kvm") == ("x86_64", "kvm", None)
    assert choose_default_guest("aarch64", None) == ("aarch64", "tcg", None)
    assert choose_default_guest("x86_64", "kvm") == ("x86_64", "kvm", None)
    with pytest.raises(ConfigError, match="use --accel kvm"):
        choose_default_guest("x86_64", "tcg")
    with pytest.raises(ConfigError, match="unknown accelerator"):
        choose_default_guest(None, "hvf")
    with pytest.raises(ConfigError, match="no default guest"):
        choose_default_guest("riscv64", None)
    # Nothing asked for: the host decides, and kemu says which in one line.
    monkeypatch.setattr(kvm, "kvm_is_hardware_backed", lambda path=None: True)
    arch, accel, note = choose_default_guest(None, None)
    assert (arch, accel) == ("x86_64", "kvm") and "hardware-backed" in note
    monkeypatch.setattr(kvm, "kvm_is_hardware_backed", lambda path=None: False)
    monkeypatch.setattr(kvm, "is_pvm", lambda: False)
    monkeypatch.setattr(kvm, "kvm_unavailable_reason", lambda path=None: "no /dev/kvm (x)")
    arch, accel, note = choose_default_guest(None, None)
    assert (arch, accel) == ("aarch64", "tcg") and "no /dev/kvm" in note and "\n" not in note


def test_run_with_the_wrong_arch_for_the_accelerator():
    assert "use --accel kvm" in one_line_error(run("run", "--arch", "x86_64", "--accel", "tcg"))
    assert "unknown accelerator" in one_line_error(run("run", "--accel", "whpx"))


def test_drive_without_format_warns_as_qemu_and_disk_does_not(tmp_path):
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    missing = str(tmp_path / "no-kernel")
    proc = run("-drive", f"file={disk},if=virtio", "-kernel", missing)
    assert proc.stderr.startswith("kemu: warning: Image format was not specified")
    assert proc.returncode == 2 and "kernel file not found" in proc.stderr
    proc = run("-drive", f"file={disk},format=raw,if=virtio", "-kernel", missing)
    assert "warning" not in proc.stderr
    assert "warning" not in run("--disk", str(disk), "-kernel", missing).stderr


def test_tap_that_cannot_be_opened_is_one_line(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x" * 4096)
    tap = ["-netdev", "tap,id=n0,ifname=averyveryverylongname0,script=no,downscript=no",
           "-device", "virtio-net-device,netdev=n0"]
    assert "longer than 15 bytes" in one_line_error(run("-kernel", str(kernel), *tap))
    # An unprivileged user cannot open /dev/net/tun (mode 0600 root), or where it is
    # world-writable (Debian's udev makes it 0666), cannot attach to an interface.
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root (to drop to nobody with setpriv) and /dev/net/tun")
    tap[1] = "tap,id=n0,ifname=kemutest0,script=no,downscript=no"
    os.chmod(tmp_path, 0o755)
    os.chmod(kernel, 0o644)
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           *KEMU, "-kernel", str(kernel), *tap], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, cwd="/")
    if "Permission denied" not in proc.stderr and "tun" not in proc.stderr:
        pytest.skip(f"nobody cannot run kemu from this checkout: {proc.stderr.strip()[:200]}")
    if os.stat("/dev/net/tun").st_mode & 0o006 == 0o006:
        assert ("cannot attach to kemutest0: Operation not permitted (needs CAP_NET_ADMIN"
                in one_line_error(proc))
    else:
        assert "cannot open /dev/net/tun: Permission denied" in one_line_error(proc)


def test_doubled_commas_are_literal_in_option_values(tmp_path):
    from kemu.options import split_opts
    from kemu.qmp.server import parse_qmp_option
    assert split_opts("file=a,,b.img,format=raw") == ["file=a,b.img", "format=raw"]
    assert split_opts("x,,,,y,z") == ["x,,y", "z"]
    assert split_opts("") == [""]
    cfg = parse_qemu_options(["-drive", "file=/d/a,,b.img,format=raw,if=virtio"], MachineConfig())
    assert str(cfg.drives[0].path) == "/d/a,b.img" and cfg.drives[0].format == "raw"
    assert parse_qmp_option("unix:/tmp/q,,1.sock,server=on,wait=off").path == "/tmp/q,1.sock"


def test_global_options():
    cfg = parse_qemu_options(["-global", "virtio-mmio.force-legacy=off"], MachineConfig())
    assert cfg.globals == {("virtio-mmio", "force-legacy"): "off"}
    cfg = parse_qemu_options(["-global", "driver=virtio-mmio,property=force-legacy,value=on"],
                             MachineConfig())
    assert cfg.globals == {("virtio-mmio", "force-legacy"): "on"}
    for bad in ("virtio-mmio.nope=1", "nodot=1", "virtio-mmio.force-legacy"):
        with pytest.raises(ConfigError):
            parse_qemu_options(["-global", bad], MachineConfig())
