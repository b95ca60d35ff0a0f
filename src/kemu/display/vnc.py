"""The VNC server: ``-vnc :N``, ``-vnc HOST:N``, ``-vnc unix:PATH``, as QEMU spells them.

Sockets are served on kemu's I/O thread (:class:`kemu.backends.ioloop.IoLoop`),
never on a vCPU thread; the protocol of each connection is an
:class:`~kemu.display.rfb.RfbSession`.  Options (QEMU's):

* ``password=on``: VNC Authentication (RFC 6143 7.2.2).  The password is set
  with QMP ``set_password`` (and may expire through ``expire_password``);
  until one is set, every login fails, as in QEMU.  The DES step comes from
  the ``cryptography`` package (single DES as TripleDES with the key three
  times; the key is the password's first 8 bytes with each byte's bits
  reversed, the VNC convention): a well-kept library, already needed by the
  VNC client the tests use, rather than a hand-written cipher.
* ``share=allow-exclusive`` (default: a client asking for exclusive access
  disconnects the others), ``force-shared`` (such a client is refused),
  ``ignore`` (the flag is ignored).
* ``connections=N``: at most N clients at once (QEMU's default 32).

Events (QMP VNC_CONNECTED, VNC_INITIALIZED, VNC_DISCONNECTED) go to
``on_event(name, data)``.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from kemu.backends.ioloop import EVENT_READ, EVENT_WRITE, IoLoop
from kemu.display.console import DisplayConsole
from kemu.display.rfb import RfbSession, SessionHooks
from kemu.errors import ConfigError
from kemu.options.display import VncOptions

log = logging.getLogger(__name__)


def vnc_des_key(password: str) -> bytes:
    """The DES key of VNC Authentication: 8 bytes, each with its bits reversed."""
    key = password.encode("latin-1", "replace")[:8].ljust(8, b"\0")
    return bytes(int(f"{b:08b}"[::-1], 2) for b in key)


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """What a client answers to ``challenge``: DES-ECB of it under the password's key."""
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes
    key = vnc_des_key(password)
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(challenge) + encryptor.finalize()


@dataclass
class _Client:
    sock: socket.socket
    session: RfbSession
    host: str
    service: str
    family: str
    shared: bool = True
    watching: int = 0
    update_scheduled: bool = False


