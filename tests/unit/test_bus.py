import pytest

from kemu.accel.base import IoIn, IoOut, MmioRead, MmioWrite, dispatch
from kemu.bus import Bus, DecodeError
from kemu.errors import BusError


class Recorder:
    def __init__(self, name="dev"):
        self.name = name
        self.log = []

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return 0x1000 + offset

    def write(self, offset, size, value):
        self.log.append(("w", offset, size, value))


def test_dispatch_uses_offsets_within_the_device():
    bus = Bus("mmio")
    dev = Recorder()
    bus.map(0x9000000, 0x1000, dev)
    assert dispatch(MmioRead(0x9000018, 4), bus) == 0x1018
    dispatch(MmioWrite(0x9000000, 1, 0x41), bus)
    assert dev.log == [("r", 0x18, 4), ("w", 0, 1, 0x41)]


def test_port_io_dispatch():
    mmio, pio = Bus("mmio"), Bus("pio", limit=0x10000)
    dev = Recorder()
    pio.map(0x3F8, 8, dev)
    assert dispatch(IoIn(0x3FD, 1), mmio, pio) == 0x1005
    dispatch(IoOut(0x3F8, 1, 0x55), mmio, pio)
    assert dev.log[-1] == ("w", 0, 1, 0x55)
    with pytest.raises(TypeError):
        dispatch(IoIn(0x3F8, 1), mmio)


@pytest.mark.parametrize("base,size", [(0x0FFF, 2), (0x1FFF, 1), (0x1800, 0x100), (0x0, 0x3000)])
def test_overlaps_refused(base, size):
    bus = Bus("mmio")
    bus.map(0x1000, 0x1000, Recorder("a"))
    with pytest.raises(BusError):
        bus.map(base, size, Recorder("b"))


def test_adjacent_ranges_allowed_and_found():
    bus = Bus("mmio")
    a, b = Recorder("a"), Recorder("b")
    bus.map(0x2000, 0x1000, b)
    bus.map(0x1000, 0x1000, a)
    assert bus.find(0x1FFF).device is a
    assert bus.find(0x2000).device is b
    assert bus.find(0x3000) is None


def test_unassigned_reads_zero_and_writes_are_dropped():
    bus = Bus("mmio")
    dev = Recorder()
    bus.map(0x1000, 0x10, dev)
    assert bus.read(0x5000, 4) == 0
    bus.write(0x5000, 4, 1)
    assert bus.read(0x100E, 4) == 0     # straddles the end of the device
    assert bus.unassigned == 3
    assert dev.log == []


def test_a_bus_with_decode_errors_reports_what_nothing_decodes():
    bus = Bus("mmio", decode_errors=True)
    dev = Recorder()
    bus.map(0x1000, 0x10, dev)
    for access in (lambda: bus.read(0x5000, 4), lambda: bus.write(0x5000, 4, 1),
                   lambda: bus.read(0x100E, 4)):
        with pytest.raises(DecodeError, match="mmio: nothing at"):
            access()
    assert bus.unassigned == 3
    assert dev.log == []
    bus.write(0x1000, 4, 7)                 # a device still answers
    assert dev.log


def test_bad_ranges_refused():
    bus = Bus("pio", limit=0x10000)
    with pytest.raises(BusError):
        bus.map(0xFFFF, 2, Recorder())
    with pytest.raises(BusError):
        bus.map(0x10, 0, Recorder())
