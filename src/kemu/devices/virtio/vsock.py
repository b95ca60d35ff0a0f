"""virtio-vsock (VIRTIO 1.2, section 5.10 "Socket Device"): stream sockets to the host.

Three queues: rx (0), tx (1), event (2) (5.10.2); no feature bits (stream
sockets are what a device with none negotiated offers, 5.10.3); the
configuration space is ``le64 guest_cid`` (5.10.4).  Every packet starts
with ``struct virtio_vsock_hdr`` (5.10.6)::

    le64 src_cid, dst_cid; le32 src_port, dst_port, len;
    le16 type, op; le32 flags, buf_alloc, fwd_cnt

The host is CID 2.  The device keeps one :class:`Connection` per
``(guest port, host port)`` and bridges it to a host-side
:class:`VsockStream` made by a :class:`VsockBackend`
(:mod:`kemu.backends.vsock_uds`).  Credit-based flow control (5.10.6.3):
the device tells the guest it has :data:`BUF_ALLOC` bytes of buffer per
connection and how many it has forwarded (``fwd_cnt``), and never sends the
guest more than the guest's ``buf_alloc - (tx_cnt - fwd_cnt)``.

Everything from the guest is checked: a packet without a header is a
device error; a wrong source CID, an unknown type or op, a ``len`` that
the buffers do not hold, data beyond the credit given, or a packet for a
connection that does not exist gets a RST (or is dropped), never a crash.
At most :data:`MAX_CONNECTIONS` connections, and at most
:data:`PENDING_MAX` bytes of host data waiting per connection.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from kemu.devices.virtio import VirtioDevice, VirtioSession
from kemu.devices.virtio.queue import (
    DescriptorChain,
    VirtioError,
    Virtqueue,
    VirtqueueError,
)
from kemu.errors import MemoryAccessError

log = logging.getLogger(__name__)

VIRTIO_ID_VSOCK = 19

RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2
#: struct virtio_vsock_event's id (5.10.6.7): the guest re-reads its CID, drops its connections.
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0

HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HDR.size          # 44

VIRTIO_VSOCK_TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = range(1, 8)
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2

HOST_CID = 2
#: CIDs a guest may not have (5.10.4: 0, 1, 2 and 0xffffffff are reserved).
RESERVED_CIDS = (0, 1, 2, 0xFFFFFFFF)
#: Receive buffer space advertised to the guest per connection.
BUF_ALLOC = 256 << 10
#: Largest payload of one packet either way (Linux uses 64 KiB).
MAX_PKT = 64 << 10
PENDING_MAX = 64 << 10
MAX_CONNECTIONS = 256
CONTROL_MAX = 4 * MAX_CONNECTIONS
FIRST_HOST_PORT = 1 << 30     # ports the host side uses for connections it opens
DEFAULT_QUEUE_SIZE = 128


class VsockStream(Protocol):
    """One host-side connection; called with the machine lock held."""

    def write(self, data: bytes) -> int:
        """Queue ``data`` for the host peer; returns bytes already delivered to it.

        Later deliveries are reported with :meth:`VirtioVsock.host_written`.
        """

    def bind(self, conn: Connection) -> None:
        """The connection a stream from :meth:`VsockBackend.connect` belongs to."""

    def established(self, host_port: int) -> None:
        """The guest accepted a connection the host side asked for."""

    def set_reading(self, on: bool) -> None:
        """Whether the device wants :meth:`VirtioVsock.host_data` calls now."""

    def shutdown_write(self) -> None: ...

    def close(self) -> None: ...


class VsockBackend(Protocol):
    def attach(self, device: VirtioVsock) -> None:
        """Host-initiated connections arrive through ``device.host_connect``."""

    def connect(self, port: int) -> VsockStream | None:
        """The guest connects to host port ``port``: a stream, or None (refused)."""

    def close(self) -> None: ...


@dataclass
class VirtioVsockState:
    """Connections end with the machine that held their host sockets: a
    restored device sends the transport reset event (5.10.6.7) instead, as
    Firecracker does, so the guest drops them and re-reads its (maybe new) CID."""

    version: int
    connections: int


@dataclass(eq=False)
class Connection:
    guest_port: int
    host_port: int
    stream: VsockStream
    established: bool = False
    #: The guest's receive buffer (its credit to us), from its last header.
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    #: Bytes sent to the guest.
    tx_cnt: int = 0
    #: Bytes received from the guest, and forwarded to the host peer.
    rx_cnt: int = 0
    fwd_cnt: int = 0
    fwd_told: int = 0
    pending: bytearray = field(default_factory=bytearray)
    host_eof: bool = False
    shutdown_sent: bool = False
    reading: bool = True

    @property
    def credit(self) -> int:
        """Bytes the guest can take now (5.10.6.3)."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF
        return max(0, self.peer_buf_alloc - in_flight)


