"""PCI configuration space, BAR sizing and mapping, INTx swizzling, through ECAM registers."""

from __future__ import annotations

import pytest
from pci_driver import EcamDriver

from kemu.bus import Bus
from kemu.devices.base import IrqLine
from kemu.devices.pci import config as c
from kemu.devices.pci.config import Bar, BarKind, PciFunction
from kemu.devices.pci.host import PciHost, Window, swizzle
from kemu.errors import ConfigError

MEM32 = Window(False, 0x1000_0000, 0x1000_0000, 0x2EFF_0000)
MEM64 = Window(False, 0x80_0000_0000, 0x80_0000_0000, 0x80_0000_0000)
PIO = Window(True, 0, 0x3EFF_0000, 0x10000)


class Regs:
    """A BAR's registers: remembers writes, reads back offset + 1."""

    name = "regs"

    def __init__(self):
        self.writes = []

    def read(self, offset, size):
        return offset + 1

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))


def make(nlines=4):
    bus = Bus("mmio")
    lines = [IrqLine(name=f"intx{i}") for i in range(nlines)]
    host = PciHost(bus, [PIO, MEM32, MEM64], lines)
    return bus, host, lines, EcamDriver(host, bus)


def endpoint(name="ep", pin=1, **kw):
    regs = Regs()
    bars = kw.pop("bars", (Bar(0, 0x1000, BarKind.MEM32, regs),
                           Bar(2, 0x4000, BarKind.MEM64, regs, prefetchable=True),
                           Bar(4, 0x100, BarKind.IO, regs)))
    return PciFunction(name, 0x1234, 0x5678, 0x020000, revision=3, bars=bars,
                       interrupt_pin=pin, **kw), regs


def test_host_bridge_is_gpex_root_and_absent_devices_read_all_ones():
    _, _, _, ecam = make()
    assert ecam.devices() == [0]
    assert ecam.read(0, c.VENDOR_ID, 2) == 0x1B36
    assert ecam.read(0, c.DEVICE_ID, 2) == 0x0008
    assert ecam.read(0, c.REVISION_ID) >> 8 == 0x060000      # class: host bridge
    assert ecam.read(0, c.HEADER_TYPE, 1) == 0
    assert ecam.read(5, 0) == 0xFFFFFFFF
    assert ecam.read(0, 0, bus=1) == 0xFFFFFFFF
    assert ecam.read(0, 0, function=1) == 0xFFFFFFFF
    assert ecam.read(7, 0, 1) == 0xFF
    ecam.write(5, c.COMMAND, 2, 0xFFFF)                       # nobody there: ignored


def test_header_fields_and_read_only_registers():
    _, host, _, ecam = make()
    fn, _ = endpoint()
    dev = host.add(fn)
    assert dev == 1
    assert ecam.read(dev, 0) == 0x5678_1234
    assert ecam.read(dev, c.REVISION_ID) == 0x020000_03
    ecam.write(dev, c.VENDOR_ID, 4, 0)
    ecam.write(dev, c.REVISION_ID, 4, 0)
    assert ecam.read(dev, 0) == 0x5678_1234 and ecam.read(dev, c.REVISION_ID) == 0x020000_03
    assert ecam.read(dev, c.INTERRUPT_PIN, 1) == 1
    ecam.write(dev, c.INTERRUPT_LINE, 1, 0x2A)
    ecam.write(dev, c.INTERRUPT_PIN, 1, 3)
    assert ecam.read(dev, c.INTERRUPT_LINE, 2) == 0x012A
    ecam.write(dev, c.COMMAND, 2, 0xFFFF)
    assert ecam.read(dev, c.COMMAND, 2) == c.COMMAND_WRITABLE
    # Misaligned and odd-sized accesses do nothing and read all-ones.
    assert ecam.read(dev, 1, 2) == 0xFFFF
    ecam.write(dev, c.INTERRUPT_LINE + 1, 2, 0)
    assert ecam.read(dev, c.INTERRUPT_LINE, 1) == 0x2A


def test_bar_sizing_by_writing_all_ones():
    _, host, _, ecam = make()
    dev = host.add(endpoint()[0])
    assert ecam.size_bar(dev, 0) == (0x1000, 0)
    assert ecam.size_bar(dev, 2) == (0x4000, c.BAR_MEM_TYPE_64 | c.BAR_MEM_PREFETCH)
    assert ecam.size_bar(dev, 4) == (0x100, c.BAR_IO)
    assert ecam.size_bar(dev, 1) == (0, 0) and ecam.size_bar(dev, 5) == (0, 0)
    # The sizing left the BARs as they were (0).
    assert ecam.read(dev, c.BAR0) == 0
    assert ecam.read(dev, c.BAR0 + 8) == c.BAR_MEM_TYPE_64 | c.BAR_MEM_PREFETCH


def test_bars_are_mapped_only_while_decoding_and_follow_moves():
    bus, host, _, ecam = make()
    fn, regs = endpoint()
    dev = host.add(fn)
    ecam.set_bar(dev, 0, 0x1000_2000)
    ecam.set_bar(dev, 2, 0x80_0000_4000)
    ecam.set_bar(dev, 4, 0x100)
    assert host.bar_base(dev << 3, 0) is None
    assert bus.read(0x1000_2004, 4) == 0                     # not decoding yet
    ecam.enable(dev, c.COMMAND_MEMORY)
    assert bus.read(0x1000_2004, 4) == 5
    assert bus.read(0x80_0000_4008, 4) == 9
    assert host.bar_base(dev << 3, 4) is None                # I/O decoding still off
    ecam.enable(dev, c.COMMAND_IO)
    assert bus.read(0x3EFF_0100 + 2, 2) == 3                 # the PIO window
    bus.write(0x1000_2010, 4, 0xAB)
    assert regs.writes == [(0x10, 4, 0xAB)]
    ecam.set_bar(dev, 0, 0x2000_0000)                        # moved while decoding
    assert bus.read(0x1000_2004, 4) == 0 and bus.read(0x2000_0004, 4) == 5
    ecam.write(dev, c.COMMAND, 2, 0)
    assert bus.read(0x2000_0004, 4) == 0 and bus.read(0x80_0000_4008, 4) == 0


