import subprocess

from kemu.boot.linux_arm64 import ARM64_MAGIC, HEADER
from kemu.backends.serial import SerialBackend
from kemu.machines.arm64_virt import VirtMachine
from kemu.machines.config import MachineConfig




def fake_kernel(path):
    path.write_bytes(HEADER.pack(0, 0, 0, 1 << 20, 0b1010, 0, 0, 0, ARM64_MAGIC, 0))
    return path


class Dummy:
    name = "dummy-virtio"

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        pass


def test_device_tree_decompiles_with_dtc(tmp_path, need):
    dtc = need("dtc")
    kernel = fake_kernel(tmp_path / "Image")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x" * 12345)
    cfg = MachineConfig(kernel=kernel, initrd=initrd, memory=256 << 20,
                        append="console=ttyAMA0 root=/dev/vda")
    machine = VirtMachine(cfg, SerialBackend(lambda b: None))
    machine.add_virtio(Dummy())
    (tmp_path / "virt.dtb").write_bytes(machine.device_tree())
    dts = subprocess.run([dtc, "-I", "dtb", "-O", "dts", str(tmp_path / "virt.dtb")],
                         capture_output=True, text=True, check=True).stdout
    start = machine.layout.initrd_addr
    assert 'bootargs = "console=ttyAMA0 root=/dev/vda";' in dts
    assert f"linux,initrd-start = <0x00 {start:#x}>;" in dts
    assert f"linux,initrd-end = <0x00 {start + 12345:#x}>;" in dts
    assert "memory@40000000 {" in dts and "reg = <0x00 0x40000000 0x00 0x10000000>;" in dts
    assert 'compatible = "arm,cortex-a15-gic";' in dts
    assert "reg = <0x00 0x8000000 0x00 0x1000 0x00 0x8010000 0x00 0x2000>;" in dts
    assert 'compatible = "arm,armv8-timer\\0arm,armv7-timer";' in dts
    assert "interrupts = <0x01 0x0d 0x104 0x01 0x0e 0x104 0x01 0x0b 0x104 0x01 0x0a 0x104>;" in dts
    assert "pl011@9000000 {" in dts and "interrupts = <0x00 0x01 0x04>;" in dts
    assert 'method = "hvc";' in dts and '"arm,psci-1.0' in dts
    assert "virtio_mmio@a000000 {" in dts and "interrupts = <0x00 0x10 0x04>;" in dts
    assert 'stdout-path = "/pl011@9000000";' in dts


def test_smp_cpus_node_is_qemus(tmp_path, need):
    """-smp 4: the cpus node (cpu-map, one cpu@N per CPU with enable-method psci)
    and the timer's PPI CPU mask are what QEMU's virt writes, phandle values aside."""
    import re
    dtc = need("dtc")
    qemu = need("qemu-system-aarch64")
    subprocess.run([qemu, "-M", f"virt,dumpdtb={tmp_path / 'qemu.dtb'}", "-cpu", "cortex-a57",
                    "-smp", "4", "-nographic"], capture_output=True, check=True)
    cfg = MachineConfig(kernel=fake_kernel(tmp_path / "Image"), memory=256 << 20, smp=4,
                        cpu="cortex-a57")
    (tmp_path / "kemu.dtb").write_bytes(
        VirtMachine(cfg, SerialBackend(lambda b: None)).device_tree())

    def node(name: str, dtb: str) -> list[str]:
        dts = subprocess.run([dtc, "-I", "dtb", "-O", "dts", str(tmp_path / dtb)],
                             capture_output=True, text=True, check=True).stdout
        start = dts.index(f"\t{name} {{")
        lines = dts[start:dts.index("\n\t};", start)].splitlines()
        return sorted(re.sub(r"<0x[0-9a-f]+>", "<phandle>", line.strip())
                      if "phandle" in line or "cpu = " in line else line.strip()
                      for line in lines)

    assert node("cpus", "kemu.dtb") == node("cpus", "qemu.dtb")
    assert node("timer", "kemu.dtb") == node("timer", "qemu.dtb")


def _dts(dtc: str, path) -> str:
    return subprocess.run([dtc, "-I", "dtb", "-O", "dts", str(path)],
                          capture_output=True, text=True, check=True).stdout


def _node(dts: str, name: str) -> list[str]:
    import re
    start = dts.index(f"\t{name} {{")
    lines = dts[start:dts.index("\n\t};", start)].splitlines()
    return sorted(re.sub(r"<0x[0-9a-f]+>", "<phandle>", line.strip())
                  if "clocks = " in line else line.strip() for line in lines)


