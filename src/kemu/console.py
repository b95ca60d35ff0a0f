"""The host terminal as a serial console: QEMU's ``-serial mon:stdio`` behaviour.

Guest output goes to stdout.  Input from stdin goes to the guest; a terminal
is put in raw mode.  With ``mon:stdio`` (the default, as with QEMU's
``-nographic``) Ctrl-A is the escape key, whether stdin is a terminal or a
pipe: Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A, Ctrl-A h prints help.
With ``-serial stdio`` every byte goes to the guest.
"""

from __future__ import annotations

import os
import sys
import termios
import threading
import tty
from typing import Callable

CTRL_A = 0x01
HELP = (b"\r\nC-a h    print this help\r\nC-a x    exit emulator\r\n"
        b"C-a C-a  sends C-a\r\n")


class EscapeParser:
    """Ctrl-A escape handling as a pure state machine over input bytes."""

    def __init__(self) -> None:
        self._escape = False

    def feed(self, data: bytes) -> tuple[bytes, list[str]]:
        """Returns (bytes for the guest, commands) with commands in {"quit", "help"}."""
        out = bytearray()
        commands: list[str] = []
        for b in data:
            if self._escape:
                self._escape = False
                if b == CTRL_A:
                    out.append(CTRL_A)
                elif b in (ord("x"), ord("X")):
                    commands.append("quit")
                    break
                elif b in (ord("h"), ord("H"), ord("?")):
                    commands.append("help")
            elif b == CTRL_A:
                self._escape = True
            else:
                out.append(b)
        return bytes(out), commands


def write_stdout(data: bytes) -> None:
    try:
        os.write(sys.stdout.fileno(), data)
    except (BrokenPipeError, OSError):
        pass


class StdioConsole:
    """Feeds stdin to ``send`` in a thread; calls ``on_quit`` on Ctrl-A x."""

    def __init__(self, send: Callable[[bytes], None], on_quit: Callable[[], None],
                 escapes: bool = True) -> None:
        self.send = send
        self.on_quit = on_quit
        self.fd = sys.stdin.fileno()
        self.is_tty = os.isatty(self.fd)
        self.escapes = escapes
        self._parser = EscapeParser()
        self._saved = None
        self._thread = threading.Thread(target=self._main, name="stdin", daemon=True)

    def start(self) -> None:
        if self.is_tty:
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        self._thread.start()

    def restore(self) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def _main(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                return
            if not data:
                return  # EOF: the guest keeps running, as with QEMU
            if self.escapes:
                data, commands = self._parser.feed(data)
                if "help" in commands:
                    write_stdout(HELP)
                if data:
                    self.send(data)
                if "quit" in commands:
                    self.on_quit()
                    return
            else:
                self.send(data)
