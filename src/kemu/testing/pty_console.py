"""A guest's serial console through the pty libvirt names (as ``virsh console`` uses it):
a reader thread keeps everything the guest printed; :meth:`PtyConsole.expect` waits
for a pattern, :meth:`PtyConsole.run` runs a shell command and returns its output."""

from __future__ import annotations

import os
import re
import select
import threading
import time
import tty


class PtyConsole:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd)
        self.buffer = bytearray()
        self.cond = threading.Condition()
        self.pos = 0
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.fd], [], [], 1.0)
                data = os.read(self.fd, 4096) if ready else b""
            except OSError:
                return
            if ready and not data:
                return
            with self.cond:
                self.buffer += data
                self.cond.notify_all()

    def expect(self, pattern: bytes, timeout: float = 120.0) -> re.Match:
        """The first match of ``pattern`` after the previous one; AssertionError (with
        the console's last output) when none comes within ``timeout`` seconds."""
        regex = re.compile(pattern, re.S)
        with self.cond:
            ok = self.cond.wait_for(lambda: regex.search(self.buffer, self.pos), timeout)
            m = regex.search(self.buffer, self.pos)
            if not ok or m is None:
                raise AssertionError(f"no {pattern!r} on the console within {timeout} s; "
                                     f"last output: {bytes(self.buffer[-400:])!r}")
            self.pos = m.end()
            return m

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def run(self, command: str, timeout: float = 60.0, attempts: int = 3) -> str:
        """Run ``command`` in the guest's shell; its output (AssertionError if it fails).

        A line typed while the guest is busy can lose characters on the way in (seen
        with QEMU's 16550 under nested TCG: the shell got ``echo B`` and waited for
        the rest); the command then never answers.  After a share of ``timeout``
        without an answer the line is abandoned with Ctrl-C and typed again, up to
        ``attempts`` times, each with its own token."""
        for attempt in range(attempts):
            token = f"{time.monotonic_ns():x}"
            self.send(f"echo B{token}''B; {command}; echo E{token}''E=$?\n")
            try:
                m = self.expect(rb"B" + token.encode() + rb"B\r?\n(.*?)E" + token.encode()
                                + rb"E=(\d+)", timeout / attempts)
                break
            except AssertionError:
                if attempt == attempts - 1:
                    raise
                self.send("\x03")
        assert m.group(2) == b"0", f"{command!r} failed: {m.group(1)!r}"
        return m.group(1).decode(errors="replace").replace("\r\n", "\n")

    def tail(self, size: int = 1500) -> str:
        with self.cond:
            return bytes(self.buffer[-size:]).decode(errors="replace")

    def close(self) -> None:
        os.close(self.fd)
