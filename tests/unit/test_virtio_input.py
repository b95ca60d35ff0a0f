"""virtio-input (VIRTIO 1.2 section 5.8) and the power button, through virtio-mmio."""

import struct

import pytest
from virtio_driver import VirtioMmioDriver, make_memory

from kemu.devices.base import IrqLine
from kemu.devices.virtio import STATUS_DEVICE_NEEDS_RESET
from kemu.devices.virtio import mmio as r
from kemu.devices.virtio.input import (
    CFG_ABS_INFO,
    CFG_EV_BITS,
    CFG_ID_DEVIDS,
    CFG_ID_NAME,
    CFG_ID_SERIAL,
    CFG_PROP_BITS,
    EV_KEY,
    EV_SYN,
    KEY_POWER,
    MAX_PENDING,
    VIRTIO_ID_INPUT,
    InputEvent,
    PowerButton,
    VirtioInput,
)
from kemu.devices.virtio.mmio import VirtioMmioTransport


def make(dev=None, init=True):
    mem = make_memory()
    dev = dev or PowerButton()
    irq = IrqLine()
    t = VirtioMmioTransport(dev, mem, irq)
    drv = VirtioMmioDriver(t, mem)
    qs = drv.init(2) if init else None
    return mem, dev, irq, drv, qs


def select(drv, sel, sub=0) -> tuple[int, bytes]:
    """What Linux's virtinput_cfg_select does: write select/subsel, read size and data."""
    drv.t.write(r.CONFIG + 0, 1, sel)
    drv.t.write(r.CONFIG + 1, 1, sub)
    size = drv.config(2, 1)
    return size, bytes(drv.config(8 + i, 1) for i in range(size))


def post(drv, q, n=1):
    bufs = [drv.buffer(8, writable=True) for _ in range(n)]
    for b in bufs:
        q.add([b])
    return bufs


def events(mem, q, bufs):
    by_addr = {b.addr: b for b in bufs}
    out = []
    for head, length in q.get_used():
        assert length == 8
        addr = q.memory.read_int(q.desc + 16 * head, 8)
        out.append(struct.unpack("<HHI", mem.read(by_addr[addr].addr, 8)))
    return out


def test_identity_and_configuration_space():
    _mem, _dev, _irq, drv, _qs = make(init=False)
    assert drv.r32(r.DEVICE_ID) == VIRTIO_ID_INPUT
    assert select(drv, CFG_ID_NAME) == (17, b"kemu power button")
    assert select(drv, CFG_ID_SERIAL) == (10, b"kemu-power")
    size, ids = select(drv, CFG_ID_DEVIDS)
    assert size == 8 and struct.unpack("<HHHH", ids)[0] == 0x06      # BUS_VIRTUAL
    size, bits = select(drv, CFG_EV_BITS, EV_KEY)
    assert size == KEY_POWER // 8 + 1
    assert [i for i in range(8 * size) if bits[i >> 3] >> (i & 7) & 1] == [KEY_POWER]
    # Unsupported combinations have size 0 (5.8.5.1).
    for sel, sub in ((CFG_PROP_BITS, 0), (CFG_EV_BITS, 2), (CFG_ABS_INFO, 0),
                     (CFG_ID_NAME, 1), (0x7F, 0)):
        assert select(drv, sel, sub)[0] == 0, (sel, sub)
    # size and the union are read-only
    drv.t.write(r.CONFIG + 2, 1, 99)
    drv.t.write(r.CONFIG + 8, 4, 0xFFFFFFFF)
    assert select(drv, CFG_ID_NAME) == (17, b"kemu power button")


def test_two_queues_and_no_features():
    _mem, _dev, _irq, drv, qs = make()
    assert len(qs) == 2
    assert drv.device_features() & 0xFFFFFF == 0


def test_press_reports_key_down_and_up_with_syn():
    mem, dev, irq, drv, (evq, _stq) = make()
    bufs = post(drv, evq, 8)
    assert dev.push()
    assert irq.level
    assert events(mem, evq, bufs) == [(EV_KEY, KEY_POWER, 1), (EV_SYN, 0, 0),
                                      (EV_KEY, KEY_POWER, 0), (EV_SYN, 0, 0)]


def test_events_wait_for_buffers():
    mem, dev, irq, drv, (evq, _stq) = make()
    bufs = post(drv, evq, 1)
    assert dev.push()
    assert events(mem, evq, bufs) == [(EV_KEY, KEY_POWER, 1)]
    drv.ack()
    assert not irq.level
    evq.set_used_event(1)                  # EVENT_IDX: interrupt me after the next one
    more = post(drv, evq, 3)               # the kick delivers the rest
    assert events(mem, evq, more) == [(EV_SYN, 0, 0), (EV_KEY, KEY_POWER, 0), (EV_SYN, 0, 0)]
    assert irq.level


def test_pending_is_bounded_by_whole_batches():
    mem, dev, _irq, drv, (evq, _stq) = make()
    for _ in range(MAX_PENDING):
        dev.send([InputEvent(EV_KEY, KEY_POWER, 1)])
    assert dev.dropped == MAX_PENDING // 2
    bufs = post(drv, evq, 8)
    got = events(mem, evq, bufs)
    assert got[:2] == [(EV_KEY, KEY_POWER, 1), (EV_SYN, 0, 0)]


