import gzip
import struct

import pytest

from kemu.boot.arm64_boot import load, parse_kernel, plan_layout
from kemu.boot.linux_arm64 import ARM64_MAGIC, HEADER, Arm64Image
from kemu.errors import BootError
from kemu.memory import GuestMemory, RamRegion

MiB = 1 << 20


def image_bytes(text_offset=0, image_size=4 * MiB, flags=0b1010, body=b"\x00" * 4096,
                magic=ARM64_MAGIC):
    header = HEADER.pack(0x91005A4D, 0x14000000, text_offset, image_size, flags, 0, 0, 0,
                         magic, 0)
    return header + body


def test_parse_header():
    img = Arm64Image.parse(image_bytes(text_offset=0x80000))
    assert img.text_offset == 0x80000 and img.image_size == 4 * MiB


def test_gzip_image_accepted():
    raw = image_bytes()
    img = Arm64Image.parse(gzip.compress(raw))
    assert img.data == raw


@pytest.mark.parametrize("data,msg", [
    (b"MZ" + b"\0" * 100, "not an arm64 Linux Image"),
    (b"short", "too short"),
    (b"\x1f\x8bnot really gzip", "corrupt gzip"),
])
def test_bad_images(data, msg):
    with pytest.raises(BootError, match=msg):
        Arm64Image.parse(data)


def test_big_endian_refused():
    with pytest.raises(BootError, match="big-endian"):
        Arm64Image.parse(image_bytes(flags=1))


def test_missing_file(tmp_path):
    with pytest.raises(BootError, match="not found"):
        Arm64Image.load_file(tmp_path / "nope")


def test_layout_and_load():
    base = 0x40000000
    img = parse_kernel(image_bytes(), base)
    layout = plan_layout(img, base, 128 * MiB, initrd_size=1000)
    assert layout.entry == base + 2 * MiB and img.end == layout.entry + 4 * MiB
    assert layout.initrd_addr == base + 64 * MiB      # QEMU: min(RAM / 2, 128 MiB)
    assert layout.dtb_addr == layout.x0 == base + 66 * MiB
    mem = GuestMemory([RamRegion(base, 128 * MiB)])
    load(mem, layout, b"I" * 1000, b"D" * 100)
    assert mem.read(layout.entry + 56, 4) == struct.pack("<I", ARM64_MAGIC)
    assert mem.read(layout.initrd_addr, 4) == b"IIII"
    assert mem.read(layout.dtb_addr, 2) == b"DD"


def test_too_little_memory():
    img = parse_kernel(image_bytes(image_size=40 * MiB), 0x40000000)
    with pytest.raises(BootError, match="too little memory"):
        plan_layout(img, 0x40000000, 32 * MiB, initrd_size=0)
