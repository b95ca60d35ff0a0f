"""virtio-net (VIRTIO 1.2, section 5.1 "Network Device") over a host network backend.

Two queues: receiveq1 (0) and transmitq1 (1) (5.1.2); no control queue and
no offloads.  Feature bits offered (5.1.3): VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS
(the link is up) and, optionally, VIRTIO_NET_F_MRG_RXBUF.  The configuration
space is ``struct virtio_net_config`` up to ``max_virtqueue_pairs`` (5.1.4).

Every packet on either queue starts with the 12-byte ``struct virtio_net_hdr``
(5.1.6, VIRTIO_F_VERSION_1 makes ``num_buffers`` always present):
``flags u8, gso_type u8, hdr_len le16, gso_size le16, csum_start le16,
csum_offset le16, num_buffers le16``.  Without offloads the device writes
a header of zeroes (``num_buffers`` aside) and ignores the one it is given,
except that a GSO packet, which the driver may not send without
VIRTIO_NET_F_HOST_*, is dropped.

The host side is a :class:`NetBackend`; frames cross it as bare Ethernet
frames.  Transmit: a guest kick sends every available frame to the backend
inline.  Receive: the backend calls :meth:`VirtioNet.receive` (with the
machine lock held); frames wait in a bounded queue until the driver posts
receive buffers, and when that queue is full ``receive`` returns False and
the backend stops reading until the device calls its ``resume``.

What the guest controls is checked: a chain without room for the header
is a device error (DEVICE_NEEDS_RESET), frames shorter than an Ethernet
header or longer than :data:`MAX_FRAME` are dropped and counted.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kemu.devices.virtio import VIRTIO_ID_NET, VirtioDevice, VirtioSession
from kemu.devices.virtio.queue import (
    DescriptorChain,
    VirtioError,
    Virtqueue,
    VirtqueueError,
)
from kemu.errors import ConfigError, MemoryAccessError

log = logging.getLogger(__name__)

# Feature bits (5.1.3).
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16

# Configuration space status bits (5.1.4).
VIRTIO_NET_S_LINK_UP = 1

# virtio_net_hdr flags (5.1.6).
VIRTIO_NET_HDR_F_DATA_VALID = 2

# virtio_net_hdr gso_type values (5.1.6).
VIRTIO_NET_HDR_GSO_NONE = 0

RX_QUEUE = 0
TX_QUEUE = 1

NET_HDR = struct.Struct("<BBHHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
NET_HDR_SIZE = NET_HDR.size           # 12
#: A legacy driver (no VIRTIO_F_VERSION_1) without MRG_RXBUF leaves num_buffers out (5.1.6.1).
LEGACY_NET_HDR_SIZE = 10
VIRTIO_F_VERSION_1 = 32
CONFIG = struct.Struct("<6sHH")       # mac, status, max_virtqueue_pairs

ETH_HLEN = 14
#: Largest Ethernet frame carried either way: a 65535-byte MTU, header and a VLAN tag.
MAX_FRAME = 65535 + ETH_HLEN + 4
DEFAULT_QUEUE_SIZE = 256
#: Received frames held for the guest while it has no receive buffers.
RX_PENDING_FRAMES = 256
RX_PENDING_BYTES = 4 << 20

#: The first NIC's address, as QEMU's: 52:54:00:12:34:56, then :57, ...
DEFAULT_MAC_PREFIX = bytes.fromhex("525400123456")


def default_mac(index: int) -> bytes:
    """QEMU's default MAC for the ``index``-th NIC."""
    return DEFAULT_MAC_PREFIX[:5] + bytes([(0x56 + index) & 0xFF])


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` (or with dashes) into 6 bytes; unicast only."""
    parts = text.replace("-", ":").split(":")
    try:
        if len(parts) != 6 or any(len(p) != 2 for p in parts):
            raise ValueError
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ConfigError(f"invalid MAC address {text!r} (expected 6 hex bytes like "
                          "52:54:00:12:34:56)") from None
    if mac[0] & 1:
        raise ConfigError(f"MAC address {text} is a multicast address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class NetBackend(Protocol):
    """The host side of a NIC (``kemu.backends.passt``, ``kemu.backends.tap``).

    Frames are bare Ethernet frames without any virtio header.
    """

    def connect(self, receive: Callable[[bytes], bool]) -> None:
        """Start delivering received frames to ``receive``.

        ``receive(frame)`` is called with the machine lock held; it takes the
        frame and returns False when the backend must stop reading until
        :meth:`resume` is called.
        """

    def send(self, frame: bytes) -> None:
        """Transmit one frame (never blocks; may drop, as a wire would)."""

    def resume(self) -> None:
        """The device can take frames again (called with the machine lock held)."""

    def close(self) -> None: ...


@dataclass
class NetStats:
    rx_frames: int = 0
    rx_dropped: int = 0
    tx_frames: int = 0
    tx_dropped: int = 0


@dataclass
class VirtioNetState:
    """The link state; frames the host had not delivered yet are dropped (as a
    wire would), receive buffers go back to the ring with the queue's save."""

    version: int
    link_up: bool


class VirtioNet(VirtioDevice):
    """A virtio network card on a :class:`NetBackend`."""

    device_id = VIRTIO_ID_NET

    def __init__(self, backend: NetBackend | None, mac: bytes = DEFAULT_MAC_PREFIX, *,
                 mrg_rxbuf: bool = True, queue_size: int = DEFAULT_QUEUE_SIZE,
                 rx_checksums_valid: bool = False, name: str = "virtio-net") -> None:
        self.name = name
        #: The backend's frames cannot have been damaged on a wire (passt builds them
        #: from host sockets): offer VIRTIO_NET_F_GUEST_CSUM and mark received frames
        #: DATA_VALID (5.1.6.4), so the guest skips verifying checksums byte by byte.
        self.rx_checksums_valid = rx_checksums_valid
        super().__init__([queue_size, queue_size])
        if len(mac) != 6:
            raise ValueError(f"{name}: a MAC address has 6 bytes")
        self.mac = bytes(mac)
        self.mrg_rxbuf = mrg_rxbuf
        self.link_up = True
        self.stats = NetStats()
        self.backend = backend
        self._rx_pending: deque[bytes] = deque()
        self._rx_pending_bytes = 0
        #: Receive chains popped but not used yet (a frame needing more than these).
        self._rx_chains: deque[DescriptorChain] = deque()
        self._backend_paused = False
        if backend is not None:
            backend.connect(self.receive)

    # -- features and configuration ------------------------------------------------------------
    def device_features(self) -> int:
        bits = (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
        if self.mrg_rxbuf:
            bits |= 1 << VIRTIO_NET_F_MRG_RXBUF
        if self.rx_checksums_valid:
            bits |= 1 << VIRTIO_NET_F_GUEST_CSUM
        return bits

    def config_space(self) -> bytes:
        return CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP if self.link_up else 0, 1)

    def set_link(self, up: bool) -> None:
        """Link state changes reach the driver as a configuration change (5.1.4.2)."""
        if up != self.link_up:
            self.link_up = up
            self.config_changed()

    @property
    def _hdr_size(self) -> int:
        """The virtio_net_hdr length the driver uses (5.1.6, its legacy note)."""
        s = self.session
        if s is None or s.features >> VIRTIO_F_VERSION_1 & 1 or self._mergeable:
            return NET_HDR_SIZE
        return LEGACY_NET_HDR_SIZE

    @property
    def _mergeable(self) -> bool:
        s = self.session
        return s is not None and bool(s.features >> VIRTIO_NET_F_MRG_RXBUF & 1)

    # -- lifecycle -----------------------------------------------------------------------------
    def activate(self, session: VirtioSession) -> None:
        super().activate(session)
        self._rx_chains.clear()
        self._deliver()

    def reset(self) -> None:
        super().reset()
        self._rx_chains.clear()
        self._rx_pending.clear()
        self._rx_pending_bytes = 0
        self._wake_backend()

    def save(self) -> VirtioNetState:
        return VirtioNetState(1, self.link_up)

    def restore(self, state: VirtioNetState) -> None:
        if state.version != 1:
            raise VirtioError(f"{self.name}: unsupported virtio-net state version {state.version}")
        self.set_link(state.link_up)

    def _wake_backend(self) -> None:
        if self._backend_paused and self.backend is not None:
            self._backend_paused = False
            self.backend.resume()

    # -- queues ---------------------------------------------------------------------------------
    def queue_notify(self, index: int, queue: Virtqueue) -> None:
        if self.session is None:
            return
        if index == TX_QUEUE:
            self._transmit(queue)
        elif index == RX_QUEUE:
            self._deliver()

    def _transmit(self, queue: Virtqueue) -> None:
        session = self.session
        sent = False
        while (chain := queue.pop()) is not None:
            length = chain.readable_len
            hdr = self._hdr_size
            if length < hdr:
                raise VirtqueueError(f"{self.name}: transmit chain of {length} bytes has no "
                                     "virtio_net_hdr")
            frame_len = length - hdr
            if ETH_HLEN <= frame_len <= MAX_FRAME:
                data = chain.read(session.memory, 0, length)
                _flags, gso_type = data[0], data[1]
                if gso_type != VIRTIO_NET_HDR_GSO_NONE:   # no HOST_TSO/UFO offered (5.1.6.2)
                    self.stats.tx_dropped += 1
                else:
                    self._send(data[hdr:])
            else:
                self.stats.tx_dropped += 1
            queue.push(chain, 0)
            sent = True
        if sent:
            session.signal_used(TX_QUEUE)

    def _send(self, frame: bytes) -> None:
        if self.backend is None or not self.link_up:
            self.stats.tx_dropped += 1
            return
        try:
            self.backend.send(frame)
            self.stats.tx_frames += 1
        except OSError as exc:   # the host side failing is a lost frame, not a VMM crash
            log.warning("%s: backend send failed: %s", self.name, exc)
            self.stats.tx_dropped += 1

    # -- receive ----------------------------------------------------------------------------------
    def receive(self, frame: bytes) -> bool:
        """A frame from the backend (machine lock held); False: stop until resumed."""
        session = self.session
        if (session is None or not session.active or not self.link_up
                or not ETH_HLEN <= len(frame) <= MAX_FRAME):
            self.stats.rx_dropped += 1      # no driver, or not a frame: the wire drops it
            return True
        if (len(self._rx_pending) >= RX_PENDING_FRAMES
                or self._rx_pending_bytes + len(frame) > RX_PENDING_BYTES):
            self.stats.rx_dropped += 1
            self._backend_paused = True
            return False
        self._rx_pending.append(bytes(frame))
        self._rx_pending_bytes += len(frame)
        try:
            self._deliver()
        except (VirtioError, MemoryAccessError) as exc:
            session.device_error(str(exc))
            return True
        full = (len(self._rx_pending) >= RX_PENDING_FRAMES
                or self._rx_pending_bytes >= RX_PENDING_BYTES)
        if full:
            self._backend_paused = True
        return not full

    def _deliver(self) -> None:
        """Move pending frames into the guest's receive buffers, as far as they go."""
        session = self.session
        if session is None or not self._rx_pending:
            return
        queue = session.queues[RX_QUEUE]
        delivered = False
        while self._rx_pending:
            frame = self._rx_pending[0]
            chains = self._take_buffers(queue, self._hdr_size + len(frame))
            if chains is None:
                break
            self._rx_pending.popleft()
            self._rx_pending_bytes -= len(frame)
            if not chains:
                self.stats.rx_dropped += 1
                continue
            self._write_frame(session, queue, chains, frame)
            self.stats.rx_frames += 1
            delivered = True
        if delivered:
            session.signal_used(RX_QUEUE)
        if len(self._rx_pending) < RX_PENDING_FRAMES // 2:
            self._wake_backend()

    def _pop_rx(self, queue: Virtqueue) -> DescriptorChain | None:
        chain = self._rx_chains.popleft() if self._rx_chains else queue.pop()
        if chain is not None and chain.writable_len < self._hdr_size:
            raise VirtqueueError(f"{self.name}: receive buffer of {chain.writable_len} bytes "
                                 "cannot hold a virtio_net_hdr")
        return chain

    def _take_buffers(self, queue: Virtqueue, need: int) -> list[DescriptorChain] | None:
        """Receive chains for ``need`` bytes; None: wait for more; []: drop the frame."""
        if not self._mergeable:
            chain = self._pop_rx(queue)
            if chain is None:
                return None
            if chain.writable_len < need:     # 5.1.6.3: buffers too small; the frame is lost
                self._rx_chains.appendleft(chain)
                return []
            return [chain]
        chains: list[DescriptorChain] = []
        room = 0
        while room < need:
            chain = self._pop_rx(queue)
            if chain is None:
                self._rx_chains.extendleft(reversed(chains))   # keep them for this frame
                return None
            chains.append(chain)
            room += chain.writable_len
            if room < need and len(chains) >= queue.size:   # the whole ring cannot hold it
                self._rx_chains.extendleft(reversed(chains))
                return []
        return chains

    def _write_frame(self, session: VirtioSession, queue: Virtqueue,
                     chains: list[DescriptorChain], frame: bytes) -> None:
        flags = (VIRTIO_NET_HDR_F_DATA_VALID
                 if session.features >> VIRTIO_NET_F_GUEST_CSUM & 1 else 0)
        header = NET_HDR.pack(flags, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, len(chains))
        data = header[:self._hdr_size] + frame
        offset = 0
        for chain in chains:
            take = min(chain.writable_len, len(data) - offset)
            chain.write(session.memory, 0, data[offset:offset + take])
            queue.push(chain, take)
            offset += take
