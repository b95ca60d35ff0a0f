"""The 16550A model through its registers, as Linux's 8250 driver drives it."""

from kemu.backends.serial import SerialBackend
from kemu.devices.base import IrqLine
from kemu.devices.serial_16550 import (
    UART_FCR,
    UART_IER,
    UART_IER_MSI,
    UART_IER_RDI,
    UART_IER_RLSI,
    UART_IER_THRI,
    UART_IIR,
    UART_IIR_CTI,
    UART_IIR_NO_INT,
    UART_IIR_RDI,
    UART_IIR_RLSI,
    UART_IIR_THRI,
    UART_LCR,
    UART_LCR_DLAB,
    UART_LSR,
    UART_LSR_DR,
    UART_LSR_OE,
    UART_LSR_TEMT,
    UART_LSR_THRE,
    UART_MCR,
    UART_MCR_LOOP,
    UART_MSR,
    UART_RX,
    UART_SCR,
    UART_TX,
    Serial16550,
)


def make(**kw):
    out = bytearray()
    irq = IrqLine()
    return Serial16550(irq, out.extend, **kw), irq, out


def test_reset_state():
    uart, irq, _out = make()
    assert uart.read(UART_IIR, 1) == UART_IIR_NO_INT
    assert uart.read(UART_LSR, 1) == UART_LSR_THRE | UART_LSR_TEMT
    assert uart.read(UART_IER, 1) == 0 and uart.read(UART_LCR, 1) == 0
    assert not irq.level


def test_transmit_goes_to_the_backend():
    uart, _irq, out = make()
    for c in b"hello\n":
        uart.write(UART_TX, 1, c)
    assert bytes(out) == b"hello\n"
    assert uart.read(UART_LSR, 1) & (UART_LSR_THRE | UART_LSR_TEMT) == 0x60


def test_divisor_latch_hides_rbr_thr_and_ier():
    uart, _irq, out = make()
    uart.write(UART_LCR, 1, UART_LCR_DLAB | 0x03)
    uart.write(0, 1, 0x0C)          # DLL: 9600 baud
    uart.write(1, 1, 0x00)          # DLM
    assert (uart.read(0, 1), uart.read(1, 1)) == (0x0C, 0)
    assert out == b""               # nothing transmitted
    assert uart.divisor == 12
    uart.write(UART_LCR, 1, 0x03)
    assert uart.read(UART_IER, 1) == 0
    uart.write(UART_TX, 1, ord("x"))
    assert out == b"x"
    assert uart.read(UART_LCR, 1) == 0x03


def test_scratch_register_and_ier_mask():
    """What autoconfig() in 8250_port.c probes: IER keeps 4 bits, SCR keeps 8."""
    uart, _irq, _out = make()
    uart.write(UART_IER, 1, 0xFF)
    assert uart.read(UART_IER, 1) == 0x0F
    uart.write(UART_IER, 1, 0)
    uart.write(UART_SCR, 1, 0xA5)
    assert uart.read(UART_SCR, 1) == 0xA5


def test_fifo_identifies_as_16550a():
    uart, _irq, _out = make()
    uart.write(UART_FCR, 1, 0x01)
    assert uart.read(UART_IIR, 1) >> 6 == 3
    # With DLAB set, offset 2 still reads IIR (no EFR): not a 16650.
    uart.write(UART_LCR, 1, 0xBF)
    assert uart.read(2, 1) != 0
    uart.write(UART_LCR, 1, 0)
    uart.write(UART_FCR, 1, 0)
    assert uart.read(UART_IIR, 1) >> 6 == 0


def test_thre_interrupt_semantics():
    """Enabling ETBEI with THR empty raises THRE; reading IIR clears it; so does
    writing THR, after which the empty THR raises it again (UART_BUG_THRE test)."""
    uart, irq, _out = make()
    uart.write(UART_IER, 1, UART_IER_THRI)
    assert irq.level
    assert uart.read(UART_IIR, 1) & 0x0F == UART_IIR_THRI
    assert not irq.level
    assert uart.read(UART_IIR, 1) & 0x0F == UART_IIR_NO_INT
    # Toggling IER re-asserts it (the driver's start-up test).
    uart.write(UART_IER, 1, 0)
    uart.write(UART_IER, 1, UART_IER_THRI)
    assert uart.read(UART_IIR, 1) & 0x0F == UART_IIR_THRI
    # Transmitting: THR empties at once, the interrupt is pending again.
    uart.write(UART_TX, 1, ord("a"))
    assert irq.level
    uart.write(UART_IER, 1, 0)
    assert not irq.level


def test_receive_and_rdi_interrupt_no_fifo():
    uart, irq, _out = make()
    assert uart.can_receive() == 0          # the driver does not listen yet
    uart.write(UART_IER, 1, UART_IER_RDI)
    assert uart.can_receive() == 1          # no FIFO: one byte
    assert uart.receive(b"ab") == 1
    assert irq.level
    assert uart.read(UART_IIR, 1) & 0x0F == UART_IIR_RDI
    assert uart.read(UART_LSR, 1) & UART_LSR_DR
    assert uart.read(UART_RX, 1) == ord("a")
    assert not irq.level
    assert not uart.read(UART_LSR, 1) & UART_LSR_DR


