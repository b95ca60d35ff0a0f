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
