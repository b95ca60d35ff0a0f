"""The ARMv8 generic timer of one CPU (virtual and physical EL1 timers).

Semantics from the Arm Architecture Reference Manual for A-profile, chapter
D11 "The Generic Timer in AArch64 state": CNTx_CTL_EL0 has ENABLE (bit 0),
IMASK (bit 1) and the read-only ISTATUS (bit 2); the timer condition is met
when the counter reaches CNTx_CVAL_EL0; CNTx_TVAL_EL0 is a signed 32-bit view
of ``CVAL - counter``.  The counter comes from a host clock handed in, so the
guest's time runs at wall-clock speed.

The model is pure: the CPU accelerator forwards register writes and asks for
the next deadline; the output drives a PPI of the interrupt controller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from kemu.devices.base import IrqLine
from kemu.state import check_version

CTL_ENABLE = 1 << 0
CTL_IMASK = 1 << 1
CTL_ISTATUS = 1 << 2

#: Counter frequency in Hz: 62.5 MHz, QEMU's and Unicorn's (16 ns per tick).
CNTFRQ = 62_500_000
NS_PER_TICK = 16


def host_counter() -> int:
    """The system counter as Unicorn's CPU reads it (CLOCK_MONOTONIC / 16 ns)."""
    return time.monotonic_ns() // NS_PER_TICK


@dataclass
class TimerState:
    version: int
    ctl: int
    cval: int


class GenericTimer:
    """One timer (e.g. the EL1 virtual timer) with its interrupt output."""

    def __init__(self, irq: IrqLine, counter: Callable[[], int] = host_counter,
                 offset: int = 0, name: str = "vtimer") -> None:
        self.name = name
        self.irq = irq
        self.counter = counter
        #: CNTVOFF: the timer compares against ``counter() - offset``.
        self.offset = offset
        self.ctl = 0
        self.cval = 0

    def count(self) -> int:
        return self.counter() - self.offset

    def istatus(self) -> bool:
        return bool(self.ctl & CTL_ENABLE) and self.count() >= self.cval

    def ctl_value(self) -> int:
        """CNTx_CTL_EL0 as the guest reads it, ISTATUS included."""
        return (self.ctl & (CTL_ENABLE | CTL_IMASK)) | (CTL_ISTATUS if self.istatus() else 0)

    def write_ctl(self, value: int) -> None:
        self.ctl = value & (CTL_ENABLE | CTL_IMASK)
        self.update()

    def write_cval(self, value: int) -> None:
        self.cval = value & ((1 << 64) - 1)
        self.update()

    def write_tval(self, value: int) -> None:
        tval = value & 0xFFFFFFFF
        if tval & 0x80000000:
            tval -= 1 << 32
        self.cval = (self.count() + tval) & ((1 << 64) - 1)
        self.update()

    def update(self) -> None:
        """Recompute the interrupt output from the current counter value."""
        self.irq.set(self.istatus() and not self.ctl & CTL_IMASK)

    def deadline_counter(self) -> int | None:
        """Counter value at which the output will rise, or None if never."""
        if not self.ctl & CTL_ENABLE or self.ctl & CTL_IMASK:
            return None
        return self.cval + self.offset

    def save(self) -> TimerState:
        return TimerState(1, self.ctl, self.cval)

    def restore(self, state: TimerState) -> None:
        check_version(self.name, state.version)
        self.ctl, self.cval = state.ctl, state.cval
        self.update()
