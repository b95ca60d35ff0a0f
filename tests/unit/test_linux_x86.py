"""bzImage and PVH parsing, zero-page layout and placement, on synthetic images.

The images are made here byte by byte following Documentation/x86/boot.rst
(setup header at 0x1f1) and the ELF64 / Xen PVH note formats; no toolchain
and no /dev/kvm are needed.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kemu.boot import linux_x86 as lx
from kemu.boot.linux_x86 import E820_RAM, E820_RESERVED, BzImage, E820Entry
from kemu.errors import BootError
from kemu.memory import GuestMemory, RamRegion

MiB = 1 << 20


def make_bzimage(*, version=0x020F, setup_sects=1, payload=b"\x90" * 0x300, loadflags=0x01,
                 xloadflags=0x1, init_size=0x10000, relocatable=1, pref_address=0x1000000,
                 kernel_alignment=0x200000, cmdline_size=2047, initrd_addr_max=0x7FFFFFFF,
                 boot_flag=0xAA55, magic=b"HdrS", syssize=None) -> bytes:
    setup = bytearray((setup_sects or 4) * 512 + 512)
    struct.pack_into("<B", setup, 0x1F1, setup_sects)
    if syssize is None:
        syssize = (len(payload) + 15) // 16
    struct.pack_into("<I", setup, 0x1F4, syssize)
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200] = 0xEB
    setup[0x201] = 0x26C - 0x202
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = relocatable
    setup[0x235] = 21
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    padded = payload + bytes(syssize * 16 - len(payload)) if syssize * 16 > len(payload) \
        else payload
    return bytes(setup) + padded


def memory(size=64 * MiB) -> GuestMemory:
    return GuestMemory([RamRegion(b, s) for b, s in lx.ram_layout(size)])


# -- setup header ---------------------------------------------------------------------------
def test_parse_reads_the_setup_header():
    img = BzImage.parse(make_bzimage())
    assert img.version == 0x020F
    assert img.setup_sects == 1 and img.setup_size == 1024
    assert img.xloadflags & lx.XLF_KERNEL_64
    assert img.relocatable and img.kernel_alignment == 0x200000
    assert img.pref_address == 0x1000000 and img.init_size == 0x10000
    assert img.cmdline_size == 2047 and img.initrd_addr_max == 0x7FFFFFFF
    assert img.header_end == 0x26C
    assert bytes(img.payload[:4]) == b"\x90" * 4
    assert lx.is_bzimage(img.data)


def test_zero_setup_sects_means_four():
    img = BzImage.parse(make_bzimage(setup_sects=0))
    assert img.setup_sects == 4 and img.setup_size == 5 * 512


@pytest.mark.parametrize("kwargs, message", [
    ({"boot_flag": 0x1234}, "not a bzImage"),
    ({"magic": b"XXXX"}, "no HdrS magic"),
    ({"version": 0x020B}, "2.11 is too old"),
    ({"version": 0x0204}, "too old"),
    ({"xloadflags": 0}, "not a 64-bit kernel"),
    ({"loadflags": 0}, "zImage"),
    ({"init_size": lx.MAX_KERNEL_SIZE + 1}, "too big"),
])
def test_bad_images_are_refused(kwargs, message):
    with pytest.raises(BootError, match=message):
        BzImage.parse(make_bzimage(**kwargs), "kernel x")


def test_truncated_images_are_refused_where_qemu_refuses_them():
    data = make_bzimage()
    with pytest.raises(BootError, match="truncated"):
        BzImage.parse(data[:0x200])         # no whole setup header
    with pytest.raises(BootError, match="truncated: the header announces 1024 bytes of setup"):
        BzImage.parse(data[:1000])          # less than setup_sects says


@pytest.mark.parametrize("short", [1, 5, 15, 16, 0x300])
def test_the_kernel_is_the_rest_of_the_file_whatever_syssize_says(short):
    """QEMU and boot loaders load the file's size, not syssize (in 16-byte units,
    so it often runs a few bytes past the end of a real bzImage)."""
    payload = bytes(range(256)) * 3
    data = make_bzimage(payload=payload)
    assert len(data) == 1024 + 0x300
    img = BzImage.parse(data[:-short])
    assert bytes(img.payload) == payload[:-short]
    mem = memory()
    lx.load_bzimage(mem, img)
    assert mem.read(0x100000, len(payload) - short) == payload[:-short]


def test_syssize_past_the_end_of_the_file_by_its_rounding():
    """A payload whose size is not a multiple of 16: syssize rounded up runs past it."""
    data = make_bzimage(payload=b"\x90" * 0x2F5)[:1024 + 0x2F5]    # syssize 0x30: 0x300
    assert len(BzImage.parse(data, "kernel x").payload) == 0x2F5


def test_any_kernel_alignment_is_accepted_as_qemu_does():
    img = BzImage.parse(make_bzimage(kernel_alignment=0x300000, pref_address=0x1000000))
    assert img.runtime_start(0x100000) == 0x1200000


def test_error_is_one_line_and_names_the_file(tmp_path):
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(BootError) as e:
        BzImage.load_file(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BootError, match="not found"):
        BzImage.load_file(tmp_path / "missing")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=0x600))
def test_random_input_only_raises_boot_error(data):
    try:
        BzImage.parse(data)
    except BootError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.integers(0x1F1, 0x26B), st.integers(0, 255))
def test_corrupted_header_bytes_only_raise_boot_error(offset, value):
    data = bytearray(make_bzimage())
    data[offset] = value
    try:
        img = BzImage.parse(bytes(data))
    except BootError:
        return
    lx.build_boot_params(img, lx.CMDLINE_ADDR, 0, 0, lx.e820_map(memory()))


def test_runtime_start_follows_boot_rst():
    rel = BzImage.parse(make_bzimage(pref_address=0x1000000, kernel_alignment=0x200000))
    assert rel.runtime_start(0x100000) == 0x1000000          # raised to pref_address
    assert rel.runtime_start(0x1100000) == 0x1200000         # rounded up to the alignment
    fixed = BzImage.parse(make_bzimage(relocatable=0, pref_address=0x100000))
    assert fixed.runtime_start(0x100000) == 0x100000
    assert fixed.memory_end() == 0x100000 + 0x10000


# -- e820 -----------------------------------------------------------------------------------------
def test_ram_layout_splits_around_the_mmio_hole():
    assert lx.ram_layout(512 * MiB) == [(0, 512 * MiB)]
    assert lx.ram_layout(3 << 30) == [(0, 3 << 30)]
    assert lx.ram_layout(5 << 30) == [(0, 3 << 30), (4 << 30, 2 << 30)]


def test_e820_map_small_and_large():
    assert lx.e820_map([(0, 64 * MiB)]) == [
        E820Entry(0, 0x9FC00, E820_RAM),
        E820Entry(0x9FC00, 0x400, E820_RESERVED),
        E820Entry(0x100000, 63 * MiB, E820_RAM),
    ]
    big = lx.e820_map(lx.ram_layout(6 << 30), reserved=[(0xFEC00000, 0x1000)])
    assert big[-2:] == [E820Entry(0xFEC00000, 0x1000, E820_RESERVED),
                        E820Entry(4 << 30, 3 << 30, E820_RAM)]
    assert E820Entry(0x100000, (3 << 30) - 0x100000, E820_RAM) in big
    assert lx.low_ram_end(big) == 3 << 30


def test_e820_map_from_guest_memory():
    assert lx.e820_map(memory(32 * MiB)) == lx.e820_map([(0, 32 * MiB)])


def test_no_ram_above_1mib_is_an_error():
    with pytest.raises(BootError, match="past 1 MiB"):
        lx.low_ram_end(lx.e820_map([(0, 0x80000)]))


# -- zero page -----------------------------------------------------------------------------------
def test_boot_params_layout():
    img = BzImage.parse(make_bzimage())
    e820 = lx.e820_map([(0, 64 * MiB)])
    bp = lx.build_boot_params(img, 0x20000, 0x3000000, 0x1234, e820, acpi_rsdp=0xE0000)
    assert len(bp) == 4096
    # The setup header is copied from the image ...
    assert bp[0x1F1:0x1FA] == img.data[0x1F1:0x1FA]
    assert bp[0x1FC:0x210] == img.data[0x1FC:0x210]
    assert bp[0x211:0x218] == img.data[0x211:0x218]
    assert struct.unpack_from("<H", bp, 0x1FE)[0] == 0xAA55
    assert bp[0x202:0x206] == b"HdrS"
    # ... then the loader's fields are filled in.
    assert struct.unpack_from("<H", bp, 0x1FA)[0] == 0xFFFF                 # vid_mode
    assert bp[0x210] == 0xFF                                                # type_of_loader
    assert struct.unpack_from("<I", bp, 0x228)[0] == 0x20000                # cmd_line_ptr
    assert struct.unpack_from("<II", bp, 0x218) == (0x3000000, 0x1234)      # ramdisk
    assert struct.unpack_from("<III", bp, 0xC0) == (0, 0, 0)                # ext_*
    assert struct.unpack_from("<Q", bp, 0x70)[0] == 0xE0000                 # acpi_rsdp_addr
    assert bp[0x1E8] == 3
    table = [struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) for i in range(3)]
    assert table == [(e.addr, e.size, e.type) for e in e820]
    assert bp[0x2D0 + 60:0xCD0] == bytes(0xCD0 - 0x2D0 - 60)
    assert bp[0x26C:0x290] == bytes(0x24)        # nothing past the header's end


def test_boot_params_refuses_too_many_e820_entries():
    img = BzImage.parse(make_bzimage())
    e820 = [E820Entry(i * 0x1000, 0x1000, E820_RAM) for i in range(129)]
    with pytest.raises(BootError, match="e820"):
        lx.build_boot_params(img, 0x20000, 0, 0, e820)


# -- loading -------------------------------------------------------------------------------------
def test_load_bzimage_places_everything():
    mem = memory(64 * MiB)
    data = make_bzimage(payload=bytes(range(256)) * 4)
    img = BzImage.parse(data)
    initrd = b"initrd!" * 1000
    boot = lx.load_bzimage(mem, img, "console=ttyS0 quiet", initrd)
    assert boot.entry == 0x100000 + 0x200
    assert boot.boot_params == lx.ZERO_PAGE_ADDR
    assert mem.read(0x100000, 1024) == bytes(range(256)) * 4
    assert mem.read(lx.CMDLINE_ADDR, 20) == b"console=ttyS0 quiet\0"
    assert boot.initrd_addr % 4096 == 0
    assert boot.initrd_addr + len(initrd) <= 64 * MiB
    assert boot.initrd_addr >= img.memory_end()
    assert mem.read(boot.initrd_addr, len(initrd)) == initrd
    bp = mem.read(lx.ZERO_PAGE_ADDR, 4096)
    assert struct.unpack_from("<II", bp, 0x218) == (boot.initrd_addr, len(initrd))
    assert bp[0x1E8] == len(boot.e820) == 3


def test_initrd_honours_initrd_addr_max():
    mem = memory(256 * MiB)
    img = BzImage.parse(make_bzimage(initrd_addr_max=0x2FFFFFF))
    boot = lx.load_bzimage(mem, img, "", b"x" * 5000)
    assert boot.initrd_addr + 5000 <= 0x3000000
    assert boot.initrd_addr == (0x3000000 - 5000) & ~0xFFF


def test_initrd_that_does_not_fit():
    img = BzImage.parse(make_bzimage())
    with pytest.raises(BootError, match="initrd of .* does not fit"):
        lx.load_bzimage(memory(32 * MiB), img, "", b"\0" * (20 * MiB))


def test_kernel_that_does_not_fit():
    img = BzImage.parse(make_bzimage(init_size=40 * MiB))
    with pytest.raises(BootError, match="more memory"):
        lx.load_bzimage(memory(32 * MiB), img)


def test_command_line_limits():
    img = BzImage.parse(make_bzimage(cmdline_size=16))
    mem = memory()
    lx.load_bzimage(mem, img, "x" * 16)
    with pytest.raises(BootError, match="at most 16"):
        lx.load_bzimage(mem, img, "x" * 17)
    with pytest.raises(BootError, match="NUL"):
        lx.load_bzimage(mem, img, "a\0b")


def test_place_initrd():
    assert lx.place_initrd(0x1000, 0xFFFFFFFF, 0x4000000, 0x2000000) == 0x3FFF000
    assert lx.place_initrd(0x1001, 0x37FFFFFF, 0x40000000, 0) == 0x37FFE000


# -- PVH -------------------------------------------------------------------------------------------
def make_elf(*, entry=0x1000200, note=True, paddr=0x1000000, data=b"\xf4" * 0x300,
             memsz=0x1000, machine=62, cls=2, note_desc_size=8, truncate=0) -> bytes:
    ehdr_size, phdr_size = 64, 56
    phnum = 2 if note else 1
    desc = entry.to_bytes(note_desc_size, "little")
    note_blob = struct.pack("<III", 4, len(desc), 18) + b"Xen\0" + desc
    load_off = ehdr_size + phnum * phdr_size
    note_off = load_off + len(data)
    ident = b"\x7fELF" + bytes([cls, 1, 1]) + bytes(9)
    out = bytearray(lx.ELF64_EHDR.pack(ident, 2, machine, 1, entry, ehdr_size, 0, 0,
                                       ehdr_size, phdr_size, phnum, 0, 0, 0))
    out += lx.ELF64_PHDR.pack(1, 5, load_off, paddr + 0xFFFFFFFF80000000, paddr, len(data),
                              memsz, 0x1000)
    if note:
        out += lx.ELF64_PHDR.pack(4, 4, note_off, 0, 0, len(note_blob), len(note_blob), 4)
    out += data
    if note:
        out += note_blob
    return bytes(out[:len(out) - truncate])


def test_parse_pvh_elf():
    k = lx.parse_pvh_elf(make_elf())
    assert k.entry == 0x1000200
    assert k.segments == (lx.ElfSegment(0x1000000, b"\xf4" * 0x300, 0x1000),)
    assert k.start == 0x1000000 and k.end == 0x1001000
    assert lx.parse_pvh_elf(make_elf(note_desc_size=4)).entry == 0x1000200


@pytest.mark.parametrize("data, message", [
    (b"MZ" + bytes(100), "not an ELF"),
    (make_elf(note=False), "no PVH entry point"),
    (make_elf(machine=3), "not x86-64"),
    (make_elf(cls=1), "64-bit"),
    (make_elf(truncate=40), "truncated"),
    (make_elf(data=b"x" * 0x2000, memsz=0x1000), "more file bytes"),
    (make_elf(entry=1 << 33), "above 4 GiB"),
])
def test_bad_pvh_kernels(data, message):
    with pytest.raises(BootError, match=message):
        lx.parse_pvh_elf(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 300), st.integers(0, 255))
def test_corrupted_elf_only_raises_boot_error(offset, value):
    data = bytearray(make_elf())
    data[offset % len(data)] = value
    try:
        lx.parse_pvh_elf(bytes(data))
    except BootError:
        pass


def test_load_pvh_writes_start_info():
    mem = memory(64 * MiB)
    mem.write(0x1000000, b"\xaa" * 0x1000)            # stale bytes where the bss goes
    k = lx.parse_pvh_elf(make_elf())
    boot = lx.load_pvh(mem, k, "pvh cmdline", b"module" * 10)
    assert boot.pvh and boot.entry == 0x1000200
    assert mem.read(0x1000000, 0x300) == b"\xf4" * 0x300
    assert mem.read(0x1000300, 0xD00) == bytes(0xD00)  # bss zeroed
    (magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries,
     _r) = lx.HVM_START_INFO.unpack(mem.read(boot.boot_params, 56))
    assert (magic, version, flags, nr_modules) == (0x336EC578, 1, 0, 1)
    assert mem.read(cmdline, 12) == b"pvh cmdline\0"
    assert rsdp == 0
    assert entries == len(boot.e820)
    table = [lx.HVM_MEMMAP_ENTRY.unpack(mem.read(memmap + 24 * i, 24))[:3]
             for i in range(entries)]
    assert table == [(e.addr, e.size, e.type) for e in boot.e820]
    paddr, size, mod_cmdline, _ = lx.HVM_MODLIST_ENTRY.unpack(mem.read(modlist, 32))
    assert (paddr, size, mod_cmdline) == (boot.initrd_addr, 60, 0)
    assert mem.read(paddr, 60) == b"module" * 10
    assert paddr >= k.end


def test_load_pvh_refuses_segments_outside_ram_or_in_low_memory():
    with pytest.raises(BootError, match="outside guest RAM"):
        lx.load_pvh(memory(8 * MiB), lx.parse_pvh_elf(make_elf(paddr=0x1000000)))
    with pytest.raises(BootError, match="below 1 MiB"):
        lx.load_pvh(memory(), lx.parse_pvh_elf(make_elf(paddr=0x8000, entry=0x8000)))