def test_bars_outside_windows_or_overlapping_stay_unmapped():
    bus, host, _, ecam = make()
    uart = Regs()
    bus.map(0x0900_0000, 0x1000, uart)
    a, b = host.add(endpoint("a")[0]), host.add(endpoint("b")[0])
    ecam.set_bar(a, 0, 0x0900_0000)                          # on the UART: not a PCI window
    ecam.set_bar(b, 0, 0x1000_0000)
    ecam.enable(a)
    ecam.enable(b)
    assert host.bar_base(a << 3, 0) is None and bus.read(0x0900_0000, 4) == 1
    ecam.set_bar(a, 0, 0x1000_0000)                          # on top of b's BAR
    assert host.bar_base(a << 3, 0) is None
    assert host.bar_base(b << 3, 0) == 0x1000_0000
    ecam.set_bar(b, 0, 0x1000_1000)                          # b moves away: a gets its place
    assert host.bar_base(a << 3, 0) == 0x1000_0000
    assert host.bar_base(b << 3, 0) == 0x1000_1000
    ecam.set_bar(a, 2, 0x3EFF_C000)                          # straddles the window's end
    assert host.bar_base(a << 3, 2) is None


def test_capability_list():
    _, host, _, ecam = make()
    fn, _ = endpoint()
    first = fn.add_capability(0x09, b"\x05abc")
    second = fn.add_capability(0x05, bytes(8))
    dev = host.add(fn)
    assert ecam.read(dev, c.STATUS, 2) & c.STATUS_CAP_LIST
    assert ecam.capabilities(dev) == [first, second] == [0x40, 0x48]
    assert ecam.read(dev, first + 2, 2) == int.from_bytes(b"\x05a", "little")
    assert ecam.read(dev, first + 4, 2) == int.from_bytes(b"bc", "little")
    ecam.write(dev, first + 2, 2, 0)                         # read-only body
    assert ecam.read(dev, first + 3, 1) == ord("a")
    _, host2, _, ecam2 = make()
    assert not ecam2.read(0, c.STATUS, 2) & c.STATUS_CAP_LIST
    assert ecam2.capabilities(0) == []


def test_intx_swizzle_matches_virt_interrupt_map():
    # QEMU's virt: slot d, pin p (1-4) -> SPI 3 + (d + p - 1) % 4.
    assert [swizzle(d, 1) for d in range(5)] == [0, 1, 2, 3, 0]
    assert [swizzle(1, p) for p in range(1, 5)] == [1, 2, 3, 0]


def test_intx_routing_sharing_and_interrupt_disable():
    _, host, lines, ecam = make()
    f1, _ = endpoint("one", pin=1)
    f5, _ = endpoint("five", pin=1)
    f2, _ = endpoint("two", pin=2)
    host.add(f1, device=1)
    host.add(f5, device=5)                                   # shares line 1 with device 1
    host.add(f2, device=2)                                   # INTB of slot 2 -> line 3
    f1.set_intx(True)
    assert [l.level for l in lines] == [False, True, False, False]
    assert ecam.read(1, c.STATUS, 2) & c.STATUS_INTERRUPT
    f5.set_intx(True)
    f1.set_intx(False)
    assert lines[1].level                                    # still held by device 5
    assert not ecam.read(1, c.STATUS, 2) & c.STATUS_INTERRUPT
    f5.set_intx(False)
    assert not lines[1].level
    f2.set_intx(True)
    assert lines[3].level
    ecam.write(2, c.COMMAND, 2, c.COMMAND_INTX_DISABLE)
    assert not lines[3].level
    assert ecam.read(2, c.STATUS, 2) & c.STATUS_INTERRUPT    # pending, masked
    ecam.write(2, c.COMMAND, 2, 0)
    assert lines[3].level


def test_slots_and_reset():
    bus, host, _, ecam = make()
    with pytest.raises(ConfigError, match="in use"):
        host.add(endpoint()[0], device=0)
    with pytest.raises(ConfigError, match="out of range"):
        host.add(endpoint()[0], device=32)
    dev = host.add(endpoint()[0], device=3)
    ecam.set_bar(dev, 0, 0x1000_0000)
    ecam.enable(dev)
    assert bus.read(0x1000_0000, 4) == 1
    host.reset()
    assert ecam.read(dev, c.COMMAND, 2) == 0 and ecam.read(dev, c.BAR0) == 0
    assert bus.read(0x1000_0000, 4) == 0
    while len(host.functions) < 32:
        host.add(endpoint()[0])
    with pytest.raises(ConfigError, match="full"):
        host.free_slot()


def test_bar_specs_are_checked():
    with pytest.raises(ValueError):
        Bar(0, 0x1800, BarKind.MEM32, Regs())
    with pytest.raises(ValueError):
        Bar(5, 0x1000, BarKind.MEM64, Regs())
