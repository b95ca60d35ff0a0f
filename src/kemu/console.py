"""The host terminal as a serial console: QEMU's ``-serial mon:stdio`` behaviour.

Guest output goes to stdout.  Input from stdin goes to the guest; a terminal
is put in raw mode.  With ``mon:stdio`` (the default, as with QEMU's
``-nographic``) Ctrl-A is the escape key, whether stdin is a terminal or a
pipe: Ctrl-A x quits, Ctrl-A c switches between the console and the human
monitor (:mod:`kemu.monitor`), Ctrl-A Ctrl-A sends Ctrl-A, Ctrl-A h prints
help.  With ``-serial stdio`` every byte goes to the guest; with ``-monitor
stdio`` every byte goes to the monitor.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
import tty
from typing import Callable

CTRL_A = 0x01
HELP = (b"\r\nC-a h    print this help\r\nC-a x    exit emulator\r\n"
        b"C-a c    switch between console and monitor\r\nC-a C-a  sends C-a\r\n")


class EscapeParser:
    """Ctrl-A escape handling as a pure state machine over input bytes."""

    def __init__(self) -> None:
        self._escape = False

    def feed(self, data: bytes) -> tuple[bytes, list[str]]:
        """Returns (bytes for the guest, commands) with commands in {"quit", "help",
        "monitor"}."""
        out = bytearray()
        commands: list[str] = []
        for part in self.segments(data):
            if isinstance(part, str):
                commands.append(part)
            else:
                out += part
        return bytes(out), commands

    def segments(self, data: bytes) -> list[bytes | str]:
        """Input bytes and commands in the order typed (what follows Ctrl-A c goes
        to the other side)."""
        parts: list[bytes | str] = []
        out = bytearray()

        def command(name: str) -> None:
            if out:
                parts.append(bytes(out))
                out.clear()
            parts.append(name)
        for b in data:
            if self._escape:
                self._escape = False
                if b == CTRL_A:
                    out.append(CTRL_A)
                elif b in (ord("x"), ord("X")):
                    command("quit")
                    break
                elif b in (ord("h"), ord("H"), ord("?")):
                    command("help")
                elif b in (ord("c"), ord("C")):
                    command("monitor")
            elif b == CTRL_A:
                self._escape = True
            else:
                out.append(b)
        if out:
            parts.append(bytes(out))
        return parts


def write_stdout(data: bytes) -> None:
    try:
        os.write(sys.stdout.fileno(), data)
    except (BrokenPipeError, OSError):
        pass


#: Console bytes kept for a stdout that does not keep up; beyond it they are dropped.
OUTPUT_LIMIT = 1 << 20


class ConsoleOutput:
    """Guest console output to a file descriptor that may not be read (a pipe nobody
    drains): :meth:`write` never blocks.  Bytes wait in a buffer of at most
    ``limit`` bytes for a writer thread; beyond it they are dropped and counted,
    so the vCPU and the main loop never wait on the reader."""

    def __init__(self, fd: int, limit: int = OUTPUT_LIMIT) -> None:
        self.fd = fd
        self.limit = limit
        self.dropped = 0
        self._buffer = bytearray()
        self._cond = threading.Condition()
        self._closed = False
        self._broken = False
        self._thread: threading.Thread | None = None

    def write(self, data: bytes) -> None:
        with self._cond:
            if self._closed or self._broken:
                return
            room = self.limit - len(self._buffer)
            if len(data) > room:
                self.dropped += len(data) - max(room, 0)
                data = data[:max(room, 0)]
            self._buffer += data
            if self._thread is None:         # started on first use: after any fork
                self._thread = threading.Thread(target=self._main, name="console-out",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def _main(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._buffer or self._closed)
                if not self._buffer:
                    return
                # At most PIPE_BUF: a pipe takes such a write whole or not at all, so a
                # write blocked on a full pipe has written nothing the count misses.
                chunk = bytes(self._buffer[:select.PIPE_BUF])
            try:
                n = os.write(self.fd, chunk)
            except OSError:
                with self._cond:
                    self._broken = True     # EPIPE and the like: nobody will read it
                    self._buffer.clear()
                    self._cond.notify_all()
                return
            with self._cond:
                del self._buffer[:n]
                self._cond.notify_all()

    def close(self, patience: float = 1.0) -> int:
        """Let what is buffered out while the reader keeps taking it (giving up after
        ``patience`` seconds without progress); the bytes dropped in all."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while self._buffer and not self._broken:
                before = len(self._buffer)
                self._cond.wait(patience)
                if len(self._buffer) == before:
                    break
            self.dropped += len(self._buffer)
            self._buffer.clear()
            return self.dropped


class StdioConsole:
    """Feeds stdin to ``send`` (the guest's console) in a thread; calls ``on_quit``
    on Ctrl-A x.  With a ``monitor`` (a :class:`kemu.monitor.session.MonitorSession`),
    Ctrl-A c switches the input between the guest and the monitor, or, with
    ``monitor_only`` (``-monitor stdio``), all input goes to the monitor."""

    def __init__(self, send: Callable[[bytes], None], on_quit: Callable[[], None],
                 escapes: bool = True, monitor=None, monitor_only: bool = False) -> None:
        self.send = send
        self.on_quit = on_quit
        self.fd = sys.stdin.fileno()
        self.is_tty = os.isatty(self.fd)
        self.escapes = escapes and not monitor_only
        self.monitor = monitor
        self.monitor_only = monitor_only
        self.in_monitor = monitor_only
        self._monitor_opened = False
        self._parser = EscapeParser()
        self._saved = None
        self._thread = threading.Thread(target=self._main, name="stdin", daemon=True)

    def start(self) -> None:
        if self.is_tty:
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        if self.monitor_only:
            self._open_monitor()
        self._thread.start()

    def restore(self) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def _open_monitor(self) -> None:
        if self._monitor_opened:
            self.monitor.prompt()
        else:
            self._monitor_opened = True
            self.monitor.open()

    def _input(self, data: bytes) -> None:
        if self.in_monitor:
            self.monitor.feed(data)
        else:
            self.send(data)

    def _main(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                return
            if not data:
                return  # EOF: the guest keeps running, as with QEMU
            if not self.escapes:
                self._input(data)
                continue
            for part in self._parser.segments(data):
                if part == "help":
                    write_stdout(HELP)
                elif part == "monitor" and self.monitor is not None:
                    self.in_monitor = not self.in_monitor
                    if self.in_monitor:
                        self._open_monitor()
                    else:
                        write_stdout(b"\r\n")
                elif part == "quit":
                    self.on_quit()
                    return
                elif isinstance(part, bytes):
                    self._input(part)
