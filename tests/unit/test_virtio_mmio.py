"""virtio-mmio transport, version 2 (VIRTIO 1.2 section 4.2)."""

import pytest
from virtio_driver import RAM_BASE, VirtioMmioDriver, make_memory

from kemu.devices.base import Device, IrqLine
from kemu.devices.virtio import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
    VirtioError,
)
from kemu.devices.virtio import mmio as r
from kemu.devices.virtio.mmio import VirtioMmioTransport

DEVICE_BITS = (1 << 0) | (1 << 5)


class Dummy(VirtioDevice):
    """Two queues, a small configuration space, records every call."""

    device_id = 0x2A
    name = "dummy"

    def __init__(self, executor=None):
        super().__init__([16, 4], executor)
        self.config = bytearray(range(1, 13))
        self.calls = []
        self.refuse = False
        self.fail_activate = False

    def device_features(self):
        return DEVICE_BITS

    def check_features(self, features):
        return not self.refuse

    def config_space(self):
        return bytes(self.config)

    def config_write(self, offset, data):
        self.config[offset:offset + len(data)] = data

    def activate(self, session):
        super().activate(session)
        self.calls.append(("activate", session.features))
        if self.fail_activate:
            raise VirtioError("cannot activate")

    def queue_notify(self, index, queue):
        self.calls.append(("notify", index))
        while (chain := queue.pop()) is not None:
            queue.push(chain, 0)
            self.session.signal_used(index)

    def reset(self):
        super().reset()
        self.calls.append(("reset",))


def make(device=None):
    mem = make_memory()
    irq = IrqLine()
    dev = Dummy() if device is None else device
    t = VirtioMmioTransport(dev, mem, irq)
    return mem, irq, dev, t, VirtioMmioDriver(t, mem)


def test_identification_registers():
    _mem, _irq, _dev, t, drv = make()
    assert isinstance(t, Device)
    assert drv.r32(r.MAGIC_VALUE) == 0x74726976
    assert drv.r32(r.VERSION) == 2
    assert drv.r32(r.DEVICE_ID) == 0x2A
    assert drv.r32(r.VENDOR_ID).to_bytes(4, "little") == b"KEMU"
    assert t.name == "virtio-mmio-dummy"


def test_empty_slot_reads_device_id_zero_and_ignores_writes():
    mem = make_memory()
    irq = IrqLine()
    t = VirtioMmioTransport(None, mem, irq)
    assert t.name == "virtio-mmio-empty"
    assert t.read(r.MAGIC_VALUE, 4) == r.MAGIC
    assert t.read(r.VERSION, 4) == 2
    assert t.read(r.DEVICE_ID, 4) == 0
    for off in (r.DEVICE_FEATURES, r.QUEUE_NUM_MAX, r.STATUS, r.INTERRUPT_STATUS, 0x100):
        assert t.read(off, 4) == 0
    for off in range(0, 0x200, 4):
        t.write(off, 4, 0xFFFFFFFF)
    assert t.read(r.STATUS, 4) == 0 and not irq.level


def test_feature_words():
    _mem, _irq, _dev, _t, drv = make()
    features = drv.device_features()
    assert features == (DEVICE_BITS | 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC
                        | 1 << VIRTIO_F_EVENT_IDX)
    drv.w32(r.DEVICE_FEATURES_SEL, 2)
    assert drv.r32(r.DEVICE_FEATURES) == 0


def test_negotiation_accepts_a_subset_with_version_1():
    _mem, _irq, _dev, t, drv = make()
    assert drv.negotiate(features=1 << VIRTIO_F_VERSION_1 | 1)
    assert t.driver_features == 1 << VIRTIO_F_VERSION_1 | 1
    assert drv.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
    # DriverFeatures is frozen once FEATURES_OK is set.
    drv.w32(r.DRIVER_FEATURES_SEL, 0)
    drv.w32(r.DRIVER_FEATURES, 0xFFFF)
    assert t.driver_features == 1 << VIRTIO_F_VERSION_1 | 1


@pytest.mark.parametrize("features", [
    1 << VIRTIO_F_VERSION_1 | 1 << 3,        # a device bit not offered
    1 << VIRTIO_F_VERSION_1 | 1 << 40,       # a transport bit not offered
    DEVICE_BITS,                              # no VERSION_1: legacy driver
])
def test_negotiation_refuses_bad_feature_sets(features):
    _mem, _irq, _dev, t, drv = make()
    assert not drv.negotiate(features=features)
    assert not drv.status & STATUS_FEATURES_OK
    assert not t.needs_reset


