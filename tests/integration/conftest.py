import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kemu.errors import GuestBuildError

KEMU = [sys.executable, "-m", "kemu.cli"]


@pytest.fixture(scope="session")
def guest():
    """The default aarch64 guest, built into the cache on first use."""
    from kemu.guest.debian import default_guest
    try:
        return default_guest("aarch64", show_progress=False)
    except GuestBuildError as e:
        pytest.skip(f"cannot build the default guest here: {e}")


class Console:
    """A running ``kemu`` process driven through its serial console on stdio."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(KEMU + args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.buffer = b""
        self._lock = threading.Lock()
        self._pos = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while True:
            data = self.proc.stdout.read1(4096)
            if not data:
                return
            with self._lock:
                self.buffer += data

    def expect(self, pattern: bytes, timeout: float = 60.0) -> re.Match:
        regex = re.compile(pattern)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                m = regex.search(self.buffer, self._pos)
                if m:
                    self._pos = m.end()
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} not seen; console so far:\n"
                             f"{self.buffer[-3000:].decode(errors='replace')}")

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def run(self, command: str, timeout: float = 60.0) -> str:
        """Run a shell command in the guest; return its output."""
        self.send(f"{command}; echo __RC=$?__\n")
        start = self._pos
        m = self.expect(rb"__RC=(\d+)__", timeout)
        with self._lock:
            out = self.buffer[start:m.start()].decode(errors="replace")
        # drop the echoed command line
        out = out.split("\n", 1)[1] if "\n" in out else ""
        assert m.group(1) == b"0", f"{command!r} failed: {out}"
        return out.replace("\r", "")

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    @property
    def stderr(self) -> str:
        return self.proc.stderr.read().decode(errors="replace")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def console_factory():
    consoles = []

    def start(*args: str) -> Console:
        c = Console(list(args))
        consoles.append(c)
        return c

    yield start
    for c in consoles:
        c.close()
