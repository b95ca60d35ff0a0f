import struct

import pytest

from kemu.errors import ConfigError, MemoryAccessError
from kemu.memory import GuestMemory, RamRegion


def make() -> GuestMemory:
    return GuestMemory([RamRegion(0x40000000, 0x10000)])


def test_read_write_roundtrip():
    mem = make()
    mem.write(0x40000010, b"hello")
    assert mem.read(0x40000010, 5) == b"hello"
    mem.write_int(0x40000100, 4, 0xDEADBEEF)
    assert mem.read_int(0x40000100, 4) == 0xDEADBEEF
    assert mem.read(0x40000100, 4) == b"\xef\xbe\xad\xde"
    fmt = struct.Struct("<QI")
    mem.write_obj(0x40000200, fmt, 7, 9)
    assert mem.read_obj(0x40000200, fmt) == (7, 9)


@pytest.mark.parametrize("addr,size", [
    (0x3FFFFFFF, 2),            # straddles the start
    (0x4000FFFF, 2),            # straddles the end
    (0x40010000, 1),            # just past the end
    (0, 4),                     # nowhere near
    (0x40000000, 0x10001),      # too long
    (2**64 - 1, 8),             # wraps
])
def test_out_of_bounds_is_refused(addr, size):
    mem = make()
    with pytest.raises(MemoryAccessError):
        mem.read(addr, size)
    with pytest.raises(MemoryAccessError):
        mem.write(addr, b"\0" * size)
    assert not mem.contains(addr, size)


def test_negative_size_refused():
    with pytest.raises(MemoryAccessError):
        make().read(0x40000000, -1)


def test_view_writes_through():
    mem = make()
    view = mem.view(0x40000020, 4)
    view[:] = b"abcd"
    assert mem.read(0x40000020, 4) == b"abcd"


def test_overlapping_regions_refused():
    mem = make()
    with pytest.raises(ConfigError):
        mem.add(RamRegion(0x4000F000, 0x2000))


def test_unaligned_region_refused():
    with pytest.raises(ConfigError):
        RamRegion(0x40000001, 0x1000)


def test_host_address_is_the_mapping():
    import ctypes
    mem = make()
    mem.write(0x40000000, b"xyz")
    region = mem.regions[0]
    assert ctypes.string_at(region.host_address, 3) == b"xyz"


def test_ram_offsets_are_the_regions_end_to_end():
    """QEMU's ram_addr space: RAM offset 0 is the first region's base, the second
    region follows the first's last byte whatever the hole between them."""
    mem = GuestMemory([RamRegion(0x100000000, 0x3000), RamRegion(0, 0x2000)])
    assert mem.ram_layout() == [[0, 0x2000], [0x100000000, 0x3000]]
    assert [(o, r.base) for o, r in mem.ram_spans()] == [(0, 0), (0x2000, 0x100000000)]
    assert mem.ram_to_gpa(0x1fff) == 0x1fff and mem.ram_to_gpa(0x2000) == 0x100000000
    assert mem.gpa_to_ram(0x100002fff) == 0x4fff
    for bad in (0x2000, 0xfffff000, 0x100003000):
        with pytest.raises(MemoryAccessError):
            mem.gpa_to_ram(bad)
    with pytest.raises(MemoryAccessError):
        mem.ram_to_gpa(0x5000)
    # a range across the hole: read, write, zero test, views
    assert mem.ram_is_zero(0, 0x5000)
    mem.ram_write(0x1ffe, b"abcd")
    assert mem.read(0x1ffe, 2) == b"ab" and mem.read(0x100000000, 2) == b"cd"
    assert mem.ram_read(0x1ffe, 4) == b"abcd"
    assert not mem.ram_is_zero(0x1000, 0x2000) and mem.ram_is_zero(0x2002, 0x2ffe)
    assert [(pos, len(v)) for pos, v in mem.ram_views(0x1000, 0x2000)] == \
        [(0, 0x1000), (0x1000, 0x1000)]
    for off, size in ((0x4fff, 2), (-1, 1), (0, 0x5001)):
        with pytest.raises(MemoryAccessError):
            mem.ram_read(off, size)


def test_restored_regions_map_a_file_each_from_its_offset(tmp_path):
    """ram_regions(backing=fd): a snapshot's memory file (the regions end to end)
    mapped private per region; writes stay in this process."""
    import os

    from kemu.machines.config import MachineConfig
    from kemu.options.objects import ram_regions
    path = tmp_path / "memory.ram"
    path.write_bytes(b"A" * 0x2000 + b"B" * 0x3000)
    fd = os.open(path, os.O_RDONLY)
    try:
        mem = GuestMemory(ram_regions(MachineConfig(), [(0, 0x2000), (0x100000000, 0x3000)],
                                      backing=fd))
    finally:
        os.close(fd)
    assert mem.read(0x1fff, 1) == b"A" and mem.read(0x100000000, 1) == b"B"
    mem.write(0x100000000, b"x")
    assert path.read_bytes()[0x2000:0x2001] == b"B"
    mem.close()


def test_holes_of_a_restored_machines_memory_file_are_zero_until_written(tmp_path):
    """A page mapped from a hole of the snapshot's file is known zero (nothing read)
    until the guest writes it; then it is looked at."""
    import os

    from kemu.machines.config import MachineConfig
    from kemu.options.objects import ram_regions
    path = tmp_path / "memory.ram"
    with open(path, "wb") as f:
        f.write(b"A" * 0x2000)
        f.truncate(0x2000 + (4 << 20))                 # a 4 MiB hole after the data
    fd = os.open(path, os.O_RDONLY)
    try:
        mem = GuestMemory(ram_regions(MachineConfig(), [(0, 0x2000), (0x100000000, 4 << 20)],
                                      backing=fd))
    finally:
        os.close(fd)
    low, high = mem.regions
    assert not low.known_zero(0, 0x2000) and not mem.ram_is_zero(0, 0x2000)
    assert high.known_zero(0, 4 << 20) and mem.ram_is_zero(0x2000, 4 << 20)
    assert mem.read(0x100001000, 4) == bytes(4)       # read: still the file's page
    assert high.known_zero(0, 4 << 20)
    mem.write(0x100002000, b"\1")
    assert not high.known_zero(0, 4 << 20) and high.known_zero(0x3000, (4 << 20) - 0x3000)
    assert not mem.ram_is_zero(0x2000, 4 << 20)
    mem.write(0x100002000, b"\0")                    # a private copy, zero again
    assert not high.known_zero(0x2000, 0x1000) and mem.ram_is_zero(0x2000, 4 << 20)
    mem.close()


def test_ram_is_zero_sees_every_byte_touched_or_not():
    """Untouched pages are zeros without being read; a page written and a page
    written then cleared are looked at (memcmp)."""
    mem = GuestMemory([RamRegion(0, 16 << 20)])
    region = mem.regions[0]
    assert region.known_zero(0, region.size)
    assert mem.ram_is_zero(0, 16 << 20)
    mem.write((9 << 20) + 4095, b"\1")
    # (RAM asks for huge pages: the write may bring in the 2 MiB around it, zeros)
    assert not region.known_zero(0, region.size) and region.known_zero(0, 4 << 20)
    assert not mem.ram_is_zero(8 << 20, 2 << 20) and not mem.ram_is_zero(9 << 20, 4096)
    assert mem.ram_is_zero(0, 9 << 20) and mem.ram_is_zero((9 << 20) + 4096, 1 << 20)
    mem.write((9 << 20) + 4095, b"\0")
    assert mem.ram_is_zero(0, 16 << 20)
