"""National Semiconductor PC16550D / 16550A UART, as a register state machine.

Registers and bits from the PC16550D datasheet (National Semiconductor,
"PC16550D Universal Asynchronous Receiver/Transmitter with FIFOs", table II
"Summary of Registers") and Linux's ``include/uapi/linux/serial_reg.h``:

====  ======================  =============================================
off   read                    write
====  ======================  =============================================
0     RBR (DLL if DLAB)       THR (DLL if DLAB)
1     IER (DLM if DLAB)       IER (DLM if DLAB)
2     IIR                     FCR
3     LCR                     LCR
4     MCR                     MCR
5     LSR                     (factory test: ignored)
6     MSR                     (ignored)
7     SCR                     SCR
====  ======================  =============================================

The model follows the datasheet where Linux's 8250 driver looks (and QEMU's
``hw/char/serial.c`` where the datasheet is silent):

* Transmission is immediate: a byte written to THR goes to ``tx`` at once,
  so THR and the transmitter are always empty again (LSR.THRE|TEMT) and the
  THRE interrupt is pending again right after the write.
* The THRE interrupt (datasheet table IV, priority 3) is cleared by reading
  IIR when it is the interrupt IIR reports, or by writing THR; setting
  IER.ETBEI while THR is empty makes it pending again.  The driver's
  start-up test for UARTs that do not re-assert THRE (UART_BUG_THRE in
  8250_port.c) relies on this.
* Interrupt priorities (table IV): receiver line status, received data (or
  character timeout with FIFOs below the trigger level: the timeout is taken
  as elapsed at once, there is no clock here), THR empty, modem status.
* FIFOs (FCR.FE): 16 bytes receive FIFO with the 1/4/8/14 trigger levels;
  IIR bits 7:6 read 11 while they are enabled (Linux's autoconfig identifies
  a 16550A by that).  Input beyond the FIFO is refused, not overrun: the
  host side (:class:`kemu.backends.serial.SerialBackend`) holds it until
  ``on_rx_space`` is called.
* Loopback (MCR.LOOP): THR feeds the receive FIFO and MSR reflects
  MCR's DTR/RTS/OUT1/OUT2 as DSR/CTS/RI/DCD.  Outside loopback the modem
  lines read as DCD|DSR|CTS asserted, a connected terminal.
* The interrupt output follows the pending interrupt, regardless of
  MCR.OUT2 (as QEMU: the PC's OUT2 gate is not modelled).

The same core mounts on port I/O (``regshift=0``, at 0x3f8 on a PC) or on
MMIO with registers ``1 << regshift`` bytes apart.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kemu.devices.base import IrqLine

# -- register offsets (before the shift) ------------------------------------------------
UART_RX = 0      # RBR, read
UART_TX = 0      # THR, write
UART_DLL = 0     # divisor latch low, DLAB=1
UART_IER = 1
UART_DLM = 1     # divisor latch high, DLAB=1
UART_IIR = 2     # read
UART_FCR = 2     # write
UART_LCR = 3
UART_MCR = 4
UART_LSR = 5
UART_MSR = 6
UART_SCR = 7

# -- IER ----------------------------------------------------------------------------------------
UART_IER_RDI = 0x01       # received data available (ERBFI)
UART_IER_THRI = 0x02      # THR empty (ETBEI)
UART_IER_RLSI = 0x04      # receiver line status (ELSI)
UART_IER_MSI = 0x08       # modem status (EDSSI)

# -- IIR ----------------------------------------------------------------------------------------
UART_IIR_NO_INT = 0x01
UART_IIR_ID = 0x0E
UART_IIR_MSI = 0x00
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_RLSI = 0x06
UART_IIR_CTI = 0x0C       # character timeout
UART_IIR_FIFO_ENABLED = 0xC0

# -- FCR ----------------------------------------------------------------------------------------
UART_FCR_ENABLE_FIFO = 0x01
UART_FCR_CLEAR_RCVR = 0x02
UART_FCR_CLEAR_XMIT = 0x04
UART_FCR_DMA_SELECT = 0x08
UART_FCR_TRIGGER_MASK = 0xC0
FIFO_TRIGGER_LEVELS = (1, 4, 8, 14)

# -- LCR ----------------------------------------------------------------------------------------
UART_LCR_DLAB = 0x80
UART_LCR_SBC = 0x40       # set break

# -- MCR ----------------------------------------------------------------------------------------
UART_MCR_DTR = 0x01
UART_MCR_RTS = 0x02
UART_MCR_OUT1 = 0x04
UART_MCR_OUT2 = 0x08
UART_MCR_LOOP = 0x10

# -- LSR ----------------------------------------------------------------------------------------
UART_LSR_DR = 0x01
UART_LSR_OE = 0x02
UART_LSR_PE = 0x04
UART_LSR_FE = 0x08
UART_LSR_BI = 0x10
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40
UART_LSR_FIFOE = 0x80
UART_LSR_INT_ANY = UART_LSR_OE | UART_LSR_PE | UART_LSR_FE | UART_LSR_BI

# -- MSR ----------------------------------------------------------------------------------------
UART_MSR_DCTS = 0x01
UART_MSR_DDSR = 0x02
UART_MSR_TERI = 0x04
UART_MSR_DDCD = 0x08
UART_MSR_ANY_DELTA = 0x0F
UART_MSR_CTS = 0x10
UART_MSR_DSR = 0x20
UART_MSR_RI = 0x40
UART_MSR_DCD = 0x80

FIFO_DEPTH = 16
#: Divisor for 115200 baud from the PC's 1.8432 MHz clock (what firmware leaves).
DEFAULT_DIVISOR = 1
STATE_VERSION = 1


@dataclass
class Serial16550State:
    version: int
    rx_fifo: bytes
    divisor: int
    ier: int
    fcr: int
    lcr: int
    mcr: int
    lsr: int
    msr: int
    scr: int
    thr_ipending: bool


class Serial16550:
    """A 16550A with an output callable and an interrupt line.

    ``regshift``: registers are ``1 << regshift`` bytes apart (0 on port I/O).
    ``on_rx_space``: called when the guest made room for input (read RBR,
    enabled the receive interrupt), so the host side can deliver more.
    ``on_rx_discard(data)``: host input the guest threw away unread by
    clearing the receive FIFO.  Linux's 8250 probe enables every interrupt
    for a moment (so input flows in) and then clears the FIFOs; handing those
    bytes back keeps what was typed before the driver was ready.  Without
    it they are dropped, as on hardware.
    """

    def __init__(self, irq: IrqLine, tx: Callable[[bytes], None], name: str = "serial",
                 on_rx_space: Callable[[], None] | None = None, regshift: int = 0,
                 on_rx_discard: Callable[[bytes], None] | None = None) -> None:
        self.name = name
        self.irq = irq
        self.tx = tx
        self.regshift = regshift
        self.on_rx_space = on_rx_space or (lambda: None)
        self.on_rx_discard = on_rx_discard or (lambda data: None)
        self.reset()

    def reset(self) -> None:
        """The state after the MR (master reset) pin: table II's reset column."""
        self.rx_fifo: deque[int] = deque()
        self.divisor = DEFAULT_DIVISOR
        self.ier = 0
        self.fcr = 0
        self.lcr = 0
        self.mcr = 0
        self.lsr = UART_LSR_THRE | UART_LSR_TEMT
        self.msr = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
        self.scr = 0
        self.thr_ipending = False
        self._update()

    # -- derived state -----------------------------------------------------------------
    @property
    def fifo_enabled(self) -> bool:
        return bool(self.fcr & UART_FCR_ENABLE_FIFO)

    @property
    def trigger_level(self) -> int:
        return FIFO_TRIGGER_LEVELS[(self.fcr & UART_FCR_TRIGGER_MASK) >> 6]

    @property
    def rx_capacity(self) -> int:
        depth = FIFO_DEPTH if self.fifo_enabled else 1
        return max(0, depth - len(self.rx_fifo))

    def pending_interrupt(self) -> int:
        """IIR bits 3:0 for the highest-priority pending interrupt (datasheet table IV)."""
        ier = self.ier
        if ier & UART_IER_RLSI and self.lsr & UART_LSR_INT_ANY:
            return UART_IIR_RLSI
        if ier & UART_IER_RDI and self.rx_fifo:
            if not self.fifo_enabled or len(self.rx_fifo) >= self.trigger_level:
                return UART_IIR_RDI
            return UART_IIR_CTI
        if ier & UART_IER_THRI and self.thr_ipending:
            return UART_IIR_THRI
        if ier & UART_IER_MSI and self.msr & UART_MSR_ANY_DELTA:
            return UART_IIR_MSI
        return UART_IIR_NO_INT

    def _iir(self) -> int:
        return self.pending_interrupt() | (UART_IIR_FIFO_ENABLED if self.fifo_enabled else 0)

    def _update(self) -> None:
        if self.rx_fifo:
            self.lsr |= UART_LSR_DR
        else:
            self.lsr &= ~UART_LSR_DR
        self.irq.set(self.pending_interrupt() != UART_IIR_NO_INT)

    # -- host side ---------------------------------------------------------------------
    def can_receive(self) -> int:
        """Bytes the host may deliver now: only while the driver listens (IER.ERBFI),
        outside loopback (where the line is disconnected from the host)."""
        if not self.ier & UART_IER_RDI or self.mcr & UART_MCR_LOOP:
            return 0
        return self.rx_capacity

    def receive(self, data: bytes) -> int:
        """Queue received bytes; returns how many were accepted."""
        n = max(0, min(len(data), self.rx_capacity))
        if n:
            self.rx_fifo.extend(data[:n])
            self._update()
        return n

    # -- guest side --------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        reg = offset >> self.regshift
        if reg == UART_RX:
            if self.lcr & UART_LCR_DLAB:
                return self.divisor & 0xFF
            if not self.rx_fifo:
                return 0
            value = self.rx_fifo.popleft()
            self._update()
            self.on_rx_space()
            return value
        if reg == UART_IER:
            if self.lcr & UART_LCR_DLAB:
                return (self.divisor >> 8) & 0xFF
            return self.ier
        if reg == UART_IIR:
            iir = self._iir()
            if iir & UART_IIR_ID == UART_IIR_THRI and not iir & UART_IIR_NO_INT:
                # Reading IIR while it reports THRE clears that interrupt (table IV).
                self.thr_ipending = False
                self._update()
            return iir
        if reg == UART_LCR:
            return self.lcr
        if reg == UART_MCR:
            return self.mcr
        if reg == UART_LSR:
            lsr = self.lsr
            if lsr & UART_LSR_INT_ANY:
                # Errors and break are cleared by reading LSR.
                self.lsr &= ~(UART_LSR_INT_ANY | UART_LSR_FIFOE)
                self._update()
            return lsr
        if reg == UART_MSR:
            msr = self._msr()
            if self.msr & UART_MSR_ANY_DELTA:
                self.msr &= ~UART_MSR_ANY_DELTA
                self._update()
            return msr
        if reg == UART_SCR:
            return self.scr
        return 0

    def _msr(self) -> int:
        if not self.mcr & UART_MCR_LOOP:
            return self.msr
        m = self.mcr
        lines = ((UART_MSR_CTS if m & UART_MCR_RTS else 0) | (UART_MSR_DSR if m & UART_MCR_DTR else 0)
                 | (UART_MSR_RI if m & UART_MCR_OUT1 else 0)
                 | (UART_MSR_DCD if m & UART_MCR_OUT2 else 0))
        return lines | (self.msr & UART_MSR_ANY_DELTA)

    def write(self, offset: int, size: int, value: int) -> None:
        reg = offset >> self.regshift
        value &= 0xFF
        if reg == UART_TX:
            if self.lcr & UART_LCR_DLAB:
                self.divisor = (self.divisor & 0xFF00) | value
                return
            self._transmit(value)
        elif reg == UART_IER:
            if self.lcr & UART_LCR_DLAB:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
                return
            changed = (self.ier ^ value) & 0x0F
            self.ier = value & 0x0F
            if changed & UART_IER_THRI:
                # Enabling ETBEI with THR empty makes the THRE interrupt pending.
                self.thr_ipending = bool(self.ier & UART_IER_THRI and self.lsr & UART_LSR_THRE)
            self._update()
            if changed & UART_IER_RDI:
                self.on_rx_space()
        elif reg == UART_FCR:
            # Changing FCR.FE resets both FIFOs (datasheet, FCR bit 0).
            if (self.fcr ^ value) & UART_FCR_ENABLE_FIFO or value & UART_FCR_CLEAR_RCVR:
                if self.rx_fifo and not self.mcr & UART_MCR_LOOP:
                    self.on_rx_discard(bytes(self.rx_fifo))
                self.rx_fifo.clear()
            self.fcr = value & (UART_FCR_ENABLE_FIFO | UART_FCR_DMA_SELECT
                                | UART_FCR_TRIGGER_MASK)
            if not self.fifo_enabled:
                self.fcr = 0
            self._update()
            self.on_rx_space()
        elif reg == UART_LCR:
            self.lcr = value
        elif reg == UART_MCR:
            was_loop = self.mcr & UART_MCR_LOOP
            self.mcr = value & 0x1F
            if was_loop != self.mcr & UART_MCR_LOOP:
                self.on_rx_space()
        elif reg == UART_SCR:
            self.scr = value
        # LSR and MSR writes are for factory testing: ignored.

    def _transmit(self, value: int) -> None:
        self.thr_ipending = False
        if self.mcr & UART_MCR_LOOP:
            if self.rx_capacity:
                self.rx_fifo.append(value)
            else:
                self.lsr |= UART_LSR_OE
        else:
            self.tx(bytes((value,)))
        # The byte left at once: THR and the shift register are empty again.
        self.lsr |= UART_LSR_THRE | UART_LSR_TEMT
        self.thr_ipending = bool(self.ier & UART_IER_THRI)
        self._update()

    # -- state ---------------------------------------------------------------------------
    def save(self) -> Serial16550State:
        return Serial16550State(STATE_VERSION, bytes(self.rx_fifo), self.divisor, self.ier,
                                self.fcr, self.lcr, self.mcr, self.lsr, self.msr, self.scr,
                                self.thr_ipending)

    def restore(self, state: Serial16550State) -> None:
        if state.version != STATE_VERSION:
            raise ValueError(f"16550 state version {state.version} is not {STATE_VERSION}")
        self.rx_fifo = deque(state.rx_fifo[:FIFO_DEPTH])
        for name in ("divisor", "ier", "fcr", "lcr", "mcr", "lsr", "msr", "scr",
                     "thr_ipending"):
            setattr(self, name, getattr(state, name))
        self._update()
