"""ARM PrimeCell UART (PL011), as a register state machine.

Register map and bits from the ARM PrimeCell UART (PL011) Technical
Reference Manual (DDI 0183), section 3.2 "Summary of registers".
Transmission is immediate: every byte written to UARTDR goes straight to the
``tx`` backend, so the transmit FIFO is always empty.  Received bytes are fed
in with :meth:`Pl011.receive` and wait in a 32-entry FIFO.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from kemu.devices.base import IrqLine
from kemu.state import check_version

UARTDR = 0x000
UARTRSR = 0x004
UARTFR = 0x018
UARTILPR = 0x020
UARTIBRD = 0x024
UARTFBRD = 0x028
UARTLCR_H = 0x02C
UARTCR = 0x030
UARTIFLS = 0x034
UARTIMSC = 0x038
UARTRIS = 0x03C
UARTMIS = 0x040
UARTICR = 0x044
UARTDMACR = 0x048

# UARTFR bits
FR_BUSY = 1 << 3
FR_RXFE = 1 << 4
FR_TXFF = 1 << 5
FR_RXFF = 1 << 6
FR_TXFE = 1 << 7

# interrupt bits (UARTRIS / UARTIMSC / UARTMIS / UARTICR)
INT_RX = 1 << 4
INT_TX = 1 << 5
INT_RT = 1 << 6
INT_ALL = 0x7FF

LCR_H_FEN = 1 << 4
CR_UARTEN = 1 << 0
CR_RXE = 1 << 9

FIFO_DEPTH = 32

#: UARTPeriphID0-3 and UARTPCellID0-3 at 0xFE0..0xFFC (TRM 3.3.14-15).
ID_REGISTERS = (0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1)


@dataclass
class Pl011State:
    version: int
    rx_fifo: bytes
    int_level: int
    imsc: int
    lcr_h: int
    cr: int
    ifls: int
    ibrd: int
    fbrd: int
    ilpr: int
    dmacr: int
    rsr: int


class Pl011:
    """A PL011 with an output callable and an interrupt line."""

    def __init__(self, irq: IrqLine, tx: Callable[[bytes], None], name: str = "pl011",
                 on_rx_space: Callable[[], None] | None = None) -> None:
        self.name = name
        self.irq = irq
        self.tx = tx
        #: Called when the guest has taken bytes out of the receive FIFO.
        self.on_rx_space = on_rx_space or (lambda: None)
        #: A guest that polls UARTFR with its interrupts masked (firmware: EDK2,
        #: U-Boot) listens once UART and receiver are enabled, as QEMU delivers.
        self.polled_input = False
        self.reset()

    def reset(self) -> None:
        self.rx_fifo: deque[int] = deque()
        self.int_level = 0
        self.imsc = 0
        self.lcr_h = 0
        self.cr = 0x300  # TXE | RXE, as at reset (TRM 3.3.8)
        self.ifls = 0x12
        self.ibrd = 0
        self.fbrd = 0
        self.ilpr = 0
        self.dmacr = 0
        self.rsr = 0
        self._update()

    # -- host side ---------------------------------------------------------
    @property
    def rx_capacity(self) -> int:
        depth = FIFO_DEPTH if self.lcr_h & LCR_H_FEN else 1
        return depth - len(self.rx_fifo)

    def can_receive(self) -> int:
        """Bytes the host may deliver now: only while the guest listens.

        The driver is listening once the UART and its receiver are enabled
        and a receive interrupt is unmasked; until then input waits on the
        host side (Linux drains and discards the FIFO when it starts up).
        """
        listening = (self.cr & CR_UARTEN and self.cr & CR_RXE
                     and (self.polled_input or self.imsc & (INT_RX | INT_RT)))
        return self.rx_capacity if listening else 0

    def receive(self, data: bytes) -> int:
        """Queue received bytes; returns how many were accepted."""
        n = max(0, min(len(data), self.rx_capacity))
        if n:
            self.rx_fifo.extend(data[:n])
            self.int_level |= INT_RX | INT_RT
            self._update()
        return n

    # -- guest side ---------------------------------------------------------
    def _update(self) -> None:
        self.irq.set(bool(self.int_level & self.imsc))

    def read(self, offset: int, size: int) -> int:
        if offset == UARTDR:
            if not self.rx_fifo:
                return 0
            value = self.rx_fifo.popleft()
            if not self.rx_fifo:
                self.int_level &= ~(INT_RX | INT_RT)
                self._update()
            self.on_rx_space()
            return value
        if offset == UARTRSR:
            return self.rsr
        if offset == UARTFR:
            fr = FR_TXFE
            if not self.rx_fifo:
                fr |= FR_RXFE
            if self.rx_capacity <= 0:
                fr |= FR_RXFF
            return fr
        if offset == UARTILPR:
            return self.ilpr
        if offset == UARTIBRD:
            return self.ibrd
        if offset == UARTFBRD:
            return self.fbrd
        if offset == UARTLCR_H:
            return self.lcr_h
        if offset == UARTCR:
            return self.cr
        if offset == UARTIFLS:
            return self.ifls
        if offset == UARTIMSC:
            return self.imsc
        if offset == UARTRIS:
            return self.int_level
        if offset == UARTMIS:
            return self.int_level & self.imsc
        if offset == UARTDMACR:
            return self.dmacr
        if 0xFE0 <= offset < 0x1000:
            return ID_REGISTERS[(offset - 0xFE0) >> 2]
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == UARTDR:
            self.tx(bytes((value & 0xFF,)))
            self.int_level |= INT_TX
            self._update()
        elif offset == UARTRSR:
            self.rsr = 0
        elif offset == UARTILPR:
            self.ilpr = value & 0xFF
        elif offset == UARTIBRD:
            self.ibrd = value & 0xFFFF
        elif offset == UARTFBRD:
            self.fbrd = value & 0x3F
        elif offset == UARTLCR_H:
            if (self.lcr_h ^ value) & LCR_H_FEN:
                # Enabling or disabling the FIFOs flushes them (TRM 3.3.7).
                self.rx_fifo.clear()
            self.lcr_h = value & 0xFF
        elif offset == UARTCR:
            self.cr = value & 0xFFFF
            if self.polled_input:
                self.on_rx_space()      # input typed before the receiver was enabled
        elif offset == UARTIFLS:
            self.ifls = value & 0x3F
        elif offset == UARTIMSC:
            self.imsc = value & INT_ALL
            self._update()
            self.on_rx_space()
        elif offset == UARTICR:
            self.int_level &= ~value
            if self.rx_fifo:
                # Data still waiting keeps the receive interrupts asserted.
                self.int_level |= INT_RX | INT_RT
            self._update()
        elif offset == UARTDMACR:
            self.dmacr = value & 0x7

    # -- state ----------------------------------------------------------------
    def save(self) -> Pl011State:
        return Pl011State(1, bytes(self.rx_fifo), self.int_level, self.imsc, self.lcr_h,
                          self.cr, self.ifls, self.ibrd, self.fbrd, self.ilpr, self.dmacr,
                          self.rsr)

    def restore(self, state: Pl011State) -> None:
        check_version(self.name, state.version)
        self.rx_fifo = deque(state.rx_fifo)
        for name in ("int_level", "imsc", "lcr_h", "cr", "ifls", "ibrd", "fbrd", "ilpr",
                     "dmacr", "rsr"):
            setattr(self, name, getattr(state, name))
        self._update()
