"""-M virt,gic-version=...: the options QEMU takes, and the device tree QEMU writes."""

import re
import subprocess
import sys

import pytest

from kemu.backends.serial import SerialBackend
from kemu.options import parse_qemu_options
from kemu.errors import ConfigError
from kemu.machines.arm64_virt import VirtMachine
from kemu.machines.config import MachineConfig

from test_fdt_virt import fake_kernel

KEMU = [sys.executable, "-m", "kemu.cli"]


@pytest.mark.parametrize("value,version", [("2", 2), ("3", 3), ("max", 3)])
def test_gic_version_values(value, version):
    cfg = parse_qemu_options(["-M", f"virt,gic-version={value}"], MachineConfig())
    assert cfg.gic_version == version


def test_gicv2_stays_the_default():
    assert parse_qemu_options(["-M", "virt"], MachineConfig()).gic_version == 2


@pytest.mark.parametrize("argv,message", [
    (["-M", "virt,gic-version=host"], "kemu: gic-version=host requires KVM"),
    (["-M", "virt,gic-version=4"], "kemu: gic-version=4 requires virtualization enabled"),
    (["-M", "virt,gic-version=5"], "kemu: -M: gic-version=5: invalid value"),
    (["-M", "virt,gic-version=3", "-smp", "124"], "kemu: -smp: the virt board takes 1 to 123"),
    (["-M", "virt", "-smp", "9"], "kemu: -smp: the virt board takes 1 to 8"),
])
def test_refusals_are_one_line(tmp_path, argv, message):
    r = subprocess.run(KEMU + argv + ["-kernel", str(fake_kernel(tmp_path / "Image"))],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr


@pytest.mark.parametrize("smp", [2, 17])
def test_device_tree_is_qemus(tmp_path, need, smp):
    """The cpus (MPIDRs in clusters of 16), timer (no PPI CPU mask) and GIC nodes
    are QEMU's, phandle values aside and less QEMU's ITS (kemu has no PCIe)."""
    dtc = need("dtc")
    qemu = need("qemu-system-aarch64")
    subprocess.run([qemu, "-M", f"virt,gic-version=3,dumpdtb={tmp_path / 'qemu.dtb'}",
                    "-cpu", "cortex-a57", "-smp", str(smp), "-nographic"],
                   capture_output=True, check=True)
    cfg = MachineConfig(kernel=fake_kernel(tmp_path / "Image"), memory=256 << 20, smp=smp,
                        cpu="cortex-a57", gic_version=3)
    (tmp_path / "kemu.dtb").write_bytes(
        VirtMachine(cfg, SerialBackend(lambda b: None)).device_tree())

    def node(name: str, dtb: str) -> list[str]:
        dts = subprocess.run([dtc, "-I", "dtb", "-O", "dts", str(tmp_path / dtb)],
                             capture_output=True, text=True, check=True).stdout
        dts = re.sub(r"\n\t\tits@8080000 \{.*?\n\t\t\};\n", "\n", dts, flags=re.S)
        start = dts.index(f"\t{name} {{")
        lines = dts[start:dts.index("\n\t};", start)].splitlines()
        return sorted(re.sub(r"<0x[0-9a-f]+>", "<phandle>", line.strip())
                      if "phandle" in line or "cpu = " in line else line.strip()
                      for line in lines if line.strip())

    for name in ("cpus", "timer", "intc@8000000"):
        assert node(name, "kemu.dtb") == node(name, "qemu.dtb"), name


def test_machine_with_17_cpus_routes_by_affinity():
    cfg = MachineConfig(kernel=None, dumpdtb="x", smp=17, gic_version=3)
    machine = VirtMachine(cfg, SerialBackend(lambda b: None))
    assert machine.gic.cpu_of(0x100) == 16 and machine.gic.cpu_of(0xF) == 15
    assert machine.mmio.read(0x080A0000 + 16 * 0x20000 + 0xC, 4) == 0x100   # GICR_TYPER Aff1
