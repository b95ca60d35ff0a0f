"""One human-monitor conversation over a byte stream: QEMU's banner, the
``(qemu)`` prompt, a small line editor (echo, backspace), each line run
through the HMP table (:class:`kemu.monitor.hmp.Hmp`).  Sans-I/O: bytes in
through :meth:`MonitorSession.feed`, bytes out through ``write``."""

from __future__ import annotations

from typing import Callable

from kemu.monitor.hmp import Hmp
from kemu.qmp.commands import package

PROMPT = b"(qemu) "
BACKSPACE = (0x08, 0x7F)


def banner() -> bytes:
    return f"{package()} monitor - type 'help' for more information\r\n".encode()


class MonitorSession:
    """The monitor on one terminal or socket client."""

    def __init__(self, hmp: Hmp, write: Callable[[bytes], None], echo: bool = True) -> None:
        self.hmp = hmp
        self.write = write
        self.echo = echo
        self._line = bytearray()
        self._last_cr = False

    def open(self) -> None:
        """QEMU's greeting and the first prompt."""
        self.write(banner() + PROMPT)

    def prompt(self) -> None:
        self.write(b"\r\n" + PROMPT if self._line else PROMPT)

    def feed(self, data: bytes) -> None:
        for b in data:
            if b == 0x0A and self._last_cr:       # CR LF: one line end
                self._last_cr = False
                continue
            self._last_cr = b == 0x0D
            if b in (0x0A, 0x0D):
                line = self._line.decode(errors="replace")
                self._line.clear()
                if self.echo:
                    self.write(b"\r\n")
                out = self.hmp.execute(line).encode()
                quitting = line.split()[:1] in (["quit"], ["q"])
                self.write(out if quitting else out + PROMPT)
            elif b in BACKSPACE:
                if self._line:
                    del self._line[-1]
                    if self.echo:
                        self.write(b"\b \b")
            elif b >= 0x20:
                self._line.append(b)
                if self.echo:
                    self.write(bytes([b]))
