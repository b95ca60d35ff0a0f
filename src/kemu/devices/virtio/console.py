"""virtio-console (VIRTIO 1.2, section 5.3 "Console Device") with one port.

Without VIRTIO_CONSOLE_F_MULTIPORT the device has exactly one port, port 0,
on receiveq (0) and transmitq (1) (5.3.2), and Linux makes it a console,
``hvc0``.  VIRTIO_CONSOLE_F_EMERG_WRITE is offered: a byte written to
``emerg_wr`` in the configuration space is output at once (5.3.4, 5.3.6.1),
which works even before the driver has set up its queues.

The host side is a :class:`~kemu.backends.serial.SerialBackend`: transmitted
bytes go to ``backend.write``; the device is the backend's ``device``
(``can_receive`` / ``receive``), so host input waits in the backend until the
guest posts receive buffers, and the backend is pumped when it does.
"""

from __future__ import annotations

import logging
import struct
from collections import deque

from kemu.backends.serial import SerialBackend
from kemu.devices.virtio import VIRTIO_ID_CONSOLE, VirtioDevice, VirtioSession
from kemu.devices.virtio.queue import DescriptorChain, VirtioError, Virtqueue
from kemu.errors import MemoryAccessError

log = logging.getLogger(__name__)

# Feature bits (5.3.3).
VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

RX_QUEUE = 0
TX_QUEUE = 1
CONFIG = struct.Struct("<HHII")      # cols, rows, max_nr_ports, emerg_wr
EMERG_WR_OFFSET = 8
DEFAULT_QUEUE_SIZE = 64
#: Bytes copied out of guest memory at once when transmitting a chain.
TX_PIECE = 64 << 10


class VirtioConsole(VirtioDevice):
    """One console port whose host side is a :class:`SerialBackend`."""

    device_id = VIRTIO_ID_CONSOLE

    def __init__(self, backend: SerialBackend, *, queue_size: int = DEFAULT_QUEUE_SIZE,
                 name: str = "virtio-console") -> None:
        self.name = name
        super().__init__([queue_size, queue_size])
        self.backend = backend
        backend.device = self
        #: Receive chains popped and not yet filled.
        self._rx_chains: deque[DescriptorChain] = deque()

    def device_features(self) -> int:
        return 1 << VIRTIO_CONSOLE_F_EMERG_WRITE

    def config_space(self) -> bytes:
        return CONFIG.pack(0, 0, 1, 0)

    def config_write(self, offset: int, data: bytes) -> None:
        if offset == EMERG_WR_OFFSET and len(data) == 4:
            # 5.3.6.1: the low byte of emerg_wr is one character to output
            self.backend.write(data[:1])

    def activate(self, session: VirtioSession) -> None:
        super().activate(session)
        self._rx_chains.clear()

    def reset(self) -> None:
        super().reset()
        self._rx_chains.clear()

    def queue_notify(self, index: int, queue: Virtqueue) -> None:
        session = self.session
        if session is None:
            return
        if index == TX_QUEUE:
            self._transmit(session, queue)
        elif index == RX_QUEUE:
            self.backend.pump()

    def _transmit(self, session: VirtioSession, queue: Virtqueue) -> None:
        done = False
        while (chain := queue.pop()) is not None:
            total = chain.readable_len
            for offset in range(0, total, TX_PIECE):
                self.backend.write(chain.read(session.memory, offset, min(TX_PIECE, total - offset)))
            queue.push(chain, 0)
            done = True
        if done:
            session.signal_used(TX_QUEUE)

    # -- SerialDevice: input from the host --------------------------------------------------------
    def _session(self) -> VirtioSession | None:
        s = self.session
        return s if s is not None and s.active else None

    def can_receive(self) -> int:
        session = self._session()
        if session is None:
            return 0
        queue = session.queues[RX_QUEUE]
        try:
            while len(self._rx_chains) < queue.size and (chain := queue.pop()) is not None:
                if chain.writable_len:
                    self._rx_chains.append(chain)
                else:
                    queue.push(chain, 0)
        except VirtioError as exc:
            session.device_error(str(exc))
            return 0
        return sum(c.writable_len for c in self._rx_chains)

    def receive(self, data: bytes) -> int:
        session = self._session()
        if session is None:
            return 0
        queue = session.queues[RX_QUEUE]
        taken = 0
        try:
            while taken < len(data) and self._rx_chains:
                chain = self._rx_chains.popleft()
                n = chain.write(session.memory, 0, data[taken:taken + chain.writable_len])
                queue.push(chain, n)
                taken += n
        except (VirtioError, MemoryAccessError) as exc:
            session.device_error(str(exc))
            return taken
        if taken:
            session.signal_used(RX_QUEUE)
        return taken
