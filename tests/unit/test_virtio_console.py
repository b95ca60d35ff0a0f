"""virtio-console (VIRTIO 1.2 section 5.3) through virtio-mmio and the test driver."""

from virtio_driver import VirtioMmioDriver, make_memory

from kemu.backends.serial import SerialBackend
from kemu.devices.base import IrqLine
from kemu.devices.virtio import console as c
from kemu.devices.virtio.console import VirtioConsole
from kemu.devices.virtio.mmio import VirtioMmioTransport


def make(init=True):
    mem = make_memory()
    out = []
    backend = SerialBackend(out.append)
    dev = VirtioConsole(backend)
    irq = IrqLine()
    t = VirtioMmioTransport(dev, mem, irq)
    drv = VirtioMmioDriver(t, mem)
    qs = drv.init(2) if init else None
    return mem, out, backend, dev, irq, t, drv, qs


def test_identity_and_config():
    _mem, _out, _b, _dev, _irq, _t, drv, _qs = make()
    assert drv.r32(0x008) == 3
    assert drv.device_features() & 0xFFFFFF == 1 << c.VIRTIO_CONSOLE_F_EMERG_WRITE
    assert drv.config(4, 4) == 1            # max_nr_ports


def test_transmit_reaches_backend():
    _mem, out, _b, _dev, irq, _t, drv, (_rx, tx) = make()
    head = tx.add([drv.buffer(b"hello "), drv.buffer(b"hvc0\n")])
    assert tx.get_used() == [(head, 0)]
    assert b"".join(out) == b"hello hvc0\n" and irq.level


def test_large_transmit_in_pieces():
    _mem, out, _b, _dev, _irq, _t, drv, (_rx, tx) = make()
    data = bytes(range(256)) * 1024
    tx.add([drv.buffer(data)])
    assert b"".join(out) == data and all(len(p) <= c.TX_PIECE for p in out)


def test_emergency_write():
    _mem, out, _b, _dev, _irq, t, _drv, _qs = make(init=False)
    t.write(0x100 + c.EMERG_WR_OFFSET, 4, ord("!"))
    assert out == [b"!"]


def test_input_waits_for_buffers_and_is_split_across_them():
    mem, _out, backend, _dev, irq, _t, drv, (rx, _tx) = make()
    backend.send(b"typed-before-buffers")
    assert backend.pending == 20
    a, b = drv.buffer(8, writable=True), drv.buffer(64, writable=True)
    rx.add([a], kick=False)
    rx.add([b])
    used = rx.get_used()
    assert used == [(0, 8), (1, 12)]
    assert mem.read(a.addr, 8) + mem.read(b.addr, 12) == b"typed-before-buffers"
    assert backend.pending == 0 and irq.level


def test_input_before_driver_ok_is_kept():
    _mem, _out, backend, _dev, _irq, _t, _drv, _qs = make(init=False)
    backend.send(b"early")
    assert backend.pending == 5


def test_bad_rx_ring_is_device_error_not_crash():
    mem, _out, backend, _dev, _irq, t, drv, (rx, tx) = make()
    rx.write_desc(0, 0x10, 8, 2, 0)          # outside RAM
    rx.publish(0)
    backend.send(b"x")
    assert t.needs_reset and mem.violations == []
    tx.write_desc(0, 0x10, 8, 0, 0)
    tx.publish(0)
    tx.kick()                                # ignored: the device needs a reset
    drv.init(2)
    assert not t.needs_reset
