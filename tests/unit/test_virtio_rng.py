"""virtio-rng (VIRTIO 1.2 section 5.4) through virtio-mmio and the test driver."""

import itertools

from virtio_driver import VirtioMmioDriver, make_memory

from kemu.devices.base import IrqLine
from kemu.devices.virtio import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)
from kemu.devices.virtio.mmio import VirtioMmioTransport
from kemu.devices.virtio.rng import VirtioRng


def counter_source():
    counter = itertools.count()
    calls = []

    def source(n):
        calls.append(n)
        return bytes(next(counter) & 0xFF for _ in range(n))
    return source, calls


def make(source=None, **kw):
    mem = make_memory()
    if source is None:
        dev = VirtioRng(**kw)
    else:
        dev = VirtioRng(source, **kw)
    irq = IrqLine()
    t = VirtioMmioTransport(dev, mem, irq)
    drv = VirtioMmioDriver(t, mem)
    (q,) = drv.init()
    return mem, dev, irq, t, drv, q


def test_identity_and_features():
    _mem, _dev, _irq, _t, drv, _q = make()
    assert drv.r32(0x008) == 4
    assert drv.device_features() == (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC
                                     | 1 << VIRTIO_F_EVENT_IDX)
    assert drv.config(0, 4) == 0


def test_fills_buffer_from_source():
    source, calls = counter_source()
    mem, _dev, irq, _t, drv, q = make(source)
    buf = drv.buffer(64, writable=True)
    head = q.add([buf])
    assert q.get_used() == [(head, 64)]
    assert mem.read(buf.addr, 64) == bytes(range(64))
    assert calls == [64] and irq.level


def test_real_entropy_source():
    mem, _dev, _irq, _t, drv, q = make()
    bufs = [drv.buffer(16, writable=True), drv.buffer(16, writable=True)]
    q.add(bufs)
    assert q.get_used() == [(0, 32)]
    assert mem.read(bufs[0].addr, 16) + mem.read(bufs[1].addr, 16) != bytes(32)


def test_request_is_bounded():
    source, calls = counter_source()
    mem, _dev, _irq, _t, drv, q = make(source, max_bytes=100)
    buf = drv.buffer(4096, writable=True)
    q.add([buf])
    assert q.get_used() == [(0, 100)]
    assert calls == [100]
    assert mem.read(buf.addr + 100, 10) == bytes(10)


def test_readable_buffers_are_ignored():
    source, calls = counter_source()
    _mem, _dev, _irq, t, drv, q = make(source)
    q.add([drv.buffer(b"ignored")])
    assert q.get_used() == [(0, 0)]
    assert calls == [] and not t.needs_reset


def test_short_or_failing_source():
    _mem, _dev, _irq, t, drv, q = make(lambda n: b"ab")
    q.add([drv.buffer(8, writable=True)])
    assert q.get_used() == [(0, 2)]

    def broken(n):
        raise OSError("no entropy")
    _mem, _dev, _irq, t, drv, q = make(broken)
    q.add([drv.buffer(8, writable=True)])
    assert q.get_used() == [(0, 0)] and not t.needs_reset


def test_oversized_source_output_is_truncated():
    mem, _dev, _irq, _t, drv, q = make(lambda n: b"x" * (n + 50))
    buf = drv.buffer(8, writable=True)
    after = drv.buffer(8)
    q.add([buf])
    assert q.get_used() == [(0, 8)]
    assert mem.read(after.addr, 8) == bytes(8)


def test_many_requests_and_bad_chain():
    mem, _dev, _irq, t, drv, q = make()
    for _ in range(3):
        q.add([drv.buffer(8, writable=True)], kick=False)
    q.kick()
    assert len(q.get_used()) == 3
    q.write_desc(0, 0x10, 8, 2, 0)   # outside RAM
    q.publish(0)
    q.kick()
    assert t.needs_reset and mem.violations == []
