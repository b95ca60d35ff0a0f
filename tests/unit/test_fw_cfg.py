"""fw_cfg through its registers, as a guest driver (Linux's qemu_fw_cfg, EDK2) uses them.

The registers are big-endian: a guest stores the selector with a
byte-swapping store (iowrite16be), so the tests hand the device the value a
little-endian CPU's store of the big-endian bytes produces.
"""

import struct

import pytest

from kemu.devices import fw_cfg as F
from kemu.errors import ConfigError
from kemu.memory import GuestMemory, RamRegion

RAM = 0x40000000


def be_store(value: int, size: int) -> int:
    """The register value a guest's big-endian store of ``value`` delivers."""
    return int.from_bytes(value.to_bytes(size, "big"), "little")


def make(**kw):
    mem = GuestMemory([RamRegion(RAM, 1 << 20)])
    return F.FwCfg(mem, **kw), mem


def select(dev, key):
    dev.write(F.SELECTOR, 2, be_store(key, 2))


def read_bytes(dev, n, width=1):
    out = b""
    while len(out) < n:
        out += dev.read(F.DATA, width).to_bytes(width, "little")
    return out[:n]


def dma(dev, mem, control, length, buffer, at=RAM + 0x1000, halves=False):
    mem.write(at, F.DMA_ACCESS.pack(control, length, buffer))
    if halves:
        dev.write(F.DMA_ADDRESS, 4, be_store(at >> 32, 4))
        dev.write(F.DMA_ADDRESS + 4, 4, be_store(at & 0xFFFFFFFF, 4))
    else:
        dev.write(F.DMA_ADDRESS, 8, be_store(at, 8))
    return struct.unpack(">I", mem.read(at, 4))[0]


def test_signature_id_and_dma_signature():
    dev, _ = make()
    select(dev, F.FW_CFG_SIGNATURE)
    assert read_bytes(dev, 4) == b"QEMU"
    select(dev, F.FW_CFG_SIGNATURE)
    assert dev.read(F.DATA, 4).to_bytes(4, "little") == b"QEMU"   # wide reads, item order
    select(dev, F.FW_CFG_ID)
    assert struct.unpack("<I", read_bytes(dev, 4))[0] == 3        # traditional | DMA
    # The DMA register reads "QEMU CFG" in memory order, as one 8-byte or two 4-byte reads.
    assert dev.read(F.DMA_ADDRESS, 8).to_bytes(8, "little") == b"QEMU CFG"
    assert dev.read(F.DMA_ADDRESS, 4).to_bytes(4, "little") == b"QEMU"
    assert dev.read(F.DMA_ADDRESS + 4, 4).to_bytes(4, "little") == b" CFG"
    assert dev.read(F.SELECTOR, 2) == 0


def test_reads_past_the_end_are_zero_and_select_rewinds():
    dev, _ = make(nb_cpus=3)
    select(dev, F.FW_CFG_NB_CPUS)
    assert dev.read(F.DATA, 8).to_bytes(8, "little") == b"\x03\x00" + bytes(6)
    assert dev.read(F.DATA, 1) == 0
    select(dev, F.FW_CFG_NB_CPUS)
    assert dev.read(F.DATA, 1) == 3
    select(dev, 0x3FFF)                    # nothing there
    assert dev.read(F.DATA, 8) == 0
    select(dev, F.FW_CFG_ARCH_LOCAL | 1)   # ARM has no arch-local items
    assert dev.read(F.DATA, 4) == 0


def test_file_directory_sorted_by_name_as_qemu():
    dev, _ = make()
    dev.add_file("opt/zeta", b"z" * 5)
    dev.add_file("opt/alpha", b"hello")
    dev.add_file("etc/x", b"")
    select(dev, F.FW_CFG_FILE_DIR)
    count = struct.unpack(">I", read_bytes(dev, 4))[0]
    assert count == 3
    entries = []
    for _ in range(count):
        size, sel, _res = struct.unpack(">IHH", read_bytes(dev, 8))
        name = read_bytes(dev, 56).rstrip(b"\0").decode()
        entries.append((name, sel, size))
    assert entries == [("etc/x", 0x20, 0), ("opt/alpha", 0x21, 5), ("opt/zeta", 0x22, 5)]
    select(dev, 0x21)
    assert read_bytes(dev, 5) == b"hello"
    select(dev, F.FW_CFG_WRITE_CHANNEL | 0x21)   # the write channel bit reads the same item
    assert read_bytes(dev, 5) == b"hello"


def test_dma_select_read_skip_and_zero_fill():
    dev, mem = make()
    dev.add_file("opt/test", b"0123456789")
    buf = RAM + 0x2000
    ctl = (0x20 << 16) | F.DMA_CTL_SELECT | F.DMA_CTL_READ
    assert dma(dev, mem, ctl, 4, buf) == 0
    assert mem.read(buf, 4) == b"0123"
    assert dma(dev, mem, F.DMA_CTL_SKIP, 2, 0) == 0
    mem.write(buf, b"\xff" * 8)
    assert dma(dev, mem, F.DMA_CTL_READ, 8, buf, halves=True) == 0
    assert mem.read(buf, 8) == b"6789" + bytes(4)            # past the end: zeros
    assert dma(dev, mem, 0, 100, buf) == 0                   # no operation: nothing done


