"""The Arm PrimeCell PL031 real-time clock, as QEMU's virt board has it.

Registers from the PL031 Technical Reference Manual (ARM DDI 0224, 3.2
"Summary of RTC registers"), offsets within its 4 KiB page:

=======  ========  =====================================================
0x000    RTCDR     data: the current count (seconds), read-only
0x004    RTCMR     match: RTCRIS is set when RTCDR reaches it
0x008    RTCLR     load: writing it sets the count
0x00C    RTCCR     control: bit 0 RTC start; always reads 1 (it is running)
0x010    RTCIMSC   interrupt mask set/clear (bit 0)
0x014    RTCRIS    raw interrupt status (bit 0), read-only
0x018    RTCMIS    masked interrupt status: RTCRIS & RTCIMSC, read-only
0x01C    RTCICR    interrupt clear: 1 clears RTCRIS, write-only
0xFE0-   RTCPeriphID0-3, RTCPCellID0-3 (PrimeCell identification)
=======  ========  =====================================================

The count is the injected clock's seconds plus an offset: ``clock()`` says
what the board's RTC clock reads (seconds, fractional), and the device
keeps ``tick_offset`` so that RTCDR = offset + clock, as QEMU's pl031 does
with its rtc_clock.  The match interrupt needs a host timer: the device
asks for one through ``set_alarm(delay_seconds | None)`` and the board
calls :meth:`Pl031.alarm` when it expires.  The interrupt line is high
while RTCMIS is 1 (level-triggered, as the device tree says).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from kemu.devices.base import IrqLine
from kemu.state import check_version

RTCDR = 0x00
RTCMR = 0x04
RTCLR = 0x08
RTCCR = 0x0C
RTCIMSC = 0x10
RTCRIS = 0x14
RTCMIS = 0x18
RTCICR = 0x1C

#: RTCPeriphID0-3 and RTCPCellID0-3 at 0xFE0..0xFFC, one byte per word (TRM 3.3.9-10).
PERIPH_ID = (0x31, 0x10, 0x14, 0x00)
PCELL_ID = (0x0D, 0xF0, 0x05, 0xB1)
ID_BASE = 0xFE0

SIZE = 0x1000
MASK32 = 0xFFFFFFFF


@dataclass
class Pl031State:
    version: int
    tick_offset: int
    mr: int
    lr: int
    im: int
    ris: int


class Pl031:
    """PL031 over an injected clock (seconds), IRQ line and alarm timer."""

    def __init__(self, irq: IrqLine, clock: Callable[[], float], start_time: float,
                 set_alarm: Callable[[float | None], None] = lambda delay: None,
                 name: str = "pl031") -> None:
        self.name = name
        self.irq = irq
        self.clock = clock
        self.set_alarm = set_alarm
        #: RTCDR - floor(clock()): what the guest sees minus what the clock says.
        self.tick_offset = int(start_time) - math.floor(clock())
        self.mr = 0
        self.lr = 0
        self.im = 0
        self.ris = 0

    # -- the count --------------------------------------------------------------------------
    def count(self) -> int:
        """RTCDR: whole seconds, wrapping at 32 bits."""
        return (self.tick_offset + math.floor(self.clock())) & MASK32

    def _update(self) -> None:
        self.irq.set(bool(self.ris & self.im))

    def _arm(self) -> None:
        """Ask for the alarm at the second RTCDR becomes RTCMR (the count wraps)."""
        now = self.clock()
        ticks = (self.mr - ((self.tick_offset + math.floor(now)) & MASK32)) & MASK32
        if ticks == 0:
            self.set_alarm(None)
            self.alarm()
        else:
            self.set_alarm(ticks - (now - math.floor(now)))

    def alarm(self) -> None:
        """The match timer expired: RTCRIS is set."""
        self.ris = 1
        self._update()

    # -- guest side -------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == RTCDR:
            return self.count()
        if offset == RTCMR:
            return self.mr
        if offset == RTCLR:
            return self.lr
        if offset == RTCCR:
            return 1                # always running
        if offset == RTCIMSC:
            return self.im
        if offset == RTCRIS:
            return self.ris
        if offset == RTCMIS:
            return self.ris & self.im
        if ID_BASE <= offset < SIZE:
            return (PERIPH_ID + PCELL_ID)[(offset - ID_BASE) >> 2]
        return 0                    # RTCICR is write-only; reserved space reads 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= MASK32
        if offset == RTCLR:
            self.lr = value
            self.tick_offset = (self.tick_offset + value - self.count()) & MASK32
            self._arm()
        elif offset == RTCMR:
            self.mr = value
            self._arm()
        elif offset == RTCIMSC:
            self.im = value & 1
            self._update()
        elif offset == RTCICR:
            self.ris &= ~value & 1
            self._update()
        # RTCCR: the RTC cannot be stopped; RTCDR/RTCRIS/RTCMIS are read-only.

    def reset(self) -> None:
        """A machine reset: registers cleared, the time kept (it is battery-backed)."""
        self.mr = self.lr = self.im = self.ris = 0
        self.set_alarm(None)
        self._update()

    # -- state ------------------------------------------------------------------------------
    def save(self) -> Pl031State:
        return Pl031State(1, self.tick_offset, self.mr, self.lr, self.im, self.ris)

    def restore(self, state: Pl031State) -> None:
        check_version(self.name, state.version)
        self.tick_offset, self.mr, self.lr = state.tick_offset, state.mr, state.lr
        self.im, self.ris = state.im & 1, state.ris & 1
        self._update()
        self._arm()
