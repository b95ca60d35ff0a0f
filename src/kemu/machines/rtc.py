"""QEMU's ``-rtc [base=utc|localtime|DATE][,clock=host|rt|vm][,driftfix=none|slew]``.

The boards' real-time clocks (the PL031 on virt, the CMOS RTC on microvm)
read an :class:`RtcClock`: the time the guest's RTC starts at (``base``)
advanced by the chosen clock (``clock``), as QEMU's softmmu/rtc.c does:

* ``base=utc`` (default): the host's UTC time; ``base=localtime``: the
  host's local time, shown as if it were UTC (what Windows guests expect);
  ``base=2006-06-17T16:01:21`` or ``base=2006-06-17``: that date (UTC).
* ``clock=host`` (default): the host's wall clock (it follows host time
  changes); ``clock=rt``: the host's monotonic clock; ``clock=vm``: the
  guest's virtual clock, which stops while the machine is paused.
* ``driftfix`` is accepted for QEMU command lines; kemu does not slew
  (QEMU applies it to the x86 CMOS RTC's periodic interrupt only).
"""

from __future__ import annotations

import calendar
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kemu.errors import ConfigError

BASES = ("utc", "localtime")
CLOCKS = ("host", "rt", "vm")


@dataclass(frozen=True)
class RtcConfig:
    #: "utc", "localtime", or a date as QEMU spells it.
    base: str = "utc"
    clock: str = "host"
    driftfix: str = "none"


def parse_date(text: str) -> int:
    """QEMU's ``YYYY-MM-DD[THH:MM:SS]`` as UTC epoch seconds."""
    for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
        try:
            return calendar.timegm(time.strptime(text, fmt))
        except ValueError:
            continue
    raise ConfigError(f"-rtc base={text}: invalid date format "
                      "(expected utc, localtime or YYYY-MM-DD[THH:MM:SS])")


class RtcClock:
    """The seconds an RTC counts from: ``start_time`` is where the guest's RTC
    begins (epoch seconds), ``now()`` the clock it advances with; only
    ``clock=vm`` stops between :meth:`pause` and :meth:`resume`."""

    def __init__(self, config: RtcConfig = RtcConfig(), *,
                 wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 utc_offset: Callable[[float], int] | None = None) -> None:
        self.config = config
        self._wall = wall
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._hidden = 0.0                      # vm: seconds spent paused
        self._paused_at: float | None = None
        host = wall()
        if config.base == "utc":
            self.start_time = host
        elif config.base == "localtime":
            offset = utc_offset(host) if utc_offset else time.localtime(host).tm_gmtoff
            self.start_time = host + offset
        else:
            self.start_time = float(parse_date(config.base))
        #: The clock's reading when the guest's RTC reads start_time.
        self.origin = self.now()

    def now(self) -> float:
        """The clock's reading in seconds (its epoch is its own)."""
        if self.config.clock == "host":
            return self._wall()
        t = self._monotonic()
        if self.config.clock == "rt":
            return t
        with self._lock:
            paused_at = self._paused_at
            return (paused_at if paused_at is not None else t) - self._hidden

    def time(self) -> float:
        """What the guest's RTC reads now (epoch seconds)."""
        return self.start_time + self.now() - self.origin

    def pause(self) -> None:
        with self._lock:
            if self._paused_at is None:
                self._paused_at = self._monotonic()

    def resume(self) -> None:
        with self._lock:
            if self._paused_at is not None:
                self._hidden += self._monotonic() - self._paused_at
                self._paused_at = None


class AlarmTimer:
    """A host timer for an RTC's alarm: ``set(delay | None)``; ``fire`` runs
    under ``lock`` on a timer thread."""

    def __init__(self, fire: Callable[[], None], lock, name: str = "rtc-alarm") -> None:
        self._fire = fire
        self._lock = lock
        self._name = name
        self._timer: threading.Timer | None = None

    def set(self, delay: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if delay is not None:
            self._timer = threading.Timer(max(0.0, delay), self._expired)
            self._timer.name = self._name
            self._timer.daemon = True
            self._timer.start()

    def _expired(self) -> None:
        with self._lock:
            self._fire()

    def cancel(self) -> None:
        self.set(None)