def test_rtc_node_and_root_compatible_are_qemus(tmp_path, need):
    """The PL031 node (address, SPI 2, compatible, clocks) and the root's
    compatible string are what QEMU's virt writes, phandle values aside."""
    dtc = need("dtc")
    qemu = need("qemu-system-aarch64")
    subprocess.run([qemu, "-M", f"virt,dumpdtb={tmp_path / 'qemu.dtb'}", "-cpu", "cortex-a57",
                    "-nographic"], capture_output=True, check=True)
    cfg = MachineConfig(kernel=fake_kernel(tmp_path / "Image"), memory=256 << 20)
    (tmp_path / "kemu.dtb").write_bytes(
        VirtMachine(cfg, SerialBackend(lambda b: None)).device_tree())
    kemu, qemu_dts = _dts(dtc, tmp_path / "kemu.dtb"), _dts(dtc, tmp_path / "qemu.dtb")
    assert _node(kemu, "pl031@9010000") == _node(qemu_dts, "pl031@9010000")
    assert "interrupts = <0x00 0x02 0x04>;" in _node(kemu, "pl031@9010000")
    # Root properties are the only ones indented by one tab.
    assert '\tcompatible = "linux,dummy-virt";' in qemu_dts.splitlines()
    assert '\tcompatible = "linux,dummy-virt";' in kemu.splitlines()


def test_chosen_has_kaslr_and_rng_seeds_from_the_host(tmp_path, need):
    """/chosen/kaslr-seed (8 bytes) and /chosen/rng-seed (32 bytes), as QEMU's
    create_randomness; a new device tree has new seeds."""
    import re
    dtc = need("dtc")
    cfg = MachineConfig(kernel=fake_kernel(tmp_path / "Image"), memory=256 << 20)
    machine = VirtMachine(cfg, SerialBackend(lambda b: None))
    seeds = []
    for i in range(2):
        (tmp_path / f"{i}.dtb").write_bytes(machine.device_tree())
        chosen = _node(_dts(dtc, tmp_path / f"{i}.dtb"), "chosen")
        kaslr = next(line for line in chosen if line.startswith("kaslr-seed = "))
        rng = next(line for line in chosen if line.startswith("rng-seed = "))
        assert re.fullmatch(r"kaslr-seed = <0x[0-9a-f]+ 0x[0-9a-f]+>;", kaslr)
        assert len(re.findall(r"0x[0-9a-f]+", rng)) == 8        # 32 bytes as cells
        seeds.append((kaslr, rng))
    assert seeds[0] != seeds[1]
    machine.random = lambda n: bytes(range(n))
    (tmp_path / "fixed.dtb").write_bytes(machine.device_tree())
    chosen = _node(_dts(dtc, tmp_path / "fixed.dtb"), "chosen")
    assert "kaslr-seed = <0x10203 0x4050607>;" in chosen


def test_pmu_fw_cfg_nodes_and_model_are_qemus(tmp_path, need):
    """The pmu node (arm,armv8-pmuv3 on PPI 7 with the CPU mask), the fw-cfg node
    and the root's model are what QEMU's virt writes, with one CPU and with three."""
    dtc = need("dtc")
    qemu = need("qemu-system-aarch64")
    for smp in (1, 3):
        subprocess.run([qemu, "-M", f"virt,dumpdtb={tmp_path / 'qemu.dtb'}", "-cpu",
                        "cortex-a57", "-smp", str(smp), "-nographic"],
                       capture_output=True, check=True)
        cfg = MachineConfig(kernel=fake_kernel(tmp_path / "Image"), memory=256 << 20, smp=smp)
        (tmp_path / "kemu.dtb").write_bytes(
            VirtMachine(cfg, SerialBackend(lambda b: None)).device_tree())
        kemu, qemu_dts = _dts(dtc, tmp_path / "kemu.dtb"), _dts(dtc, tmp_path / "qemu.dtb")
        assert _node(kemu, "pmu") == _node(qemu_dts, "pmu")
        assert f"interrupts = <0x01 0x07 {(((1 << smp) - 1) << 8) | 4:#x}>;" in _node(kemu, "pmu")
        assert _node(kemu, "fw-cfg@9020000") == _node(qemu_dts, "fw-cfg@9020000")
        assert '\tmodel = "linux,dummy-virt";' in qemu_dts.splitlines()
        assert '\tmodel = "linux,dummy-virt";' in kemu.splitlines()