def test_device_may_refuse_features():
    _mem, _irq, dev, _t, drv = make()
    dev.refuse = True
    assert not drv.negotiate()


def test_driver_ok_activates_with_negotiated_features():
    mem, _irq, dev, _t, drv = make()
    drv.init(nqueues=2)
    assert dev.calls[-1] == ("activate", drv.device_features())
    assert drv.status & STATUS_DRIVER_OK
    assert dev.session.active and dev.session.memory is mem
    assert len(dev.session.queues) == 2


def test_failing_activation_is_a_device_error():
    _mem, irq, dev, t, drv = make()
    dev.fail_activate = True
    drv.init()
    assert t.needs_reset and irq.level


def test_legacy_driver_is_refused():
    """A version 1 driver writes GuestPageSize and QueuePFN and never sets FEATURES_OK."""
    _mem, _irq, _dev, t, drv = make()
    drv.w32(r.STATUS, 0)
    drv.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    drv.w32(r.LEGACY_GUEST_PAGE_SIZE, 4096)
    assert t.needs_reset and "legacy" in t.error
    drv.w32(r.STATUS, 0)
    drv.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    drv.w32(r.QUEUE_SEL, 0)
    drv.w32(r.LEGACY_QUEUE_PFN, (RAM_BASE + 0x1000) >> 12)
    assert t.needs_reset
    assert drv.r32(r.LEGACY_QUEUE_PFN) == 0


def test_driver_ok_without_features_ok_is_refused():
    _mem, _irq, dev, _t, drv = make()
    drv.w32(r.STATUS, 0)
    drv.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    drv.set_status(STATUS_DRIVER_OK)
    assert not drv.status & STATUS_DRIVER_OK
    assert drv.status & STATUS_DEVICE_NEEDS_RESET
    assert not any(c[0] == "activate" for c in dev.calls)


def test_queue_registers():
    _mem, _irq, _dev, t, drv = make()
    assert drv.negotiate()
    drv.w32(r.QUEUE_SEL, 0)
    assert drv.r32(r.QUEUE_NUM_MAX) == 16
    drv.w32(r.QUEUE_SEL, 1)
    assert drv.r32(r.QUEUE_NUM_MAX) == 4
    drv.w32(r.QUEUE_SEL, 2)
    assert drv.r32(r.QUEUE_NUM_MAX) == 0 and drv.r32(r.QUEUE_READY) == 0
    drv.w32(r.QUEUE_READY, 1)   # no such queue: ignored
    q = drv.setup_queue(0, 8)
    vq = t.queues[0]
    assert vq.ready and vq.size == 8
    assert (vq.desc_addr, vq.driver_addr, vq.device_addr) == (q.desc, q.avail, q.used)
    # Writes to a live queue's configuration are ignored (4.2.2.2).
    drv.w32(r.QUEUE_SEL, 0)
    drv.w32(r.QUEUE_NUM, 2)
    drv.w32(r.QUEUE_DESC_LOW, 0)
    assert vq.size == 8 and vq.desc_addr == q.desc
    drv.w32(r.QUEUE_READY, 0)
    assert drv.r32(r.QUEUE_READY) == 0 and not vq.ready


def test_64_bit_queue_addresses():
    _mem, _irq, _dev, t, drv = make()
    drv.w32(r.QUEUE_SEL, 0)
    drv.w32(r.QUEUE_DEVICE_LOW, 0x89ABCDEF)
    drv.w32(r.QUEUE_DEVICE_HIGH, 0x01234567)
    assert t.queues[0].device_addr == 0x0123456789ABCDEF


def test_notify_before_driver_ok_is_ignored():
    _mem, _irq, dev, _t, drv = make()
    assert drv.negotiate()
    q = drv.setup_queue(0)
    q.add([drv.buffer(4)])
    assert ("notify", 0) not in dev.calls
    drv.driver_ok()
    q.kick()
    assert ("notify", 0) in dev.calls and len(q.get_used()) == 1


def test_notify_for_missing_or_disabled_queue_is_ignored():
    _mem, _irq, dev, t, drv = make()
    drv.init(nqueues=1)
    drv.w32(r.QUEUE_NOTIFY, 1)
    drv.w32(r.QUEUE_NOTIFY, 7)
    assert not any(c[0] == "notify" for c in dev.calls)
    assert not t.needs_reset


def test_interrupt_is_level_while_status_is_nonzero():
    _mem, irq, _dev, t, drv = make()
    (q,) = drv.init()
    levels = []
    irq.connect(levels.append)
    q.add([drv.buffer(4)])
    assert irq.level and drv.interrupt_status() == r.VIRTIO_MMIO_INT_VRING
    t.config_changed()
    assert drv.interrupt_status() == 3
    drv.ack(r.VIRTIO_MMIO_INT_VRING)
    assert irq.level and drv.interrupt_status() == r.VIRTIO_MMIO_INT_CONFIG
    drv.ack(r.VIRTIO_MMIO_INT_CONFIG)
    assert not irq.level
    assert levels == [True, False]


