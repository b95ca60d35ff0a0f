"""Helpers for tests that drive a real kemu process from the host side: a raw QMP
client (bytes on a UNIX socket, no library in between) and waits on files."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

KEMU = [sys.executable, "-m", "kemu.cli"]


class KemuEnded(AssertionError):
    """The kemu process ended while a test waited for something from it."""


def wait_for(predicate, timeout: float = 60.0, what: str = "condition",
             proc: subprocess.Popen | None = None):
    """Poll ``predicate`` until it returns something true; fail after ``timeout``
    or as soon as ``proc`` has ended."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise KemuEnded(f"kemu ended (status {proc.returncode}) before {what}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    wait_for(lambda: path.is_socket(), timeout, f"socket {path}", proc)


class RawQmp:
    """A QMP client over a UNIX socket that reads replies and events as lines."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buf = b""
        self.events: list[dict] = []
        self.greeting = self.read()
        assert "QMP" in self.greeting

    def read(self) -> dict:
        while b"\n" not in self._buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"QMP connection closed (pending {self._buf[:200]!r})")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def send_raw(self, data: bytes) -> dict:
        """Send bytes; the next reply that is not an event."""
        self.sock.sendall(data)
        while True:
            msg = self.read()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def execute(self, name: str, arguments: dict | None = None) -> dict:
        msg = {"execute": name}
        if arguments is not None:
            msg["arguments"] = arguments
        return self.send_raw(json.dumps(msg).encode() + b"\n")

    def negotiate(self) -> "RawQmp":
        assert self.execute("qmp_capabilities") == {"return": {}}
        return self

    def event(self, name: str) -> dict:
        """Wait for the event ``name`` (or take it if it already came)."""
        while True:
            for msg in self.events:
                if msg["event"] == name:
                    self.events.remove(msg)
                    return msg
            msg = self.read()
            if "event" in msg:
                self.events.append(msg)

    def close(self) -> None:
        self.sock.close()


def quit_and_wait(qmp: RawQmp, proc: subprocess.Popen) -> None:
    """QMP ``quit``; kemu must exit with status 0."""
    assert qmp.execute("quit") == {"return": {}}
    assert proc.wait(30) == 0


def end(proc: subprocess.Popen) -> None:
    """Kill ``proc`` if it is still running (test clean-up)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
