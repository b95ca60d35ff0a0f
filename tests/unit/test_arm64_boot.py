"""Kernels the virt board loads as QEMU's does: a raw binary, an ELF, an arm64 Image.

Each guest prints over the PL011 where it runs, its x0, the first word at the
device tree address and CurrentEL, then powers off with PSCI SYSTEM_OFF; the
same file runs under kemu and qemu-system-aarch64 and the two outputs must
be equal.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

from kemu.backends.serial import SerialBackend
from kemu.boot import arm64_boot
from kemu.errors import BootError
from kemu.machines.arm64_virt import VirtMachine
from kemu.machines.config import MachineConfig

from test_tcg_aarch64 import assemble

MiB = 1 << 20
GUESTS = Path(__file__).resolve().parents[1] / "guests"
FDT_MAGIC_LE = 0xEDFE0DD0   # d0 0d fe ed read as a little-endian word

# Prints here, x0, [dtb] and CurrentEL; DTB is a register or an address.
REPORT = """
    .text
    .global _start
_start:
here:
    mov x19, x0
    adr x20, here
    {dtb}
    ldr w21, [x22]
    mrs x23, CurrentEL
    mov x0, x20
    bl hex
    mov x0, x19
    bl hex
    mov x0, x21
    bl hex
    mov x0, x23
    bl hex
    ldr x0, =0x84000008     // PSCI SYSTEM_OFF
    hvc #0
    b .
""" + (GUESTS / "pl011_hex.S").read_text() + """    .ltorg
"""


def run_kemu(kernel, memory=128, initrd=None) -> list[int]:
    out = bytearray()
    cfg = MachineConfig(kernel=kernel, memory=memory * MiB, initrd=initrd)
    machine = VirtMachine(cfg, SerialBackend(out.extend))
    machine.start()
    outcome = machine.wait(60)
    if outcome is None:
        machine.stop()
        machine.wait(10)
        pytest.fail("the guest did not power off")
    machine.close()
    assert outcome.reason == "poweroff", outcome
    return [int(line, 16) for line in out.decode().split()]


def run_qemu(need, kernel, memory=128, initrd=None) -> list[int]:
    qemu = need("qemu-system-aarch64")
    argv = [qemu, "-M", "virt", "-cpu", "cortex-a57", "-m", str(memory), "-nographic",
            "-nodefaults", "-serial", "stdio", "-kernel", str(kernel)]
    if initrd:
        argv += ["-initrd", str(initrd)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return [int(line, 16) for line in r.stdout.split()]


def raw_guest(tmp_path):
    kernel = tmp_path / "guest.bin"
    kernel.write_bytes(assemble(tmp_path, REPORT.format(dtb="mov x22, x19")))
    return kernel


@pytest.mark.parametrize("memory,initrd_size", [(128, 0), (512, 0), (128, 5 * MiB + 123)])
def test_raw_binary_boots_as_under_qemu(tmp_path, need, memory, initrd_size):
    kernel = raw_guest(tmp_path)
    initrd = None
    if initrd_size:
        initrd = tmp_path / "initrd"
        initrd.write_bytes(b"\xa5" * initrd_size)
    got = run_kemu(kernel, memory, initrd)
    assert got[0] == 0x40080000                       # RAM + KERNEL64_LOAD_ADDR
    assert got[2] == FDT_MAGIC_LE and got[3] == 1 << 2
    assert got[1] >= got[0] and got[1] % (2 * MiB) == 0
    assert got == run_qemu(need, kernel, memory, initrd)


@pytest.mark.parametrize("text,dtb_word", [(0x44100000, FDT_MAGIC_LE), (0x40100000, 0)])
def test_elf_kernel_at_its_addresses_as_under_qemu(tmp_path, need, text, dtb_word):
    ld = shutil.which("aarch64-linux-gnu-ld")
    if not ld:
        pytest.skip("binutils-aarch64-linux-gnu is not installed")
    assemble(tmp_path, REPORT.format(dtb="ldr x22, =0x40000000"))
    kernel = tmp_path / "guest.elf"
    subprocess.run([ld, f"-Ttext={text:#x}", "-o", str(kernel), str(tmp_path / "g.o")],
                   check=True)
    got = run_kemu(kernel)
    # Entry from the ELF header, x0 zero (not Linux), the DTB at the start of RAM
    # when 1 MiB is left below the image (ld puts the first segment 64 KiB lower).
    assert got == [text, 0, dtb_word, 1 << 2]
    assert got == run_qemu(need, kernel)


def test_image_dtb_after_kernel_as_under_qemu(tmp_path, need):
    header = """
    .text
    b 2f
    .word 0
      .quad 0, 0x5000000, 0xa, 0, 0, 0
    .ascii "ARM\\x64"
    .word 0