def test_config_space_access():
    _mem, _irq, dev, t, drv = make()
    assert drv.config(0, 1) == 1
    assert drv.config(1, 2) == 0x0302
    assert drv.config(4, 4) == 0x08070605
    assert drv.config(4, 8) == 0x0C0B0A0908070605
    assert drv.config(11, 1) == 12
    assert drv.config(11, 2) == 0        # runs off the end
    assert drv.config(100, 4) == 0
    t.write(r.CONFIG + 2, 2, 0xBEEF)
    assert dev.config[2:4] == b"\xef\xbe"
    t.write(r.CONFIG + 11, 4, 0xFFFFFFFF)  # off the end: ignored
    assert dev.config[11] == 12


def test_config_generation_and_change_notification():
    _mem, irq, dev, t, drv = make()
    gen = drv.r32(r.CONFIG_GENERATION)
    t.config_changed()                  # before DRIVER_OK: no interrupt
    assert drv.r32(r.CONFIG_GENERATION) == gen + 1 and not irq.level
    drv.init()
    dev.session.signal_config()
    assert drv.r32(r.CONFIG_GENERATION) == gen + 2
    assert drv.interrupt_status() == r.VIRTIO_MMIO_INT_CONFIG and irq.level


def test_bad_register_access_width_is_ignored():
    _mem, _irq, _dev, t, drv = make()
    assert t.read(r.MAGIC_VALUE, 2) == 0
    assert t.read(r.MAGIC_VALUE + 1, 4) == 0
    t.write(r.STATUS, 1, STATUS_ACKNOWLEDGE)
    assert drv.status == 0
    assert t.bad_accesses == 3


def test_shared_memory_registers_report_no_regions():
    _mem, _irq, _dev, _t, drv = make()
    drv.w32(r.SHM_SEL, 0)
    for off in (r.SHM_LEN_LOW, r.SHM_LEN_HIGH, r.SHM_BASE_LOW, r.SHM_BASE_HIGH):
        assert drv.r32(off) == 0xFFFFFFFF
    assert drv.r32(r.QUEUE_RESET) == 0


def test_status_write_zero_resets_everything():
    _mem, irq, dev, t, drv = make()
    (q,) = drv.init()
    q.add([drv.buffer(4)])
    session = dev.session
    assert irq.level
    drv.w32(r.STATUS, 0)
    assert drv.status == 0 and drv.interrupt_status() == 0 and not irq.level
    assert not t.queues[0].ready and t.driver_features == 0
    assert ("reset",) in dev.calls and dev.session is None and not session.active
    # A stale session does nothing.
    session.signal_used(0)
    session.device_error("late")
    assert not irq.level and not t.needs_reset


def test_device_error_stops_processing_until_reset():
    _mem, _irq, dev, t, drv = make()
    (q,) = drv.init()
    dev.session.device_error("broken")
    assert drv.status & STATUS_DEVICE_NEEDS_RESET and t.error == "broken"
    assert drv.interrupt_status() == r.VIRTIO_MMIO_INT_CONFIG
    calls = len(dev.calls)
    q.add([drv.buffer(4)])
    assert len(dev.calls) == calls
    # The driver's read-modify-write of Status keeps NEEDS_RESET.
    drv.set_status(STATUS_FEATURES_OK)
    assert drv.status & STATUS_DEVICE_NEEDS_RESET
    (q,) = drv.init()
    assert not t.needs_reset and t.error is None
    q.add([drv.buffer(4)])
    assert len(q.get_used()) == 1


def test_device_error_before_driver_ok_sends_no_interrupt():
    _mem, irq, _dev, t, drv = make()
    drv.negotiate()
    t.device_error("early")
    assert t.needs_reset and not irq.level


def test_save_restore_roundtrip():
    mem, _irq, _dev, t, drv = make()
    (q,) = drv.init()
    q.add([drv.buffer(4)])
    state = t.save()
    irq2 = IrqLine()
    dev2 = Dummy()
    t2 = VirtioMmioTransport(dev2, mem, irq2)
    t2.restore(state)
    assert irq2.level and t2.status == t.status and dev2.session is not None
    drv.t = t2
    drv.ack()
    q.add([drv.buffer(4)])
    assert [u[0] for u in q.get_used()] == [0, 1]
    assert not t2.needs_reset
