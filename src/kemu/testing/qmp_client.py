"""A minimal synchronous QMP client for tests and benchmarks (commands in order, events kept).

QEMU's own ``qemu.qmp`` is asyncio; this one suits a test that drives two
processes step by step, and it can pass a descriptor with a command
(SCM_RIGHTS), as libvirt does for ``getfd``.
"""

from __future__ import annotations

import array
import json
import socket
import time
from pathlib import Path


class QmpClient:
    def __init__(self, path: str | Path, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb", buffering=0)
        self.events: list[dict] = []
        json.loads(self.file.readline())            # the greeting
        self.execute("qmp_capabilities")

    def _reply(self) -> dict:
        while True:
            message = json.loads(self.file.readline())
            if "event" in message:
                self.events.append(message)
            else:
                return message

    def command(self, name: str, **args) -> dict:
        """The reply (``return`` or ``error``) to one command."""
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        return self._reply()

    def send_fd(self, fd: int, name: str, **args) -> dict:
        """A command with a descriptor attached (SCM_RIGHTS), as libvirt sends getfd."""
        data = json.dumps({"execute": name, "arguments": args}).encode() + b"\n"
        self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", [fd]).tobytes())])
        return self._reply()

    def execute(self, name: str, **args):
        """The command's ``return``; an AssertionError with the reply otherwise."""
        reply = self.command(name, **args)
        assert "return" in reply, reply
        return reply["return"]

    def wait_migration(self, statuses, timeout: float = 120.0) -> dict:
        """query-migrate until its status is one of ``statuses``."""
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.execute("query-migrate")
            if info.get("status") in statuses:
                return info
            time.sleep(0.02)
        raise AssertionError(f"migration not {statuses}: {info}")

    def close(self) -> None:
        self.sock.close()