class VncServer:
    """One listening socket serving the console's surface and input."""

    def __init__(self, console: DisplayConsole, loop: IoLoop, options: VncOptions, *,
                 name: str = "kemu",
                 on_event: Callable[[str, dict], None] = lambda name, data: None,
                 start: bool = True) -> None:
        self.console = console
        self.loop = loop
        self.options = options
        self.name = name
        self.on_event = on_event
        self.password: str | None = None
        self.password_expires: float | None = None
        self.clients: list[_Client] = []
        self._owned = None
        self._listener = self._listen()
        self.address = self._listener.getsockname()
        loop.watch(self._listener.fileno(), EVENT_READ, self._accept)
        if start:
            self.start()

    def start(self) -> None:
        """Serve clients (the socket listens from construction on: a port in use is an
        error before the machine runs, or daemonizes; the I/O thread starts here)."""
        self.loop.start()

    # -- listening -------------------------------------------------------------------------
    def _listen(self) -> socket.socket:
        what = f"-vnc {self.options.text or self.options.describe()}"
        if self.options.unix_path:
            from kemu.backends.unix_socket import listen_unix
            sock, self._owned = listen_unix(self.options.unix_path, what)
        else:
            try:
                infos = socket.getaddrinfo(self.options.host, self.options.port,
                                           type=socket.SOCK_STREAM)
            except socket.gaierror as e:
                raise ConfigError(f"{what}: {e.strerror}") from None
            family, _type, _proto, _name, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
                sock.listen(16)
            except OSError as e:
                sock.close()
                raise ConfigError(f"{what}: cannot listen on {self.options.describe()}: "
                                  f"{e.strerror or e}") from None
        sock.setblocking(False)
        return sock

    @property
    def port(self) -> int | None:
        return None if self.options.unix_path else self.address[1]

    def _family(self, sock: socket.socket) -> str:
        return {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6",
                socket.AF_UNIX: "unix"}.get(sock.family, "unknown")

    def server_info(self) -> dict:
        family = self._family(self._listener)
        if family == "unix":
            host, service = self.options.unix_path, self.options.unix_path
        else:
            host, service = self.address[0], str(self.address[1])
        return {"host": host, "service": service, "family": family, "websocket": False,
                "auth": "vnc" if self.options.password else "none"}

    def _accept(self, _mask: int) -> None:
        try:
            sock, peer = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("vnc: accept failed: %s", e)
            return
        if len(self.clients) >= self.options.connections:
            log.info("vnc: refusing a client: %d connections already", len(self.clients))
            sock.close()
            return
        sock.setblocking(False)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            host, service = peer[0], str(peer[1])
        else:
            host = service = self.options.unix_path or ""
        client = _Client(sock, None, host, service, self._family(sock))  # type: ignore[arg-type]
        hooks = SessionHooks(
            check_auth=self._check_auth if self.options.password else None,
            client_init=lambda shared, c=client: self._client_init(c, shared),
            initialized=lambda c=client: self._emit("VNC_INITIALIZED", c),
            key=lambda keysym, down: self.console.key_event(keysym, down),
            scancode=lambda code, down: self.console.scancode_event(code, down),
            pointer=lambda x, y, mask: self.console.pointer_event(x, y, mask),
            wake=lambda c=client: self._schedule(c),
            resize=lambda w, h: self.console.surface.request_size(w, h))
        client.session = RfbSession(self.console.surface, hooks, auth=self.options.password,
                                    name=self.name)
        self.clients.append(client)
        self._emit("VNC_CONNECTED", client)
        self._pump(client)

    # -- events ----------------------------------------------------------------------------
    def client_info(self, client: _Client) -> dict:
        return {"host": client.host, "service": client.service, "family": client.family,
                "websocket": False}

    def _emit(self, name: str, client: _Client) -> None:
        server = self.server_info()
        if name == "VNC_CONNECTED":          # VncBasicInfo; the others get VncServerInfo
            server.pop("auth")
        try:
            self.on_event(name, {"server": server, "client": self.client_info(client)})
        except Exception:
            log.exception("vnc: event listener failed")

    # -- authentication and sharing ---------------------------------------------------------
    def set_password(self, password: str) -> None:
        self.password = password
        self.password_expires = None

    def expire_password(self, when: str) -> None:
        """QMP ``expire_password``: ``now``, ``never``, ``+SECONDS`` or a UNIX time."""
        now = time.time()
        if when == "now":
            self.password_expires = now
        elif when == "never":
            self.password_expires = None
        elif when.startswith("+") and when[1:].isdigit():
            self.password_expires = now + int(when[1:])
        elif when.isdigit():
            self.password_expires = float(when)
        else:
            raise ValueError(f"Invalid parameter 'time': {when}")

    def _check_auth(self, challenge: bytes, response: bytes) -> bool:
        if self.password is None:
            log.info("vnc: login refused: no password set (QMP set_password)")
            return False
        if self.password_expires is not None and time.time() >= self.password_expires:
            log.info("vnc: login refused: the password has expired")
            return False
        return vnc_auth_response(self.password, challenge) == response

    def _client_init(self, client: _Client, shared: bool) -> str | None:
        policy = self.options.share
        if policy == "ignore":
            return None
        if not shared:
            if policy == "force-shared":
                return "exclusive access refused (share=force-shared)"
            for other in list(self.clients):
                if other is not client and other.session.initialized:
                    self._drop(other, "another client asked for exclusive access")
        client.shared = shared
        return None

    # -- I/O ---------------------------------------------------------------------------------
    def _schedule(self, client: _Client) -> None:
        """The surface changed or the client asked: make an update on the loop thread."""
        if client.update_scheduled:
            return
        client.update_scheduled = True

        def run() -> None:
            client.update_scheduled = False
            if client in self.clients and client.session.update():
                self._pump(client)
        self.loop.call_soon(run)

    def _pump(self, client: _Client) -> None:
        """Flush the session's output; watch for what the socket can do next."""
        session = client.session
        while session.outbox:
            try:
                n = client.sock.send(session.outbox)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._drop(client, f"send: {e.strerror or e}")
                return
            del session.outbox[:n]
        if session.closed and not session.outbox:
            self._drop(client, session.closed)
            return
        want = EVENT_READ | (EVENT_WRITE if session.outbox else 0)
        if want != client.watching:
            client.watching = want
            self.loop.watch(client.sock.fileno(), want,
                            lambda mask, c=client: self._ready(c, mask))

    def _ready(self, client: _Client, mask: int) -> None:
        if client not in self.clients:
            return
        if mask & EVENT_READ:
            try:
                data = client.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as e:
                self._drop(client, f"recv: {e.strerror or e}")
                return
            if data == b"":
                self._drop(client, "client closed the connection")
                return
            if data:
                client.session.receive(data)
                client.session.update()
        self._pump(client)

    def _drop(self, client: _Client, reason: str) -> None:
        if client not in self.clients:
            return
        self.clients.remove(client)
        log.info("vnc: client %s:%s gone: %s", client.host, client.service, reason)
        client.session.close(reason)
        self.loop.unwatch(client.sock.fileno())
        sock = client.sock
        self.loop.call_soon(sock.close)
        self._emit("VNC_DISCONNECTED", client)

    # -- lifecycle ---------------------------------------------------------------------------
    def flush(self) -> None:
        """Nothing buffered for the guest (lets the server sit in a list of backends)."""

    def close(self) -> None:
        def shut() -> None:
            for client in list(self.clients):
                self._drop(client, "server closed")
            self.loop.unwatch(self._listener.fileno())
            self.loop.call_soon(self._listener.close)
        self.loop.call_soon(shut)
        if self._owned is not None:
            self._owned.remove()

