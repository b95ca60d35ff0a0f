"""virtio-mmio version 1, the legacy interface (VIRTIO 1.2 section 4.2.4),
driven through its registers by the guest-side test driver."""

import struct

import pytest
from virtio_driver import PAGE, VirtioMmioDriver, make_memory

from kemu.devices.base import IrqLine
from kemu.devices.virtio import (
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
)
from kemu.devices.virtio import mmio as r
from kemu.devices.virtio.mmio import VirtioMmioTransport
from kemu.devices.virtio.rng import VirtioRng

GUEST_PAGE_SIZE, QUEUE_ALIGN, QUEUE_PFN = 0x028, 0x03C, 0x040


def make(legacy=True):
    mem = make_memory()
    irq = IrqLine()
    t = VirtioMmioTransport(VirtioRng(lambda n: bytes(range(n))), mem, irq, legacy=legacy)
    return mem, irq, t, VirtioMmioDriver(t, mem, legacy=legacy)


@pytest.mark.parametrize("align", [PAGE, 64])
def test_legacy_round_trip_through_queue_pfn(align):
    mem, irq, t, drv = make()
    assert t.read(r.VERSION, 4) == 1
    assert drv.negotiate()
    q = drv.setup_legacy_queue(0, size=8, align=align)
    drv.driver_ok()
    assert drv.status & STATUS_DRIVER_OK and not drv.status & STATUS_FEATURES_OK
    assert not drv.status & STATUS_DEVICE_NEEDS_RESET, t.error
    drv.w32(r.QUEUE_SEL, 0)
    assert drv.r32(QUEUE_PFN) == q.desc // PAGE
    # The device found the rings at QueuePFN * GuestPageSize, the used ring QueueAlign-aligned.
    assert q.used == q.desc + ((16 * 8 + 6 + 2 * 8 + align - 1) & ~(align - 1))
    buf = drv.buffer(16, writable=True)
    head = q.add([buf])
    assert q.get_used() == [(head, 16)]
    assert mem.read(buf.addr, 16) == bytes(range(16))
    assert irq.level and drv.ack() == 1 and not irq.level


def test_guest_page_size_survives_the_drivers_reset():
    """Linux's virtio_mmio writes GuestPageSize at probe, then the virtio core resets."""
    _mem, _irq, t, drv = make()
    drv.w32(GUEST_PAGE_SIZE, PAGE)
    drv.w32(r.STATUS, 0)
    drv.w32(r.STATUS, 1)
    drv.w32(r.STATUS, 3)
    drv.w32(r.DRIVER_FEATURES, 0)
    q = drv.setup_legacy_queue(0)
    drv.driver_ok()
    assert not drv.status & STATUS_DEVICE_NEEDS_RESET, t.error
    assert t.queues[0].desc_addr == q.desc


def test_legacy_features_are_32_bits_without_version_1():
    _mem, _irq, t, drv = make()
    drv.w32(r.DEVICE_FEATURES_SEL, 1)
    assert drv.r32(r.DEVICE_FEATURES) == 0
    drv.w32(r.DEVICE_FEATURES_SEL, 0)
    low = drv.r32(r.DEVICE_FEATURES)
    assert low & (1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX)
    drv.init()
    assert t.device.session.features == low
    assert t.queues[0].event_idx


def test_queue_pfn_zero_stops_the_queue_and_reset_clears_it():
    _mem, _irq, t, drv = make()
    drv.init()
    drv.w32(r.QUEUE_SEL, 0)
    drv.w32(QUEUE_PFN, 0)
    assert not t.queues[0].ready and drv.r32(QUEUE_PFN) == 0
    drv.init()
    drv.w32(r.STATUS, 0)
    assert drv.r32(QUEUE_PFN) == 0 and not t.queues[0].ready


@pytest.mark.parametrize("reg,value", [(GUEST_PAGE_SIZE, 3000), (QUEUE_ALIGN, 0)])
def test_bad_page_size_or_align_is_a_device_error(reg, value):
    _mem, _irq, t, drv = make()
    drv.negotiate()
    drv.w32(reg, value)
    assert drv.status & STATUS_DEVICE_NEEDS_RESET


def test_ring_outside_ram_is_a_device_error():
    _mem, _irq, t, drv = make()
    drv.negotiate()
    drv.w32(r.QUEUE_NUM, 8)
    drv.w32(QUEUE_PFN, 0xFFFFF)
    assert drv.status & STATUS_DEVICE_NEEDS_RESET and "outside guest RAM" in t.error


def test_modern_only_device_types_stay_on_version_2():
    from kemu.devices.virtio.input import power_button
    t = VirtioMmioTransport(power_button(), make_memory(), IrqLine(), legacy=True)
    assert t.read(r.VERSION, 4) == 2
    empty = VirtioMmioTransport(None, make_memory(), IrqLine(), legacy=True)
    assert empty.read(r.VERSION, 4) == 1


def test_save_restore_keeps_the_legacy_registers():
    _mem, _irq, t, drv = make()
    q = drv.init()[0]
    state = t.save()
    t2 = VirtioMmioTransport(VirtioRng(lambda n: b"\1" * n), t.memory, IrqLine(), legacy=True)
    t2.restore(state)
    assert t2.read(QUEUE_PFN, 4) == q.desc // PAGE and t2.queues[0].ready
    assert struct.pack("<I", t2.guest_page_size) == struct.pack("<I", PAGE)


@pytest.mark.parametrize("mrg,hdr_len", [(False, 10), (True, 12)])
def test_legacy_net_header_is_10_bytes_without_mrg_rxbuf(mrg, hdr_len):
    """5.1.6 legacy note: num_buffers is there only with VIRTIO_NET_F_MRG_RXBUF."""
    from test_virtio_net import FakeBackend
    from kemu.devices.virtio.net import VirtioNet, default_mac
    mem = make_memory(4 << 20)
    backend = FakeBackend()
    t = VirtioMmioTransport(VirtioNet(backend, default_mac(0), mrg_rxbuf=mrg), mem, IrqLine(),
                            legacy=True)
    drv = VirtioMmioDriver(t, mem, legacy=True)
    rx, tx = drv.init(2)
    frame = bytes(range(60))
    tx.add([drv.buffer(bytes(hdr_len) + frame)])
    assert backend.sent == [frame]
    buf = drv.buffer(2048, writable=True)
    head = rx.add([buf])
    backend.receive(frame)
    assert rx.get_used() == [(head, hdr_len + 60)]
    assert mem.read(buf.addr + hdr_len, 60) == frame


def test_virt_board_slots_are_legacy_unless_forced_off(tmp_path):
    from kemu.backends.serial import SerialBackend
    from kemu.machines.arm64_virt import VirtMachine
    from kemu.machines.config import DeviceConfig, MachineConfig
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\0" * 64)
    for globals_, version in (({}, 1), ({("virtio-mmio", "force-legacy"): "off"}, 2)):
        m = VirtMachine(MachineConfig(kernel=kernel, globals=globals_,
                                      devices=[DeviceConfig("virtio-rng-device")]),
                        SerialBackend(lambda b: None))
        versions = {s.device.device.name: s.device.read(r.VERSION, 4) for s in m.virtio_slots}
        assert versions["virtio-rng"] == version
        assert versions["virtio-power-button"] == 2     # virtio-input: modern only