2:
"""
    kernel = tmp_path / "Image"
    kernel.write_bytes(assemble(tmp_path, header + REPORT.format(dtb="mov x22, x19")
                                .replace("_start:", "")))
    got = run_kemu(kernel, memory=128)
    # Image at RAM + 2 MiB, 80 MiB long; the DTB after it (above RAM / 2), 2 MiB aligned.
    assert got[0] == 0x40200000 + 64
    assert got[1] == 0x40000000 + 82 * MiB and got[2] == FDT_MAGIC_LE
    assert got == run_qemu(need, kernel, memory=128)


def test_layout_rules():
    base = 0x40000000
    raw = arm64_boot.parse_kernel(b"\x00" * 100, base)
    layout = arm64_boot.plan_layout(raw, base, 1024 * MiB, initrd_size=10)
    assert (raw.kind, layout.entry, layout.initrd_addr) == ("raw", base + 0x80000,
                                                            base + 128 * MiB)
    assert layout.dtb_addr == layout.x0 == base + 130 * MiB
    with pytest.raises(BootError, match="too little memory"):
        arm64_boot.plan_layout(raw, base, 16 * MiB, initrd_size=8 * MiB)


def test_elf_errors(tmp_path):
    with pytest.raises(BootError, match="64-bit little-endian"):
        arm64_boot.parse_kernel(b"\x7fELF" + b"\0" * 100, 0x40000000)
    x86 = bytearray(b"\x7fELF\x02\x01\x01" + b"\0" * 9 + b"\x02\x00\x3e\x00" + b"\0" * 44)
    with pytest.raises(BootError, match="not aarch64"):
        arm64_boot.parse_kernel(bytes(x86), 0x40000000)


def dts_of(dtc, path) -> str:
    return subprocess.run([dtc, "-I", "dtb", "-O", "dts", str(path)], capture_output=True,
                          text=True, check=True).stdout


def kemu_cli(*argv):
    from kemu.cli import main
    return main(list(argv))


@pytest.mark.parametrize("spelling", [["-M", "virt,dumpdtb={}"],
                                      ["-M", "virt", "-machine", "dumpdtb={}"]])
def test_dumpdtb_writes_the_device_tree_and_exits_0(tmp_path, need, capfd, spelling):
    dtc = need("dtc")
    qemu = need("qemu-system-aarch64")
    argv = [a.format(tmp_path / "kemu.dtb") for a in spelling] + ["-m", "256"]
    assert kemu_cli(*argv) == 0
    assert "dtb dumped to" in capfd.readouterr().err
    subprocess.run([qemu, *[a.format(tmp_path / "qemu.dtb") for a in spelling], "-m", "256",
                    "-nographic"], capture_output=True, check=True)
    ours, theirs = dts_of(dtc, tmp_path / "kemu.dtb"), dts_of(dtc, tmp_path / "qemu.dtb")
    for line in ("memory@40000000 {", "reg = <0x00 0x40000000 0x00 0x10000000>;",
                 'stdout-path = "/pl011@9000000";', "pl011@9000000 {",
                 'compatible = "linux,dummy-virt";'):
        assert line in ours and line in theirs, line


def test_dumpdtb_with_a_kernel_has_its_chosen_node(tmp_path, need):
    dtc = need("dtc")
    kernel = raw_guest(tmp_path)
    (tmp_path / "rd").write_bytes(b"r" * 1000)
    assert kemu_cli("-M", f"virt,dumpdtb={tmp_path / 'd.dtb'}", "-kernel", str(kernel),
                    "-initrd", str(tmp_path / "rd"), "-append", "hello") == 0
    dts = dts_of(dtc, tmp_path / "d.dtb")
    assert 'bootargs = "hello";' in dts
    assert "linux,initrd-start = <0x00 0x44000000>;" in dts   # QEMU's place for -m 128


MY_DTS = """/dts-v1/;
/ { model = "mine"; #address-cells = <2>; #size-cells = <2>;
    memory@80000000 { device_type = "memory"; reg = <0 0x80000000 0 0x1000>; };
    chosen { }; };
"""


def test_dtb_file_replaces_the_generated_one_as_under_qemu(tmp_path, need):
    """QEMU keeps the file's nodes and sets RAM, /chosen and psci in it."""
    dtc = need("dtc")
    qemu = need("qemu-system-aarch64")
    (tmp_path / "my.dts").write_text(MY_DTS)
    subprocess.run([dtc, "-I", "dts", "-O", "dtb", "-o", str(tmp_path / "my.dtb"),
                    str(tmp_path / "my.dts")], check=True, capture_output=True)
    kernel = raw_guest(tmp_path)
    (tmp_path / "rd").write_bytes(b"r" * 5000)
    common = ["-cpu", "cortex-a57", "-m", "128", "-kernel", str(kernel), "-initrd", str(tmp_path / "rd"),
              "-append", "hello", "-dtb", str(tmp_path / "my.dtb")]
    assert kemu_cli("-M", f"virt,dumpdtb={tmp_path / 'k.dtb'}", *common) == 0
    subprocess.run([qemu, "-M", f"virt,dumpdtb={tmp_path / 'q.dtb'}", "-nographic", *common],
                   check=True, capture_output=True)

    def tree(name):
        dts = dts_of(dtc, tmp_path / name)
        return sorted(line.strip() for line in dts.splitlines()
                      if "seed" not in line and line.strip())
    assert tree("k.dtb") == tree("q.dtb")
    assert 'model = "mine";' in tree("k.dtb")
    # The guest gets it in x0.
    out = bytearray()
    machine = VirtMachine(MachineConfig(kernel=kernel, dtb=tmp_path / "my.dtb"),
                          SerialBackend(out.extend))
    machine.start()
    assert machine.wait(60).reason == "poweroff"
    assert int(out.decode().split()[2], 16) == FDT_MAGIC_LE
    assert kemu_cli("-kernel", str(kernel), "-dtb", str(kernel)) == 2   # not a DTB
