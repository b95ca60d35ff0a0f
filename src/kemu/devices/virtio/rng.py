"""virtio-rng (VIRTIO 1.2, section 5.4 "Entropy Device").

One request queue, no feature bits, no configuration space (5.4.3-5.4.5).
The driver posts device-writable buffers; the device fills them with
entropy from an injected source (``os.urandom`` by default) and returns
them with the number of bytes written.  At most :data:`MAX_BYTES_PER_REQUEST`
bytes are produced per chain, which 5.4.6.1 allows ("MAY use less than the
entire buffer length"); device-readable buffers in a chain are ignored.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import partial

from kemu.devices.virtio import VIRTIO_ID_RNG, Executor, VirtioDevice, VirtioSession
from kemu.devices.virtio.queue import DescriptorChain, VirtioError, Virtqueue
from kemu.errors import MemoryAccessError

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 64
#: Entropy bytes produced for one chain at most.
MAX_BYTES_PER_REQUEST = 64 << 10


class VirtioRng(VirtioDevice):
    """An entropy device reading from ``source(n) -> bytes``."""

    device_id = VIRTIO_ID_RNG

    def __init__(self, source: Callable[[int], bytes] = os.urandom, *,
                 queue_size: int = DEFAULT_QUEUE_SIZE,
                 max_bytes: int = MAX_BYTES_PER_REQUEST,
                 executor: Executor | None = None, name: str = "virtio-rng") -> None:
        self.name = name
        super().__init__([queue_size], executor)
        self.source = source
        self.max_bytes = max_bytes

    def queue_notify(self, index: int, queue: Virtqueue) -> None:
        session = self.session
        if session is None:
            return
        while (chain := queue.pop()) is not None:
            want = min(chain.writable_len, self.max_bytes)
            self.executor.submit(partial(self._entropy, want),
                                 partial(self._complete, session, index, queue, chain))

    def _entropy(self, n: int) -> bytes:
        if n == 0:
            return b""
        try:
            return bytes(self.source(n))[:n]
        except Exception:  # a failing source gives the guest nothing, never a VMM crash
            log.exception("%s: entropy source failed", self.name)
            return b""

    def _complete(self, session: VirtioSession, index: int, queue: Virtqueue,
                  chain: DescriptorChain, data: bytes) -> None:
        if not session.active:
            return
        try:
            written = chain.write(session.memory, 0, data)
            queue.push(chain, written)
        except (VirtioError, MemoryAccessError) as exc:
            session.device_error(str(exc))
            return
        session.signal_used(index)
