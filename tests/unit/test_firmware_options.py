"""-bios, -drive if=pflash, -hda/-cdrom and -boot as QEMU spells and refuses them, and the
virt board's flash as QEMU wires it (device tree node, image write-back, fw_cfg kernel)."""

from __future__ import annotations

import gzip
import struct
import subprocess
from pathlib import Path

import pytest

from kemu.backends.serial import SerialBackend
from kemu.errors import ConfigError
from kemu.machines.arm64_virt import VirtMachine
from kemu.machines.config import MachineConfig
from kemu.machines.flash import FLASH_BANK_SIZE
from kemu.options.argv import parse_qemu_options


def parse(*argv: str) -> MachineConfig:
    return parse_qemu_options(list(argv), MachineConfig())


def machine(*argv: str) -> VirtMachine:
    return VirtMachine(parse(*argv), SerialBackend(lambda data: None))


def fd_file(tmp_path: Path, name: str, size: int = FLASH_BANK_SIZE, fill: bytes = b"\0") -> Path:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    if fill != b"\0":
        path.write_bytes(fill * size)
    return path


def test_options_as_qemu_spells_them(tmp_path):
    c = parse("-bios", "fw.fd", "-drive", "if=pflash,format=raw,unit=1,file=vars.fd",
              "-hda", "a,b.img", "-cdrom", "cd.iso", "-boot", "order=dc,menu=on,strict=on")
    assert c.bios == Path("fw.fd")
    assert [(d.path, d.unit, d.interface) for d in c.pflash] == [(Path("vars.fd"), 1, "pflash")]
    assert [(str(d.path), d.read_only) for d in c.drives] == [("a,b.img", False),
                                                            ("cd.iso", True)]
    assert c.extra["boot"] == {"menu": True, "strict": True}