def test_fifo_trigger_level_and_timeout():
    uart, irq, _out = make()
    uart.write(UART_FCR, 1, 0x81)           # FIFO on, trigger level 8
    uart.write(UART_IER, 1, UART_IER_RDI)
    assert uart.can_receive() == 16
    uart.receive(b"abc")
    assert uart.read(UART_IIR, 1) == 0xC0 | UART_IIR_CTI   # below the trigger: timeout
    uart.receive(b"defgh")
    assert uart.read(UART_IIR, 1) == 0xC0 | UART_IIR_RDI
    assert uart.receive(b"x" * 20) == 8
    assert uart.can_receive() == 0
    got = bytes(uart.read(UART_RX, 1) for _ in range(16))
    assert got == b"abcdefgh" + b"x" * 8
    assert not irq.level
    uart.receive(b"zz")
    uart.write(UART_FCR, 1, 0x83)           # clear the receive FIFO
    assert not uart.read(UART_LSR, 1) & UART_LSR_DR and not irq.level


def test_priorities_line_status_over_data_over_thre():
    uart, _irq, out = make()
    uart.write(UART_MCR, 1, UART_MCR_LOOP)
    uart.write(UART_IER, 1, UART_IER_RDI | UART_IER_THRI | UART_IER_RLSI)
    uart.write(UART_TX, 1, 1)               # loopback: to the receiver
    uart.write(UART_TX, 1, 2)               # no FIFO: overrun
    assert uart.read(UART_IIR, 1) & 0x0F == UART_IIR_RLSI
    assert uart.read(UART_LSR, 1) & UART_LSR_OE    # reading LSR clears the error
    assert uart.read(UART_IIR, 1) & 0x0F == UART_IIR_RDI
    assert uart.read(UART_RX, 1) == 1
    assert uart.read(UART_IIR, 1) & 0x0F == UART_IIR_THRI
    assert out == b""


def test_loopback_modem_lines():
    uart, _irq, _out = make()
    assert uart.read(UART_MSR, 1) & 0xB0 == 0xB0          # DCD, DSR, CTS: connected
    uart.write(UART_MCR, 1, UART_MCR_LOOP | 0x0A)          # RTS, OUT2
    assert uart.read(UART_MSR, 1) & 0xF0 == 0x90           # CTS, DCD
    uart.write(UART_MCR, 1, UART_MCR_LOOP | 0x05)          # DTR, OUT1
    assert uart.read(UART_MSR, 1) & 0xF0 == 0x60           # DSR, RI
    assert uart.can_receive() == 0                         # host input waits


def test_msi_only_on_delta():
    uart, irq, _out = make()
    uart.write(UART_IER, 1, UART_IER_MSI)
    assert not irq.level


def test_register_shift_for_mmio():
    uart, _irq, out = make(regshift=2)
    uart.write(UART_SCR << 2, 4, 0x5A)
    assert uart.read(UART_SCR << 2, 4) == 0x5A
    uart.write(0, 4, ord("m"))
    assert out == b"m"


def test_serial_backend_flow_control():
    out = bytearray()
    backend = SerialBackend(out.extend)
    irq = IrqLine()
    uart = Serial16550(irq, backend.write, on_rx_space=backend.pump)
    backend.device = uart
    backend.send(b"hello")
    assert backend.pending == 5              # nobody listens yet
    uart.write(UART_FCR, 1, 0x01)
    uart.write(UART_IER, 1, UART_IER_RDI)    # listening: the FIFO fills
    assert backend.pending == 0
    got = bytearray()
    while uart.read(UART_LSR, 1) & UART_LSR_DR:
        got.append(uart.read(UART_RX, 1))
    assert got == b"hello"
    backend.send(b"y" * 40)
    assert backend.pending == 24
    for _ in range(40):
        uart.read(UART_RX, 1)                # each read makes room: the backend refills
    assert backend.pending == 0


def test_save_restore():
    uart, _irq, _out = make()
    uart.write(UART_FCR, 1, 0x01)
    uart.write(UART_IER, 1, UART_IER_RDI)
    uart.write(UART_SCR, 1, 7)
    uart.receive(b"qq")
    state = uart.save()
    other, irq2, _ = make()
    other.restore(state)
    assert irq2.level
    assert other.read(UART_SCR, 1) == 7
    assert other.read(UART_RX, 1) == ord("q")


def test_input_cleared_by_the_8250_probe_is_given_back():
    """Linux's autoconfig writes IER=0x0F for a moment (input flows in), then clears
    the FIFOs: the host's bytes go back to the backend, first in line."""
    backend = SerialBackend(lambda data: None)
    uart = Serial16550(IrqLine(), backend.write, on_rx_space=backend.pump,
                       on_rx_discard=backend.unreceive)
    backend.device = uart
    backend.send(b"uname -m\n")
    uart.write(UART_IER, 1, 0x0F)            # the probe's IER test
    assert backend.pending == 8              # one byte taken (no FIFO yet)
    uart.write(UART_IER, 1, 0)
    uart.write(UART_FCR, 1, 0x01)            # FIFO on: resets the FIFOs
    uart.write(UART_FCR, 1, 0x07)            # and clears them again
    assert backend.pending == 9 and not uart.read(UART_LSR, 1) & UART_LSR_DR
    uart.write(UART_IER, 1, UART_IER_RDI)    # the port is opened
    got = bytearray()
    while uart.read(UART_LSR, 1) & UART_LSR_DR:
        got.append(uart.read(UART_RX, 1))
    assert got == b"uname -m\n"
    # Without a taker the cleared bytes are simply gone, as on hardware.
    uart2, _irq, _out = make()
    uart2.write(UART_IER, 1, UART_IER_RDI)
    assert uart2.receive(b"ab") == 1
    uart2.write(UART_FCR, 1, 0x03)
    assert not uart2.read(UART_LSR, 1) & UART_LSR_DR