def test_dma_from_the_guest_is_checked():
    dev, mem = make()
    dev.add_file("opt/test", b"abc")
    sel = (0x20 << 16) | F.DMA_CTL_SELECT
    # A buffer outside RAM, or running off its end: ERROR, nothing written, no exception.
    assert dma(dev, mem, sel | F.DMA_CTL_READ, 3, 0x1000) == F.DMA_CTL_ERROR
    assert dma(dev, mem, sel | F.DMA_CTL_READ, 3, RAM + (1 << 20) - 1) == F.DMA_CTL_ERROR
    # A huge zero fill past the end of RAM is refused, not attempted.
    assert dma(dev, mem, sel | F.DMA_CTL_READ, 0xFFFFFFFF, RAM) == F.DMA_CTL_ERROR
    # Items are read-only: a DMA write is an error and changes nothing.
    mem.write(RAM + 0x3000, b"XYZ")
    assert dma(dev, mem, sel | F.DMA_CTL_WRITE, 3, RAM + 0x3000) == F.DMA_CTL_ERROR
    select(dev, 0x20)
    assert read_bytes(dev, 3) == b"abc"
    # A descriptor outside RAM is ignored (there is nowhere to report into).
    dev.write(F.DMA_ADDRESS, 8, be_store(0x10, 8))
    dev.write(F.DMA_ADDRESS, 8, be_store((1 << 64) - 8, 8))
    # Odd accesses do nothing.
    dev.write(F.DATA, 4, 0x12345678)
    dev.write(F.SELECTOR, 4, 0)
    assert dev.read(0x17, 1) == 0


def test_kernel_items_as_qemus_arm_boot():
    dev, _ = make()
    dev.add_kernel(b"K" * 10, None, "console=ttyAMA0")
    for key, want in [(F.FW_CFG_KERNEL_SIZE, struct.pack("<I", 10)),
                      (F.FW_CFG_KERNEL_DATA, b"K" * 10),
                      (F.FW_CFG_INITRD_SIZE, struct.pack("<I", 0)),
                      (F.FW_CFG_CMDLINE_SIZE, struct.pack("<I", 16)),
                      (F.FW_CFG_CMDLINE_DATA, b"console=ttyAMA0\0")]:
        select(dev, key)
        assert read_bytes(dev, len(want)) == want


@pytest.mark.parametrize("name", ["", "x" * 56])
def test_bad_file_names_are_refused(name):
    dev, _ = make()
    with pytest.raises(ConfigError):
        dev.add_file(name, b"")


def test_duplicates_and_slots_are_refused():
    dev, _ = make()
    dev.add_file("opt/a", b"")
    with pytest.raises(ConfigError, match="duplicate"):
        dev.add_file("opt/a", b"")
    for i in range(F.FILE_SLOTS - 1):
        dev.add_file(f"opt/f{i}", b"")
    with pytest.raises(ConfigError, match="no more than"):
        dev.add_file("opt/one-more", b"")


# -- -fw_cfg as QEMU spells it --------------------------------------------------------------

def test_fw_cfg_option_spellings(tmp_path):
    from kemu.options.fw_cfg import parse_fw_cfg_option
    opt = parse_fw_cfg_option("opt/greeting,string=a,,b")      # implied name=, ",," escapes
    assert (opt.name, opt.data()) == ("opt/greeting", b"a,b")   # no NUL, as QEMU
    f = tmp_path / "blob"
    f.write_bytes(b"\x00\x01binary")
    assert parse_fw_cfg_option(f"name=opt/blob,file={f}").data() == b"\x00\x01binary"


@pytest.mark.parametrize("text,message", [
    ("opt/x", "exactly one of file, string"),
    ("name=opt/x,file=a,string=b", "exactly one of file, string"),
    ("string=b", "exactly one of file, string"),
    ("opt/" + "x" * 60 + ",string=b", "name too long"),
    ("opt/x,gen_id=g", "not supported"),
    ("opt/x,colour=red", "invalid parameter"),
])
def test_fw_cfg_option_errors(text, message):
    from kemu.options.fw_cfg import parse_fw_cfg_option
    with pytest.raises(ConfigError, match=message):
        parse_fw_cfg_option(text)


def test_fw_cfg_file_errors_are_one_line(tmp_path):
    from kemu.options.fw_cfg import parse_fw_cfg_option
    with pytest.raises(ConfigError, match="can't load"):
        parse_fw_cfg_option(f"name=opt/x,file={tmp_path / 'missing'}").data()


def test_fw_cfg_on_the_command_line(tmp_path, capsys):
    from kemu.cli import parse_qemu_options
    from kemu.machines.config import MachineConfig
    cfg = parse_qemu_options(["-fw_cfg", "name=etc/x,string=1", "-fw_cfg", "opt/y,string=2"],
                             MachineConfig())
    assert [o.name for o in cfg.fw_cfg] == ["etc/x", "opt/y"]
    assert 'should be prefixed with "opt/"' in capsys.readouterr().err   # QEMU's warning
    with pytest.raises(ConfigError, match="microvm board has no fw_cfg"):
        parse_qemu_options(["-M", "microvm", "-fw_cfg", "opt/y,string=2"], MachineConfig())


def test_save_restore_keeps_the_read_position():
    dev, _ = make()
    dev.add_file("opt/a", b"abcdef")
    select(dev, 0x20)
    assert read_bytes(dev, 2) == b"ab"
    other, _ = make()
    other.add_file("opt/a", b"abcdef")
    other.restore(dev.save())
    assert read_bytes(other, 4) == b"cdef"
    dev.reset()
    assert read_bytes(dev, 4) == b"QEMU"
