"""The PC's CMOS real-time clock (Motorola MC146818A), showing the host's time.

Ports 0x70 (index; bit 7 is the NMI mask, kept but not acted on) and 0x71
(data) on a PC: offsets 0 and 1 here.  Registers from the MC146818A
datasheet ("Address map") and Linux's include/linux/mc146818rtc.h:

======  ===========================  ======  =============================
0x00    seconds                      0x0A    register A (UIP, divider, rate)
0x02    minutes                      0x0B    register B (SET, PIE, AIE, UIE,
0x04    hours (bit 7 = PM in 12h)            SQWE, DM, 24/12, DSE)
0x06    day of week (1 = Sunday)     0x0C    register C (IRQF, PF, AF, UF)
0x07    day of month                 0x0D    register D (VRT)
0x08    month                        0x32    century (IBM PC convention)
0x09    year (two digits)            0x0E-   battery-backed RAM
======  ===========================  ======  =============================

The time shown is the host's UTC time plus an offset: writing a time
register sets the offset so the guest reads back what it wrote (as
``hwclock --systohc`` expects), without touching the host clock.  Values
are BCD unless register B's DM bit selects binary, and 12-hour with a PM
flag unless its 24/12 bit is set, converted on every access.  The update
cycle is not modelled: UIP always reads 0, so a reader never waits.
Alarm and periodic interrupts are not generated (register C reads 0).
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable
from dataclasses import dataclass

INDEX = 0
DATA = 1

RTC_SECONDS = 0x00
RTC_SECONDS_ALARM = 0x01
RTC_MINUTES = 0x02
RTC_MINUTES_ALARM = 0x03
RTC_HOURS = 0x04
RTC_HOURS_ALARM = 0x05
RTC_DAY_OF_WEEK = 0x06
RTC_DAY_OF_MONTH = 0x07
RTC_MONTH = 0x08
RTC_YEAR = 0x09
RTC_REG_A = 0x0A
RTC_REG_B = 0x0B
RTC_REG_C = 0x0C
RTC_REG_D = 0x0D
RTC_CENTURY = 0x32
NVRAM_SIZE = 128

RTC_UIP = 0x80          # register A: update in progress
REG_A_DEFAULT = 0x26    # 32.768 kHz time base, 1.024 kHz periodic rate

RTC_SET = 0x80          # register B
RTC_PIE = 0x40
RTC_AIE = 0x20
RTC_UIE = 0x10
RTC_SQWE = 0x08
RTC_DM_BINARY = 0x04
RTC_24H = 0x02
RTC_DST_EN = 0x01
REG_B_DEFAULT = RTC_24H

RTC_VRT = 0x80          # register D: valid RAM and time
NMI_DISABLE = 0x80      # index port bit 7

_TIME_REGS = (RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH,
              RTC_MONTH, RTC_YEAR, RTC_CENTURY)


def to_bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


@dataclass
class CmosState:
    version: int
    index: int
    nmi_disabled: bool
    ram: bytes
    offset: float


class CmosRtc:
    """MC146818A with 128 bytes of CMOS; ``now()`` gives the host's epoch seconds."""

    def __init__(self, now: Callable[[], float] = time.time, name: str = "cmos-rtc") -> None:
        self.name = name
        self.now = now
        self.ram = bytearray(NVRAM_SIZE)
        self.ram[RTC_REG_A] = REG_A_DEFAULT
        self.ram[RTC_REG_B] = REG_B_DEFAULT
        self.ram[RTC_REG_D] = RTC_VRT
        self.index = 0
        self.nmi_disabled = False
        #: Seconds added to the host's time: what the guest set minus what the host said.
        self.offset = 0.0

    # -- time <-> registers ------------------------------------------------------------------
    def guest_time(self) -> int:
        return int(self.now() + self.offset)

    def _encode(self, reg: int, t: time.struct_time) -> int:
        b = self.ram[RTC_REG_B]
        if reg == RTC_HOURS:
            hour = t.tm_hour
            pm = 0
            if not b & RTC_24H:
                pm = 0x80 if hour >= 12 else 0
                hour = hour % 12 or 12
            value = hour
        else:
            value = {RTC_SECONDS: t.tm_sec, RTC_MINUTES: t.tm_min,
                     RTC_DAY_OF_WEEK: (t.tm_wday + 1) % 7 + 1,    # Python: Monday = 0
                     RTC_DAY_OF_MONTH: t.tm_mday, RTC_MONTH: t.tm_mon,
                     RTC_YEAR: t.tm_year % 100, RTC_CENTURY: t.tm_year // 100}[reg]
            pm = 0
        value = min(value, 59) if reg == RTC_SECONDS else value   # no leap seconds
        return (value if b & RTC_DM_BINARY else to_bcd(value)) | pm

    def _decode(self, value: int, hours: bool = False) -> int:
        b = self.ram[RTC_REG_B]
        pm = False
        if hours and not b & RTC_24H:
            pm = bool(value & 0x80)
            value &= 0x7F
        value = value if b & RTC_DM_BINARY else from_bcd(value)
        if hours and not b & RTC_24H:
            value = (value % 12) + (12 if pm else 0)
        return value

    def _set_field(self, reg: int, value: int) -> None:
        """The guest wrote a time register: move the offset so it reads back."""
        t = time.gmtime(self.guest_time())
        fields = [t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec]
        if reg == RTC_SECONDS:
            fields[5] = min(self._decode(value), 59)
        elif reg == RTC_MINUTES:
            fields[4] = min(self._decode(value), 59)
        elif reg == RTC_HOURS:
            fields[3] = min(self._decode(value, hours=True), 23)
        elif reg == RTC_DAY_OF_MONTH:
            fields[2] = max(1, min(self._decode(value), 31))
        elif reg == RTC_MONTH:
            fields[1] = max(1, min(self._decode(value), 12))
        elif reg == RTC_YEAR:
            fields[0] = fields[0] // 100 * 100 + min(self._decode(value), 99)
        elif reg == RTC_CENTURY:
            fields[0] = min(self._decode(value), 99) * 100 + fields[0] % 100
        else:
            return          # day of week follows from the date
        # Clamp the day to the month (31 February becomes the 28th or 29th).
        fields[2] = min(fields[2], calendar.monthrange(fields[0], fields[1])[1])
        wanted = calendar.timegm((*fields, 0, 0, 0))
        self.offset += wanted - self.guest_time()

    # -- guest side ------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == INDEX:
            return 0xFF         # the index port is write-only on a PC
        reg = self.index
        if reg in _TIME_REGS:
            return self._encode(reg, time.gmtime(self.guest_time()))
        if reg == RTC_REG_A:
            return self.ram[RTC_REG_A] & ~RTC_UIP
        if reg == RTC_REG_C:
            value, self.ram[RTC_REG_C] = self.ram[RTC_REG_C], 0
            return value
        if reg == RTC_REG_D:
            return RTC_VRT
        return self.ram[reg]

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == INDEX:
            self.index = value & 0x7F
            self.nmi_disabled = bool(value & NMI_DISABLE)
            return
        reg = self.index
        if reg in _TIME_REGS:
            self._set_field(reg, value)
        elif reg == RTC_REG_A:
            self.ram[RTC_REG_A] = value & ~RTC_UIP
        elif reg in (RTC_REG_C, RTC_REG_D):
            pass                # read-only
        else:
            self.ram[reg] = value

    # -- state ------------------------------------------------------------------------------------
    def save(self) -> CmosState:
        return CmosState(1, self.index, self.nmi_disabled, bytes(self.ram), self.offset)

    def restore(self, state: CmosState) -> None:
        from kemu.state import check_version
        check_version(self.name, state.version)
        self.index, self.nmi_disabled = state.index & 0x7F, state.nmi_disabled
        self.ram = bytearray(state.ram[:NVRAM_SIZE].ljust(NVRAM_SIZE, b"\0"))
        self.offset = state.offset
