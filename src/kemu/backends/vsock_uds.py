"""The host side of virtio-vsock on UNIX sockets, Firecracker's convention.

``-device vhost-vsock-device,guest-cid=3,uds=/path/v.sock`` (``uds=`` is
kemu's own property; QEMU's vhost-vsock uses the kernel's vhost instead):

* host to guest: connect to the UNIX socket ``/path/v.sock`` (kemu listens
  on it) and write ``CONNECT <port>\\n``; kemu asks the guest for a
  connection to that vsock port and answers ``OK <host port>\\n`` once the
  guest accepted, or closes the socket if it refused.  Then the socket
  carries the stream both ways.
* guest to host: a guest connecting to CID 2 port ``P`` reaches whoever
  listens on the UNIX socket ``/path/v.sock_P``; nobody listening: the
  guest's connect is refused.

Sockets are served by the :class:`~kemu.backends.ioloop.IoLoop` thread;
data from the host goes to the device only while it wants it (credit and a
bounded buffer), data for the host is buffered up to the credit the device
gave the guest.
"""

from __future__ import annotations

import logging
import re
import socket
import threading

from kemu.backends.ioloop import EVENT_READ, EVENT_WRITE, BackendError, IoLoop
from kemu.backends.unix_socket import listen_unix
from kemu.errors import ConfigError

log = logging.getLogger(__name__)

CONNECT_LINE = re.compile(rb"^CONNECT (\d{1,10})\n")
LINE_MAX = 64
READ_CHUNK = 64 << 10


class VsockUdsError(BackendError):
    """The vsock UNIX socket cannot be created."""


class UdsStream:
    """One connection: a UNIX socket on one side, a vsock connection on the other."""

    def __init__(self, backend: UdsVsockBackend, sock: socket.socket, handshake: bool) -> None:
        self.backend = backend
        self.loop = backend.loop
        self.sock = sock
        sock.setblocking(False)
        self.fd = sock.fileno()
        self.conn = None                  # the device's Connection
        self._handshake = handshake       # waiting for "CONNECT P\n"
        self._line = bytearray()
        self._out = bytearray()
        self._reading = True
        self._shut_wr = False
        self._eof = False
        self._closed = False
        self._lock = threading.Lock()

    # -- VsockStream (machine lock held) ------------------------------------------------------------
    def write(self, data: bytes) -> int:
        with self._lock:
            if self._closed:
                return len(data)
            if self._out:
                self._out += data
                return 0
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                return len(data)          # the peer is gone; the RST follows from the reader
            if n < len(data):
                self._out += data[n:]
                self.loop.call_soon(self._update)
            return n

    def bind(self, conn) -> None:
        """The device's connection for a guest-initiated stream."""
        self.conn = conn
        self.loop.call_soon(self._update)

    def established(self, host_port: int) -> None:
        self.write(b"OK %d\n" % host_port)
        if self._line:                     # bytes that came right after the CONNECT line
            data, self._line = bytes(self._line), bytearray()
            self.loop.call_soon(lambda: self._to_device(data))
        self.loop.call_soon(self._update)

    def set_reading(self, on: bool) -> None:
        self._reading = on
        self.loop.call_soon(self._update)

    def shutdown_write(self) -> None:
        self._shut_wr = True
        self.loop.call_soon(self._update)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.backend.streams.discard(self)

        def shut() -> None:
            self.loop.unwatch(self.fd)
            self.sock.close()
        self.loop.call_soon(shut)

    # -- loop thread --------------------------------------------------------------------------------
    def _update(self) -> None:
        if self._closed:
            return
        events = 0
        if self._handshake or (self.conn is not None and self.conn.established and self._reading
                               and not self._eof):
            events |= EVENT_READ
        with self._lock:
            if self._out:
                events |= EVENT_WRITE
            elif self._shut_wr:
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        if events:
            self.loop.watch(self.fd, events, self._ready)
        else:
            self.loop.unwatch(self.fd)

    def _ready(self, mask: int) -> None:
        if mask & EVENT_WRITE:
            self._flush()
        if mask & EVENT_READ:
            self._read()

    def _flush(self) -> None:
        with self._lock:
            try:
                n = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = len(self._out)
            del self._out[:n]
        if n and self.conn is not None:
            with self.loop.lock:
                self.backend.device.host_written(self.conn, n)
        self._update()

    def _read(self) -> None:
        try:
            data = self.sock.recv(READ_CHUNK if not self._handshake else LINE_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if self._handshake:
            self._read_line(data)
            return
        if not data:
            self._eof = True
            self._update()
            with self.loop.lock:
                if self.conn is not None:
                    self.backend.device.host_eof(self.conn)
            return
        self._to_device(data)

    def _to_device(self, data: bytes) -> None:
        with self.loop.lock:
            if self.conn is not None:
                self.backend.device.host_data(self.conn, data)

    def _read_line(self, data: bytes) -> None:
        if not data:
            self.close()
            return
        self._line += data
        m = CONNECT_LINE.match(self._line)
        if m is None:
            if b"\n" in self._line or len(self._line) > LINE_MAX:
                log.info("vsock: bad handshake %r", bytes(self._line[:LINE_MAX]))
                self.close()
            return
        port = int(m.group(1))
        del self._line[:m.end()]
        self._handshake = False
        self.loop.unwatch(self.fd)        # quiet until the guest answers
        with self.loop.lock:
            conn = None
            if port <= 0xFFFFFFFF and self.backend.device is not None:
                conn = self.backend.device.host_connect(port, self)
        if conn is None:
            self.close()
            return
        self.conn = conn


class UdsVsockBackend:
    """Listens on ``path`` for host-initiated connections; connects to ``path_PORT``."""

    def __init__(self, loop: IoLoop, path: str) -> None:
        self.loop = loop
        self.path = str(path)
        self.device = None
        self.streams: set[UdsStream] = set()
        try:
            self.listener, self._owned = listen_unix(self.path, f"vsock uds={self.path}")
        except ConfigError as e:
            raise VsockUdsError(str(e)) from None
        self.listener.setblocking(False)

    def attach(self, device) -> None:
        self.device = device
        self.loop.watch(self.listener.fileno(), EVENT_READ, self._accept)
        self.loop.start()

    def _accept(self, _mask: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("vsock: accept failed: %s", exc)
            return
        stream = UdsStream(self, sock, handshake=True)
        self.streams.add(stream)
        stream._update()

    def connect(self, port: int):
        """The guest connects to host port ``port``: ``path_PORT`` (machine lock held)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(f"{self.path}_{port}")
        except OSError:
            sock.close()
            return None
        stream = UdsStream(self, sock, handshake=False)
        self.streams.add(stream)
        return stream

    def flush(self) -> None:
        """Nothing to flush (part of the board's backend list protocol)."""

    def close(self) -> None:
        for stream in list(self.streams):
            stream.close()
        fd = self.listener.fileno()
        if fd >= 0:
            self.loop.unwatch(fd)
            done = threading.Event()
            self.loop.call_soon(done.set)
            if not self.loop.in_loop:
                done.wait(2)
            self.listener.close()
            self._owned.remove()
