"""Host side of a serial port: byte output to a sink, input with flow control.

Input from the host is queued here and handed to the UART only while the
guest's driver is ready to receive (the device says how many bytes it can
take), so input typed or piped before the guest listens is kept, not lost.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Protocol


class SerialDevice(Protocol):
    def can_receive(self) -> int: ...

    def receive(self, data: bytes) -> int: ...


class SerialBackend:
    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink
        self._taps: list[Callable[[bytes], None]] = []
        self._pending: deque[bytes] = deque()
        self.device: SerialDevice | None = None

    # guest -> host
    def write(self, data: bytes) -> None:
        self._sink(data)
        for tap in self._taps:
            tap(data)

    def add_tap(self, tap: Callable[[bytes], None]) -> None:
        self._taps.append(tap)

    # host -> guest
    def send(self, data: bytes) -> None:
        if data:
            self._pending.append(bytes(data))
        self.pump()

    def unreceive(self, data: bytes) -> None:
        """Take back input the device accepted but the guest never read (it cleared its
        receive FIFO): it goes first again, so nothing typed is lost."""
        if data:
            self._pending.appendleft(bytes(data))

    @property
    def pending(self) -> int:
        return sum(map(len, self._pending))

    def pump(self) -> None:
        """Move queued input into the device as far as it can take it."""
        dev = self.device
        while self._pending and dev is not None:
            room = dev.can_receive()
            if room <= 0:
                return
            chunk = self._pending[0]
            n = dev.receive(chunk[:room])
            if n <= 0:
                return
            if n < len(chunk):
                self._pending[0] = chunk[n:]
            else:
                self._pending.popleft()