class VirtioVsock(VirtioDevice):
    """A vsock device for guest CID ``guest_cid`` with a host-side backend."""

    device_id = VIRTIO_ID_VSOCK

    def __init__(self, guest_cid: int, backend: VsockBackend | None = None, *,
                 queue_size: int = DEFAULT_QUEUE_SIZE, name: str = "virtio-vsock") -> None:
        self.name = name
        super().__init__([queue_size, queue_size, queue_size])
        if guest_cid in RESERVED_CIDS or not 0 < guest_cid < 1 << 32:
            raise ValueError(f"{name}: guest CID {guest_cid} is reserved or out of range")
        self.guest_cid = guest_cid
        self.backend = backend
        self.conns: dict[tuple[int, int], Connection] = {}
        self._control: deque[bytes] = deque()
        self._rx_chains: deque[DescriptorChain] = deque()
        self._next_port = FIRST_HOST_PORT
        self.bad_packets = 0
        if backend is not None:
            backend.attach(self)

    def config_space(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    # -- lifecycle --------------------------------------------------------------------------------
    def activate(self, session: VirtioSession) -> None:
        super().activate(session)
        self._rx_chains.clear()

    def reset(self) -> None:
        super().reset()
        self._close_all()

    def _close_all(self) -> None:
        conns, self.conns = list(self.conns.values()), {}
        for conn in conns:
            conn.stream.close()
        self._control.clear()
        self._rx_chains.clear()

    def _session(self) -> VirtioSession | None:
        s = self.session
        return s if s is not None and s.active else None

    # -- packets to the guest --------------------------------------------------------------------
    def _header(self, conn: Connection | None, op: int, *, length: int = 0, flags: int = 0,
                guest_port: int = 0, host_port: int = 0) -> bytes:
        if conn is not None:
            guest_port, host_port = conn.guest_port, conn.host_port
            conn.fwd_told = conn.fwd_cnt
        return HDR.pack(HOST_CID, self.guest_cid, host_port, guest_port, length,
                        VIRTIO_VSOCK_TYPE_STREAM, op, flags, BUF_ALLOC,
                        conn.fwd_cnt if conn is not None else 0)

    def _queue_control(self, packet: bytes) -> None:
        if len(self._control) < CONTROL_MAX:
            self._control.append(packet)
        else:
            log.warning("%s: control queue full, packet dropped", self.name)

    def _rst(self, guest_port: int, host_port: int) -> None:
        self._queue_control(self._header(None, OP_RST, guest_port=guest_port, host_port=host_port))

    def _pop_rx(self, queue: Virtqueue) -> DescriptorChain | None:
        chain = self._rx_chains.popleft() if self._rx_chains else queue.pop()
        if chain is not None and chain.writable_len < HDR_SIZE:
            raise VirtqueueError(f"{self.name}: receive buffer of {chain.writable_len} bytes "
                                 "cannot hold a packet header")
        return chain

    def _deliver(self) -> None:
        """Fill the guest's receive buffers: control packets first, then data."""
        session = self._session()
        if session is None:
            return
        queue = session.queues[RX_QUEUE]
        used = False
        try:
            while True:
                packet = self._next_packet()
                if packet is None:
                    break
                chain = self._pop_rx(queue)
                if chain is None:
                    self._unget(packet)
                    break
                packet = self._fit(packet, chain.writable_len)
                chain.write(session.memory, 0, packet)
                queue.push(chain, len(packet))
                used = True
        except (VirtioError, MemoryAccessError) as exc:
            session.device_error(str(exc))
            return
        if used:
            session.signal_used(RX_QUEUE)
        for conn in list(self.conns.values()):
            want = len(conn.pending) < PENDING_MAX and not conn.host_eof
            if want != conn.reading:
                conn.reading = want
                conn.stream.set_reading(want)

    # A data packet is built lazily so its size can follow the receive buffer.
    def _next_packet(self):
        if self._control:
            return self._control.popleft()
        for conn in self.conns.values():
            if not conn.established:
                continue
            if conn.pending and conn.credit > 0:
                return conn
            if conn.host_eof and not conn.pending and not conn.shutdown_sent:
                conn.shutdown_sent = True
                return self._header(conn, OP_SHUTDOWN, flags=SHUTDOWN_SEND)   # half-close
            if (conn.fwd_cnt - conn.fwd_told) & 0xFFFFFFFF >= BUF_ALLOC // 4:
                return self._header(conn, OP_CREDIT_UPDATE)
        return None

    def _unget(self, packet) -> None:
        if isinstance(packet, bytes):
            self._control.appendleft(packet)

    def _fit(self, packet, room: int) -> bytes:
        if isinstance(packet, bytes):
            return packet
        conn: Connection = packet
        take = min(len(conn.pending), conn.credit, room - HDR_SIZE, MAX_PKT)
        data = bytes(conn.pending[:take])
        del conn.pending[:take]
        conn.tx_cnt = (conn.tx_cnt + take) & 0xFFFFFFFF
        return self._header(conn, OP_RW, length=take) + data

    # -- packets from the guest -------------------------------------------------------------------
    def queue_notify(self, index: int, queue: Virtqueue) -> None:
        session = self._session()
        if session is None:
            return
        if index == TX_QUEUE:
            while (chain := queue.pop()) is not None:
                self._guest_packet(session, chain)
                queue.push(chain, 0)
            session.signal_used(TX_QUEUE)
            self._deliver()
        elif index == RX_QUEUE:
            self._deliver()
        # EVENT_QUEUE: buffers wait for a transport reset event (after a restore).

    # -- snapshots -----------------------------------------------------------------------------------
    def save(self) -> VirtioVsockState:
        return VirtioVsockState(1, len(self.conns))

    def restore(self, state: VirtioVsockState) -> None:
        if state.version != 1:
            raise VirtioError(f"{self.name}: unsupported virtio-vsock state version {state.version}")
        self.transport_reset()

    def transport_reset(self) -> bool:
        """Tell the driver its transport was reset (a restore, a new CID); False
        when it has no event buffer (or no session)."""
        session = self._session()
        if session is None:
            return False
        queue = session.queues[EVENT_QUEUE]
        chain = queue.pop()
        if chain is None:
            return False
        event = struct.pack("<I", VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
        chain.write(session.memory, 0, event)
        queue.push(chain, min(len(event), chain.writable_len))
        session.signal_used(EVENT_QUEUE)
        return True

    def _guest_packet(self, session: VirtioSession, chain: DescriptorChain) -> None:
        if chain.readable_len < HDR_SIZE:
            raise VirtqueueError(f"{self.name}: packet of {chain.readable_len} bytes has no header")
        (src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc,
         fwd_cnt) = HDR.unpack(chain.read(session.memory, 0, HDR_SIZE))
        if src_cid != self.guest_cid:            # 5.10.6.1: not from this guest: drop
            self.bad_packets += 1
            return
        if op == OP_RST:
            conn = self.conns.pop((src_port, dst_port), None)
            if conn is not None:
                conn.stream.close()
            return
        bad = (type_ != VIRTIO_VSOCK_TYPE_STREAM or dst_cid != HOST_CID
               or not OP_REQUEST <= op <= OP_CREDIT_REQUEST
               or length > MAX_PKT or length > chain.readable_len - HDR_SIZE
               or (op != OP_RW and length))
        key = (src_port, dst_port)
        conn = self.conns.get(key)
        if bad:
            self.bad_packets += 1
            self._reset_conn(key, conn)
            return
        if conn is not None:
            conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == OP_REQUEST:
            self._guest_connect(key, conn, buf_alloc, fwd_cnt)
        elif conn is None:
            self._rst(src_port, dst_port)        # no such connection
        elif op == OP_RESPONSE:
            if conn.established:
                self._reset_conn(key, conn)
            else:
                conn.established = True
                conn.stream.established(conn.host_port)
        elif not conn.established:
            self._reset_conn(key, conn)
        elif op == OP_RW:
            if ((conn.rx_cnt - conn.fwd_cnt) & 0xFFFFFFFF) + length > BUF_ALLOC:
                self.bad_packets += 1            # beyond the credit we gave
                self._reset_conn(key, conn)
                return
            conn.rx_cnt = (conn.rx_cnt + length) & 0xFFFFFFFF
            if length:
                done = conn.stream.write(chain.read(session.memory, HDR_SIZE, length))
                self._forwarded(conn, done)
        elif op == OP_SHUTDOWN:
            if flags & SHUTDOWN_SEND:
                conn.stream.shutdown_write()
            if flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND:
                self._reset_conn(key, conn)      # both directions done: RST ends it (5.10.6.6)
        elif op == OP_CREDIT_REQUEST:
            self._queue_control(self._header(conn, OP_CREDIT_UPDATE))

    def _reset_conn(self, key: tuple[int, int], conn: Connection | None) -> None:
        if conn is not None:
            self.conns.pop(key, None)
            conn.stream.close()
        self._rst(*key)

    def _guest_connect(self, key, conn, buf_alloc: int, fwd_cnt: int) -> None:
        if conn is not None or len(self.conns) >= MAX_CONNECTIONS or self.backend is None:
            self._reset_conn(key, conn)
            return
        stream = self.backend.connect(key[1])
        if stream is None:
            self._rst(*key)
            return
        conn = Connection(key[0], key[1], stream, established=True,
                          peer_buf_alloc=buf_alloc, peer_fwd_cnt=fwd_cnt)
        self.conns[key] = conn
        stream.bind(conn)
        self._queue_control(self._header(conn, OP_RESPONSE))

    def _forwarded(self, conn: Connection, n: int) -> None:
        conn.fwd_cnt = (conn.fwd_cnt + n) & 0xFFFFFFFF

    # -- calls from the host side (machine lock held) --------------------------------------------
    def host_connect(self, guest_port: int, stream: VsockStream) -> Connection | None:
        """The host side asks for a connection to the guest's ``guest_port``."""
        if self._session() is None or len(self.conns) >= MAX_CONNECTIONS:
            return None
        port = self._next_port
        while (guest_port, port) in self.conns:
            port = port + 1 if port < 0xFFFFFFFF else FIRST_HOST_PORT
        self._next_port = port + 1 if port < 0xFFFFFFFF else FIRST_HOST_PORT
        conn = Connection(guest_port, port, stream)
        self.conns[(guest_port, port)] = conn
        self._queue_control(self._header(conn, OP_REQUEST))
        self._deliver()
        return conn

    def host_data(self, conn: Connection, data: bytes) -> None:
        if self.conns.get((conn.guest_port, conn.host_port)) is not conn:
            return
        conn.pending += data
        self._deliver()

    def host_written(self, conn: Connection, n: int) -> None:
        """``n`` more bytes of guest data reached the host peer: more credit for the guest."""
        if self.conns.get((conn.guest_port, conn.host_port)) is conn:
            self._forwarded(conn, n)
            self._deliver()

    def host_eof(self, conn: Connection) -> None:
        """The host peer hung up: tell the guest once the data before it is delivered."""
        if self.conns.get((conn.guest_port, conn.host_port)) is conn:
            if not conn.established:
                self._reset_conn((conn.guest_port, conn.host_port), conn)
            else:
                conn.host_eof = True
            self._deliver()
