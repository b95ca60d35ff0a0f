"""A kemu (or QEMU) process driven through its serial console on stdio, for tests
and benchmarks; its waits count the CPU time the process used, so that they
hold on a loaded host."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

#: The command that runs kemu from this Python.
KEMU = [sys.executable, "-m", "kemu.cli"]

#: A wait in :meth:`Console.expect` counts the seconds kemu ran, not the seconds
#: that passed: on a loaded host a process gets a share of a CPU, and a guest
#: that boots in 3 s alone takes much longer.  It still ends after this many
#: times its timeout of wall time (a guest that waits for something that never
#: comes uses no CPU).
MAX_SLOWDOWN = 5.0
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time ``pid`` has used (all its threads), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK     # utime, stime


class Console:
    """A running ``kemu`` process (or ``command``, say QEMU) driven through its
    serial console on stdio."""

    def __init__(self, args: list[str], command: list[str] = KEMU):
        self.proc = subprocess.Popen(command + args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.buffer = b""
        self.errors = b""                  # kemu's stderr so far
        self._lock = threading.Lock()
        self._pos = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read_errors, daemon=True)
        self._err_reader.start()

    def _read(self):
        while True:
            data = self.proc.stdout.read1(4096)
            if not data:
                return
            with self._lock:
                self.buffer += data

    def _read_errors(self):
        while data := self.proc.stderr.read1(4096):
            with self._lock:
                self.errors += data

    def expect(self, pattern: bytes, timeout: float = 60.0) -> re.Match:
        """Wait until the console shows ``pattern``; fail once kemu has run for
        ``timeout`` seconds of CPU without it (at most MAX_SLOWDOWN times that of
        wall time), or has ended."""
        regex = re.compile(pattern)
        start, cpu0 = time.monotonic(), cpu_seconds(self.proc.pid)
        while True:
            with self._lock:
                m = regex.search(self.buffer, self._pos)
                if m:
                    self._pos = m.end()
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            waited = time.monotonic() - start
            if waited >= timeout and (cpu_seconds(self.proc.pid) - cpu0 >= timeout
                                      or waited >= timeout * MAX_SLOWDOWN):
                break
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} not seen; console so far:\n"
                             f"{self.buffer[-3000:].decode(errors='replace')}\n"
                             f"kemu's stderr so far:\n{self.errors[-2000:].decode(errors='replace')}")

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
        """All of kemu's stderr, once it has ended."""
        self._err_reader.join(60)
        return self.errors.decode(errors="replace")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
