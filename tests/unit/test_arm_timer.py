from kemu.devices.arm_timer import CTL_ENABLE, CTL_IMASK, CTL_ISTATUS, GenericTimer
from kemu.devices.base import IrqLine


class Clock:
    def __init__(self):
        self.now = 1000

    def __call__(self):
        return self.now


def make():
    clock = Clock()
    irq = IrqLine()
    return GenericTimer(irq, counter=clock), irq, clock


def test_fires_when_the_counter_reaches_cval():
    t, irq, clock = make()
    t.write_cval(1500)
    t.write_ctl(CTL_ENABLE)
    assert not irq.level and not t.ctl_value() & CTL_ISTATUS
    assert t.deadline_counter() == 1500
    clock.now = 1500
    t.update()
    assert irq.level and t.ctl_value() & CTL_ISTATUS


def test_imask_masks_output_not_status():
    t, irq, clock = make()
    t.write_cval(0)
    t.write_ctl(CTL_ENABLE | CTL_IMASK)
    assert not irq.level
    assert t.ctl_value() == CTL_ENABLE | CTL_IMASK | CTL_ISTATUS
    assert t.deadline_counter() is None


def test_tval_is_signed_relative_to_now():
    t, irq, clock = make()
    t.write_tval(100)
    assert t.cval == 1100
    t.write_tval(0xFFFFFFFF)              # -1: already expired
    assert t.cval == 999
    t.write_ctl(CTL_ENABLE)
    assert irq.level


def test_disable_lowers_output():
    t, irq, clock = make()
    t.write_cval(0)
    t.write_ctl(CTL_ENABLE)
    assert irq.level
    t.write_ctl(0)
    assert not irq.level and t.deadline_counter() is None


def test_offset_shifts_the_view_of_the_counter():
    clock = Clock()
    t = GenericTimer(IrqLine(), counter=clock, offset=400)
    assert t.count() == 600
    t.write_cval(700)
    t.write_ctl(CTL_ENABLE)
    assert t.deadline_counter() == 1100
