from kemu.backends.serial import SerialBackend
from kemu.devices.base import IrqLine
from kemu.devices.pl011 import INT_RX, UARTCR, UARTDR, UARTIMSC, UARTLCR_H, Pl011


def test_input_is_held_until_the_guest_listens_and_then_flows():
    out = bytearray()
    backend = SerialBackend(out.extend)
    uart = Pl011(IrqLine(), backend.write, on_rx_space=backend.pump)
    backend.device = uart
    backend.send(b"uname -m\n" * 10)          # 90 bytes, the driver is not up yet
    assert backend.pending == 90
    uart.write(UARTCR, 4, 0x301)
    uart.write(UARTLCR_H, 4, 0x70)
    uart.write(UARTIMSC, 4, INT_RX)           # the driver starts listening
    assert backend.pending == 90 - 32
    got = bytearray()
    while len(got) < 90:
        got.append(uart.read(UARTDR, 4))     # each read makes room, the backend refills
    assert bytes(got) == b"uname -m\n" * 10 and backend.pending == 0


def test_taps_see_output():
    seen = []
    backend = SerialBackend(lambda b: None)
    backend.add_tap(seen.append)
    backend.write(b"x")
    assert seen == [b"x"]
