from kemu.devices.base import IrqLine
from kemu.devices.pl011 import (FR_RXFE, FR_RXFF, FR_TXFE, INT_RT, INT_RX, INT_TX, UARTCR, UARTDR,
                                UARTFR, UARTICR, UARTIMSC, UARTLCR_H, UARTMIS, UARTRIS, Pl011)


def make():
    out = bytearray()
    irq = IrqLine()
    uart = Pl011(irq, out.extend)
    return uart, irq, out


def enable_rx(uart):
    uart.write(UARTCR, 4, 0x301)
    uart.write(UARTLCR_H, 4, 0x70)     # 8 bits, FIFOs on
    uart.write(UARTIMSC, 4, INT_RX | INT_RT)


def test_transmit_goes_to_the_backend():
    uart, irq, out = make()
    for c in b"hi\n":
        uart.write(UARTDR, 4, c)
    assert bytes(out) == b"hi\n"
    assert uart.read(UARTFR, 4) & FR_TXFE


def test_tx_interrupt_follows_mask_and_clear():
    uart, irq, out = make()
    uart.write(UARTDR, 4, ord("a"))
    assert uart.read(UARTRIS, 4) & INT_TX
    assert not irq.level
    uart.write(UARTIMSC, 4, INT_TX)
    assert irq.level and uart.read(UARTMIS, 4) == INT_TX
    uart.write(UARTICR, 4, INT_TX)
    assert not irq.level


def test_receive_fifo_and_interrupts():
    uart, irq, out = make()
    assert uart.read(UARTFR, 4) & FR_RXFE
    enable_rx(uart)
    assert uart.receive(b"ab") == 2
    assert irq.level
    assert not uart.read(UARTFR, 4) & FR_RXFE
    assert uart.read(UARTDR, 4) == ord("a")
    assert irq.level                     # data still waiting
    assert uart.read(UARTDR, 4) == ord("b")
    assert not irq.level
    assert uart.read(UARTFR, 4) & FR_RXFE


def test_fifo_capacity_and_full_flag():
    uart, irq, out = make()
    enable_rx(uart)
    assert uart.receive(b"x" * 40) == 32
    assert uart.read(UARTFR, 4) & FR_RXFF
    assert uart.can_receive() == 0


def test_host_input_waits_until_the_driver_listens():
    uart, irq, out = make()
    assert uart.can_receive() == 0       # receive interrupts masked: not listening
    enable_rx(uart)
    assert uart.can_receive() == 32


def test_identification_registers():
    uart, _, _ = make()
    ids = [uart.read(0xFE0 + 4 * i, 4) for i in range(8)]
    assert ids == [0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1]


def test_save_restore():
    uart, irq, out = make()
    enable_rx(uart)
    uart.receive(b"xyz")
    state = uart.save()
    other, irq2, _ = make()
    other.restore(state)
    assert irq2.level
    assert bytes(other.read(UARTDR, 4) for _ in range(3)) == b"xyz"