@pytest.mark.parametrize("argv,message", [
    (["-boot", "order=z"], "Invalid boot device: 'z'"),
    (["-boot", "order=cc"], "Boot device 'c' was given twice"),
    (["-boot", "splash-time=x"], "splash-time"),
    (["-drive", "if=pflash,file=f,unit=x"], "unit=x"),
    (["-drive", "if=floppy,file=f"], "if=floppy"),
    (["-drive", "file=f,media=tape"], "media=tape"),
])
def test_bad_options_are_one_line(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(*argv)


def test_flash_errors_as_qemu(tmp_path):
    small = fd_file(tmp_path, "small.fd", 4096)
    good = fd_file(tmp_path, "good.fd")
    with pytest.raises(ConfigError, match="device requires 67108864 bytes, block backend "
                                          "provides 4096 bytes"):
        machine("-drive", f"if=pflash,format=raw,file={small}")
    with pytest.raises(ConfigError, match="cannot use both options at once"):
        machine("-bios", str(small), "-drive", f"if=pflash,format=raw,file={good}")
    with pytest.raises(ConfigError, match="does not support if=pflash,bus=0,unit=2"):
        machine("-drive", f"if=pflash,format=raw,unit=2,file={good}")
    with pytest.raises(ConfigError, match="unit=1 exists"):
        machine("-drive", f"if=pflash,unit=1,file={good}", "-drive", f"if=pflash,unit=1,file={good}")
    with pytest.raises(ConfigError, match="Could not find ROM image"):
        machine("-bios", str(tmp_path / "missing.fd"))
    big = fd_file(tmp_path, "big.fd", FLASH_BANK_SIZE + 1)
    with pytest.raises(ConfigError, match="Could not load ROM image"):
        machine("-bios", str(big))
    with pytest.raises(ConfigError, match="raw"):
        machine("-drive", f"if=pflash,format=qcow2,file={good}")


def test_no_kernel_and_no_firmware_is_refused():
    with pytest.raises(ConfigError, match="no firmware"):
        machine("-m", "128")


def test_flash_node_matches_qemu(tmp_path, need):
    dtc, qemu = need("dtc"), need("qemu-system-aarch64")
    bios = tmp_path / "fw.bin"
    bios.write_bytes(b"\x00\x00\x00\x14" * 16)      # b . (a loop)
    m = machine("-bios", str(bios))
    try:
        (tmp_path / "kemu.dtb").write_bytes(m.device_tree())
    finally:
        m.close()
    subprocess.run([qemu, "-M", f"virt,dumpdtb={tmp_path / 'qemu.dtb'}", "-bios", str(bios),
                    "-nographic"], capture_output=True, check=True)

    def flash_node(path):
        dts = subprocess.run([dtc, "-I", "dtb", "-O", "dts", str(path)], capture_output=True,
                             text=True, check=True).stdout
        start = dts.index("flash@0 {")
        return sorted(line.strip() for line in dts[start:dts.index("};", start)].splitlines())

    assert flash_node(tmp_path / "kemu.dtb") == flash_node(tmp_path / "qemu.dtb")


def test_variables_reach_the_image_and_readonly_code_does_not(tmp_path):
    code = fd_file(tmp_path, "code.fd", fill=b"\x11")
    variables = fd_file(tmp_path, "vars.fd")
    m = machine("-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                "-drive", f"if=pflash,format=raw,unit=1,file={variables}")
    try:
        assert m.firmware and m.layout is None
        flash0, flash1 = (bank.device for bank in m.flash)
        for dev in (flash0, flash1):
            dev.write(0x40000, 4, 0x00400040)        # word program, as EDK2 writes it
            dev.write(0x40000, 4, 0x6B656D75)
            dev.write(0x40000, 4, 0x00FF00FF)
        assert flash1.read(0x40000, 4) == 0x6B656D75
        with open(variables, "rb") as f:
            f.seek(0x40000)
            assert f.read(4) == struct.pack("<I", 0x6B656D75)
        assert code.read_bytes()[0x40000:0x40004] == b"\x11" * 4
        assert flash0.status & 0x10                   # program error on the read-only bank
    finally:
        m.close()


def test_kernel_goes_to_the_firmware_through_fw_cfg(tmp_path):
    from kemu.devices.fw_cfg import (FW_CFG_CMDLINE_DATA, FW_CFG_KERNEL_DATA,
                                     FW_CFG_KERNEL_SIZE)
    bios = tmp_path / "fw.bin"
    bios.write_bytes(b"\x00\x00\x00\x14")
    kernel = b"not an Image but a kernel all the same" * 100
    (tmp_path / "k.gz").write_bytes(gzip.compress(kernel))
    m = machine("-bios", str(bios), "-kernel", str(tmp_path / "k.gz"), "-append", "root=x")
    try:
        assert m.layout is None
        fw = m.fw_cfg

        def item(key: int, n: int) -> bytes:
            fw.select(key)
            return b"".join(fw.read(0, 1).to_bytes(1, "little") for _ in range(n))
        assert struct.unpack("<I", item(FW_CFG_KERNEL_SIZE, 4))[0] == len(kernel)
        assert item(FW_CFG_KERNEL_DATA, 64) == kernel[:64]           # gunzipped, as QEMU
        assert item(FW_CFG_CMDLINE_DATA, 7) == b"root=x\0"
        names = [f.name for f in fw.files()]
        assert "bootorder" in names and "etc/boot-fail-wait" in names
    finally:
        m.close()


def test_bootorder_from_bootindex_as_qemu_spells_it(tmp_path):
    """QEMU 7.2's virt, for the same devices, gives the firmware
    /pci@ffffffffffffffff/scsi@4/disk@0,0 (bootindex 0) before scsi@3 (1), then the
    virtio-mmio disk, then HALT under -boot strict=on."""
    images = [fd_file(tmp_path, f"d{i}.img", 1 << 20) for i in range(3)]
    m = machine("-kernel", str(fd_file(tmp_path, "k", 4096)), "-boot", "strict=on",
                "-drive", f"if=none,id=d0,format=raw,file={images[0]}",
                "-device", "virtio-blk-pci,drive=d0,addr=3,bootindex=1",
                "-drive", f"if=none,id=d1,format=raw,file={images[1]}",
                "-device", "virtio-blk-device,drive=d1,bootindex=3",
                "-drive", f"if=none,id=d2,format=raw,file={images[2]}",
                "-device", "virtio-blk-pci,drive=d2,addr=4,bootindex=0")
    try:
        fw = m.fw_cfg
        entry = next(f for f in fw.files() if f.name == "bootorder")
        fw.select(entry.select)
        data = bytes(fw.read(0, 1) for _ in range(entry.size))
        mmio = m.virtio_slots[0].base
        assert data == (b"/pci@ffffffffffffffff/scsi@4/disk@0,0\n"
                        b"/pci@ffffffffffffffff/scsi@3/disk@0,0\n"
                        + f"/virtio-mmio@{mmio:016x}/disk@0,0\n".encode() + b"HALT\0")
    finally:
        m.close()
    with pytest.raises(ConfigError, match="bootindex 1 used by two devices"):
        machine("-kernel", str(tmp_path / "k"),
                "-drive", f"if=none,id=d0,format=raw,file={images[0]}",
                "-device", "virtio-blk-pci,drive=d0,bootindex=1",
                "-drive", f"if=none,id=d1,format=raw,file={images[1]}",
                "-device", "virtio-blk-pci,drive=d1,bootindex=1")
