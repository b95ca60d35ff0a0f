"""The i8042 through its ports: Linux's probe sequence and the reset."""

from kemu.devices.base import IrqLine
from kemu.devices.i8042 import (
    COMMAND,
    CTR_KBDINT,
    DATA,
    I8042,
    STATUS,
    STR_AUXDATA,
    STR_OBF,
)


def make():
    resets = []
    irq = IrqLine()
    return I8042(lambda: resets.append(True), irq), resets, irq


def command(kbd, cmd, *params):
    kbd.write(COMMAND, 1, cmd)
    for p in params:
        kbd.write(DATA, 1, p)
    out = []
    while kbd.read(STATUS, 1) & STR_OBF:
        out.append(kbd.read(DATA, 1))
    return out


def test_empty_at_reset_so_flush_finds_a_controller():
    kbd, _resets, _irq = make()
    assert not kbd.read(STATUS, 1) & STR_OBF
    assert kbd.read(STATUS, 1) != 0xFF


def test_self_tests():
    kbd, _, _ = make()
    assert command(kbd, 0xAA) == [0x55]
    assert command(kbd, 0xAB) == [0x00]
    assert command(kbd, 0xA9) == [0x02]        # AUX clock stuck: no mouse


def test_ctr_read_write():
    kbd, _, _irq = make()
    ctr = command(kbd, 0x20)
    assert len(ctr) == 1
    command(kbd, 0x60, 0x00)
    assert command(kbd, 0x20) == [0x00]
    command(kbd, 0xAD)
    assert command(kbd, 0x20) == [0x10]        # keyboard disabled
    command(kbd, 0xAE)
    command(kbd, 0xA7)
    assert command(kbd, 0x20) == [0x20]        # AUX disabled


def test_aux_loop_has_aux_flag():
    kbd, _, _ = make()
    kbd.write(COMMAND, 1, 0xD3)
    kbd.write(DATA, 1, 0x5A)
    assert kbd.read(STATUS, 1) & (STR_OBF | STR_AUXDATA) == STR_OBF | STR_AUXDATA
    assert kbd.read(DATA, 1) == 0x5A


def test_pulse_reset_line():
    kbd, resets, _ = make()
    kbd.write(COMMAND, 1, 0xFE)
    assert resets == [True]
    kbd.write(COMMAND, 1, 0xFF)                # pulses nothing
    assert resets == [True]


def test_output_port_reset_bit():
    kbd, resets, _ = make()
    assert command(kbd, 0xD0) == [0x03]
    command(kbd, 0xD1, 0x03)
    assert resets == []
    command(kbd, 0xD1, 0x02)
    assert resets == [True]


def test_keyboard_answers_and_irq1():
    kbd, _, irq = make()
    command(kbd, 0x60, CTR_KBDINT)
    kbd.write(DATA, 1, 0xF2)                   # identify
    assert irq.level
    assert [kbd.read(DATA, 1) for _ in range(3)] == [0xFA, 0xAB, 0x83]
    assert not irq.level
    kbd.write(DATA, 1, 0xED)                   # set LEDs: ACK, then parameter: ACK
    assert kbd.read(DATA, 1) == 0xFA
    kbd.write(DATA, 1, 0x00)
    assert kbd.read(DATA, 1) == 0xFA
    kbd.write(DATA, 1, 0xFF)
    assert [kbd.read(DATA, 1), kbd.read(DATA, 1)] == [0xFA, 0xAA]


def test_no_irq_with_kbdint_clear():
    kbd, _, irq = make()
    command(kbd, 0x60, 0)
    kbd.write(DATA, 1, 0xF4)
    assert kbd.read(STATUS, 1) & STR_OBF and not irq.level


def test_port_views():
    kbd, resets, _ = make()
    kbd.command_port().write(0, 1, 0xAA)
    assert kbd.command_port().read(0, 1) & STR_OBF
    assert kbd.data_port().read(0, 1) == 0x55
    kbd.command_port().write(0, 1, 0xFE)
    assert resets == [True]


def test_save_restore():
    kbd, _, _ = make()
    kbd.write(COMMAND, 1, 0xAA)
    other, _, _ = make()
    other.restore(kbd.save())
    assert other.read(DATA, 1) == 0x55
