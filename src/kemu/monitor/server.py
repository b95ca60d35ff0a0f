"""``-monitor unix:PATH,server=on[,wait=off]`` (or ``tcp:...``): the human
monitor on a socket, one thread per client, each with its own
:class:`MonitorSession` over the one HMP table."""

from __future__ import annotations

import socket
import sys
import threading

from kemu.backends.unix_socket import OwnedPath, listen_unix
from kemu.errors import ConfigError
from kemu.options.sockets import SocketAddress
from kemu.monitor.hmp import Hmp
from kemu.monitor.session import MonitorSession


class MonitorServer:
    def __init__(self, hmp: Hmp, address: SocketAddress) -> None:
        self.hmp = hmp
        self.address = address
        self._sock: socket.socket | None = None
        self._owned: OwnedPath | None = None
        self._clients: set[socket.socket] = set()
        self._closed = False
        self._first_client = threading.Event()

    @property
    def option(self) -> str:
        return self.address.describe().removeprefix("disconnected:")

    def start(self) -> None:
        a = self.address
        try:
            if not a.server:
                family = socket.AF_UNIX if a.kind == "unix" else socket.AF_INET
                conn = socket.socket(family, socket.SOCK_STREAM)
                try:
                    conn.connect(a.path if a.kind == "unix" else (a.host, a.port))
                except OSError as e:
                    conn.close()
                    target = a.path if a.kind == "unix" else f"{a.host}:{a.port}"
                    raise ConfigError(f"-monitor {self.option}: Failed to connect to "
                                      f"'{target}': {e.strerror or e}") from None
                self._serve_in_thread(conn)
                return
            if a.kind == "unix":
                self._sock, self._owned = listen_unix(a.path, f"-monitor unix:{a.path}")
            else:
                self._sock = socket.create_server((a.host, a.port))
        except OSError as e:
            raise ConfigError(f"-monitor: cannot listen: {e.strerror or e}") from None
        threading.Thread(target=self._accept, name="monitor", daemon=True).start()
        if a.wait:
            print(f"kemu: -monitor {self.option}: info: QEMU waiting for connection on: "
                  f"{a.describe()}", file=sys.stderr, flush=True)
            self._first_client.wait()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._serve_in_thread(conn)

    def _serve_in_thread(self, conn: socket.socket) -> None:
        self._clients.add(conn)
        self._first_client.set()
        threading.Thread(target=self._serve, args=(conn,), name="monitor-client",
                         daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        def write(data: bytes) -> None:
            try:
                conn.sendall(data)
            except OSError:
                pass
        # A socket monitor does not echo (the client's terminal does), as QEMU's.
        session = MonitorSession(self.hmp, write, echo=False)
        try:
            session.open()
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                session.feed(data)
        except OSError:
            pass
        finally:
            self._clients.discard(conn)
            conn.close()

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        for conn in list(self._clients):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._owned is not None:
            self._owned.remove()