def test_nothing_sent_before_driver_ok():
    _mem, dev, irq, _drv, _qs = make(init=False)
    assert not dev.push()
    assert dev.dropped == 2 and not irq.level
    with pytest.raises(ValueError):
        dev.press(30)                      # not one of the device's keys


def test_status_queue_is_consumed():
    _mem, _dev, irq, drv, (_evq, stq) = make()
    head = stq.add([drv.buffer(struct.pack("<HHI", 0x11, 0, 1))])
    assert stq.get_used() == [(head, 0)]
    assert irq.level


def test_short_event_buffer_is_a_device_error():
    _mem, dev, _irq, drv, (evq, _stq) = make()
    evq.add([drv.buffer(4, writable=True)])
    dev.push()
    assert drv.status & STATUS_DEVICE_NEEDS_RESET


def test_reset_forgets_and_save_restore():
    _mem, dev, _irq, drv, (_evq, _stq) = make()
    dev.push()                             # no buffers: all four events wait
    state = dev.save()
    assert len(state.pending) == 4
    other = PowerButton()
    other.restore(state)
    assert other.save() == state
    drv.w32(r.STATUS, 0)                   # device reset (2.4)
    assert dev.save().pending == []


def test_generic_keys_bitmap():
    dev = VirtioInput([1, 2, 3, 30], device_name="kbd")
    dev.config_write(0, bytes([CFG_EV_BITS, EV_KEY]))
    space = dev.config_space()
    assert space[2] == 4 and space[8:12] == bytes([0b1110, 0, 0, 0b01000000])
    with pytest.raises(ValueError):
        VirtioInput([2000])


# -- keyboard, tablet and mouse (QEMU's virtio-*-device) ------------------------------------

from kemu.devices.virtio.input import ABS_X, ABS_Y, BTN_LEFT, EV_ABS, EV_REL, EV_REP, REL_WHEEL  # noqa: E402
from kemu.devices.virtio.input_hid import ABS_MAX, VirtioKeyboard, VirtioMouse, VirtioTablet  # noqa: E402
from kemu.display.console import DisplayConsole  # noqa: E402


def bits(data):
    return {i for i in range(8 * len(data)) if data[i >> 3] >> (i & 7) & 1}


def test_tablet_configuration_and_absolute_events():
    mem, dev, _irq, drv, (eventq, _statusq) = make(VirtioTablet())
    assert select(drv, CFG_ID_NAME)[1] == b"QEMU Virtio Tablet"
    assert bits(select(drv, CFG_EV_BITS, EV_ABS)[1]) == {ABS_X, ABS_Y}
    assert REL_WHEEL in bits(select(drv, CFG_EV_BITS, EV_REL)[1])
    size, info = select(drv, CFG_ABS_INFO, ABS_X)
    assert size == 20 and struct.unpack("<IIIII", info)[:2] == (0, ABS_MAX)
    bufs = post(drv, eventq, 8)
    assert dev.pointer(639, 0, 640, 480, 1)
    got = events(mem, eventq, bufs)
    assert got == [(EV_ABS, ABS_X, ABS_MAX), (EV_ABS, ABS_Y, 0), (EV_KEY, BTN_LEFT, 1),
                   (EV_SYN, 0, 0)]


def test_keyboard_through_the_console_adds_shift_for_shifted_keysyms():
    mem, kbd, _irq, drv, (eventq, _statusq) = make(VirtioKeyboard())
    assert select(drv, CFG_EV_BITS, EV_REP)[0] == 1          # autorepeat asked for
    assert 30 in bits(select(drv, CFG_EV_BITS, EV_KEY)[1])
    console = DisplayConsole()
    console.keyboards.append(kbd)
    bufs = post(drv, eventq, 16)
    console.key_event(ord("A"), True)
    console.key_event(ord("A"), False)
    got = [e for e in events(mem, eventq, bufs) if e[0] == EV_KEY]
    assert got == [(EV_KEY, 42, 1), (EV_KEY, 30, 1), (EV_KEY, 42, 0), (EV_KEY, 30, 0)]
    console.key_event(0x12345678, True)                       # no such key: ignored


def test_mouse_reports_relative_motion():
    mem, mouse, _irq, drv, (eventq, _statusq) = make(VirtioMouse())
    console = DisplayConsole()
    console.mice.append(mouse)
    bufs = post(drv, eventq, 16)
    console.pointer_event(10, 10, 0)
    console.pointer_event(13, 8, 0)
    got = [e for e in events(mem, eventq, bufs) if e[0] == EV_REL]
    assert got == [(EV_REL, 0, 3), (EV_REL, 1, (-2) & 0xFFFFFFFF)]


def test_keyboard_keeps_a_typed_line_while_the_driver_is_behind():
    mem, kbd, _irq, drv, (eventq, _statusq) = make(VirtioKeyboard())
    bufs = post(drv, eventq, 4)               # the driver has posted only 4 buffers
    for _ in range(100):                      # 100 key strokes: 400 events
        kbd.key(30, True)
        kbd.key(30, False)
    assert kbd.dropped == 0
    got = events(mem, eventq, bufs)
    while len(got) < 400:                     # the driver catches up
        bufs = post(drv, eventq, 16)
        got += events(mem, eventq, bufs)
    assert got[:4] == [(EV_KEY, 30, 1), (EV_SYN, 0, 0), (EV_KEY, 30, 0), (EV_SYN, 0, 0)]
    assert len(got) == 400
