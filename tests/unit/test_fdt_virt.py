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
