"""Watching a guest's console for lines that end the machine (any board).

A board taps its console backend with :class:`ConsoleWatcher` and a table
of markers; the callback gets the matched line from the marker on, once the
line is complete, so ``Kernel panic - not syncing: VFS: Unable to mount
root fs`` reaches the outcome message whole.  Output may be split anywhere.
"""

from __future__ import annotations

from collections.abc import Callable

PANIC_MARK = b"Kernel panic - not syncing"
#: Linux's kernel_halt() (reboot(2) HALT, or POWER_OFF with no power-off driver).
HALT_MARK = b"reboot: System halted"
#: Linux's kernel_power_off(), printed before the power-off driver is called.
POWER_DOWN_MARK = b"reboot: Power down"
LINE_LIMIT = 4096


class ConsoleWatcher:
    """Calls ``markers[m](line)`` for each complete console line containing ``m``."""

    def __init__(self, markers: dict[bytes, Callable[[str], None]]) -> None:
        self.markers = markers
        self._line = b""

    def feed(self, data: bytes) -> None:
        buf = self._line + data
        *lines, rest = buf.split(b"\n")
        self._line = rest[-LINE_LIMIT:]
        for line in lines:
            for mark, callback in self.markers.items():
                i = line.find(mark)
                if i >= 0:
                    callback(line[i:].decode(errors="replace").strip())
                    break
