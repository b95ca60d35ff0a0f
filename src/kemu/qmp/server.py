"""The QMP socket server: ``-qmp unix:PATH,server=on,wait=off`` or ``tcp:HOST:PORT,...``.

One asyncio event loop in its own thread serves every client; each client
has its own :class:`QmpSession`.  Events from the machine are broadcast to
every client that negotiated capabilities.  UNIX sockets are created with
mode 0600 (:mod:`kemu.backends.unix_socket`: a file that is not a socket, or
a socket another process listens on, is refused and left alone); TCP
listens on 127.0.0.1 unless an address is given.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
import sys
import threading

from kemu.backends.unix_socket import OwnedPath, listen_unix
from kemu.errors import ConfigError
from kemu.options.sockets import SocketAddress, parse_qmp_option  # noqa: F401 (re-exported)
from kemu.qmp.commands import QEMU_VERSION, Commands, package
from kemu.qmp.protocol import QmpSession, encode, greeting


#: ``-qmp``'s address: a socket chardev (kemu.options.sockets).
QmpAddress = SocketAddress


#: Descriptors taken from one message (SCM_RIGHTS); more are closed by the kernel.
MAX_FDS = 8

#: Event bytes a client may leave unread before it is disconnected.
MAX_EVENT_BACKLOG = 1 << 20


class QmpServer:
    """QMP on one listening socket, for one machine (a :class:`kemu.api.Machine`).

    asyncio, one event loop in one thread ("qmp") for every client of this
    server.  Commands run in the loop's default executor, since they may
    wait for the vCPU (``stop`` waits for a safe point), so a slow command
    never holds up other clients or events; one client's commands still run
    one after another, in order.  A client that leaves more than
    :data:`MAX_EVENT_BACKLOG` bytes of events unread is disconnected.
    """

    def __init__(self, vm, address: QmpAddress) -> None:
        self.vm = vm
        self.address = address
        self.commands = Commands(vm)
        self._loop = asyncio.new_event_loop()
        self._clients: set[tuple[QmpSession, asyncio.StreamWriter]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="qmp", daemon=True)
        self._first_client = threading.Event()
        self._owned: OwnedPath | None = None     # the socket file this server made

    def start(self) -> None:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        try:
            future.result(10)
        except OSError as e:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if not self.address.server:
                raise ConfigError(f"-qmp {self.option}: Failed to connect to "
                                  f"'{self._target()}': {e.strerror or e}") from None
            raise ConfigError(f"-qmp: cannot listen: {e.strerror or e}") from None
        except ConfigError:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        self.vm.add_listener(self.broadcast)
        if self.address.wait:
            print(f"kemu: -qmp {self.option}: info: QEMU waiting for connection on: "
                  f"{self.address.describe()}", file=sys.stderr, flush=True)
            self._first_client.wait()

    @property
    def option(self) -> str:
        """The -qmp argument as QEMU echoes it in messages."""
        return self.address.describe().removeprefix("disconnected:")

    def _target(self) -> str:
        a = self.address
        return a.path if a.kind == "unix" else f"{a.host}:{a.port}"

    async def _listen(self) -> None:
        if not self.address.server:
            # A client chardev, as QEMU's -qmp unix:PATH: connect out and be
            # the QMP server side over that one connection.
            if self.address.kind == "unix":
                reader, writer = await asyncio.open_unix_connection(self.address.path)
            else:
                reader, writer = await asyncio.open_connection(self.address.host,
                                                               self.address.port)
            self._loop.create_task(self._client(reader, writer))
            return
        if self.address.kind == "fd":
            # A listening socket the parent opened and passed (-chardev socket,fd=N).
            sock = socket.socket(fileno=self.address.fd)
            sock.setblocking(False)
            self._server = await asyncio.start_server(self._client, sock=sock)
        elif self.address.kind == "unix":
            sock, self._owned = listen_unix(self.address.path,
                                            f"-qmp unix:{self.address.path}")
            try:
                self._server = await asyncio.start_unix_server(self._client, sock=sock)
            except BaseException:
                sock.close()
                self._owned.remove()
                raise
        else:
            self._server = await asyncio.start_server(self._client, self.address.host,
                                                      self.address.port)

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1] if self._server else 0

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = QmpSession(self.commands, self.commands.names)
        entry = (session, writer)
        self._first_client.set()
        # On a UNIX socket, read with recvmsg: descriptors passed with SCM_RIGHTS
        # (for getfd, as libvirt sends them) would be lost by a plain read.
        # (any AF_UNIX connection: -qmp unix:, or a socket libvirt passed)
        sock = None
        peer = writer.get_extra_info("socket")
        if peer is not None and peer.family == socket.AF_UNIX:
            writer.transport.pause_reading()
            sock = socket.socket(fileno=os.dup(peer.fileno()))
        try:
            writer.write(encode(greeting(QEMU_VERSION, package())))
            await writer.drain()
            while True:
                data = await (self._recv_with_fds(sock) if sock is not None
                              else reader.read(65536))
                if not data:
                    break
                # Commands touch the machine: run them off the event loop.
                responses = await self._loop.run_in_executor(None, session.feed, data)
                for response in responses:
                    writer.write(encode(response.data))
                    if response.close:
                        await writer.drain()
                        return
                if session.negotiated:
                    # Events only after the negotiation reply is on its way
                    # (both happen on this loop, so the order holds).
                    self._clients.add(entry)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._clients.discard(entry)
            writer.close()
            if sock is not None:
                sock.close()

    async def _recv_with_fds(self, sock: socket.socket) -> bytes:
        """Bytes from the client; descriptors that came with them go to getfd."""
        while True:
            try:
                data, ancdata, _flags, _addr = sock.recvmsg(65536,
                                                            socket.CMSG_SPACE(MAX_FDS * 4))
                break
            except (BlockingIOError, InterruptedError):
                ready = self._loop.create_future()
                self._loop.add_reader(sock.fileno(), ready.set_result, None)
                try:
                    await ready
                finally:
                    self._loop.remove_reader(sock.fileno())
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                self.commands.receive_fds(list(fds))
        return data

    def broadcast(self, message: dict) -> None:
        """Send an event to every negotiated client (from any thread)."""
        data = encode(message)

        def send() -> None:
            for entry in list(self._clients):
                writer = entry[1]
                if writer.is_closing():
                    continue
                if writer.transport.get_write_buffer_size() > MAX_EVENT_BACKLOG:
                    self._clients.discard(entry)     # it stopped reading
                    writer.close()
                    continue
                writer.write(data)
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(send)

    def close(self) -> None:
        async def shutdown() -> None:
            # Let queued events (SHUTDOWN) reach the clients first.
            await asyncio.sleep(0.05)
            if self._server is not None:
                self._server.close()
            for _session, writer in list(self._clients):
                writer.close()
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if self._owned is not None:
            self._owned.remove()
