"""The VNC server on real sockets: kemu's I/O loop, vncdotool (PyPI) as the client."""

import socket
import struct
import threading
import time

import pytest

from kemu.backends.ioloop import IoLoop
from kemu.display.console import DisplayConsole
from kemu.display.surface import Rect
from kemu.display.vnc import VncServer, vnc_auth_response
from kemu.options.display import parse_display_option, parse_vnc_option
from kemu.errors import ConfigError

vncapi = pytest.importorskip("vncdotool.api", reason="vncdotool (pip install -e '.[test]')")


@pytest.fixture
def display():
    console = DisplayConsole()
    console.surface.resize(160, 100)
    console.surface.fill(Rect(10, 20, 30, 10), bytes([0, 0, 255, 0]))
    loop = IoLoop()
    servers = []
    events = []

    def serve(text="127.0.0.1:0", **kwargs):
        opts = parse_vnc_option(text)
        if not opts.unix_path:
            opts.port = 0                  # any free port (the tests run side by side)
        server = VncServer(console, loop, opts,
                           on_event=lambda name, data: events.append((name, data)), **kwargs)
        servers.append(server)
        return server
    yield console, serve, events
    for s in servers:
        s.close()
    loop.close()


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


class RawClient:
    """A minimal RFB client on a socket, for what vncdotool does not do (failures)."""

    def __init__(self, port, shared=True, password=None, version=b"RFB 003.008\n"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert self.recv(12) == b"RFB 003.008\n"
        self.sock.sendall(version)
        n = self.recv(1)[0]
        types = self.recv(n)
        self.sock.sendall(types[:1])
        if types[0] == 2:
            challenge = self.recv(16)
            self.sock.sendall(vnc_auth_response(password or "", challenge))
        self.result = struct.unpack(">I", self.recv(4))[0]
        if self.result == 0:
            self.sock.sendall(bytes([shared]))

    def recv(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def server_init(self):
        w, h = struct.unpack(">HH", self.recv(4))
        self.recv(16)
        n, = struct.unpack(">I", self.recv(4))
        return w, h, self.recv(n)

    def closed(self):
        try:
            self.sock.settimeout(5)
            return self.sock.recv(1) == b""
        except OSError:
            return True


def test_parse_options():
    o = parse_vnc_option(":1")
    assert (o.host, o.port, o.password) == ("127.0.0.1", 5901, False)
    o = parse_vnc_option("0.0.0.0:2,password=on,share=force-shared")
    assert (o.host, o.port, o.password, o.share) == ("0.0.0.0", 5902, True, "force-shared")
    assert parse_vnc_option("[::1]:3").host == "::1"
    assert parse_vnc_option("unix:/tmp/x.sock").unix_path == "/tmp/x.sock"
    assert not parse_vnc_option("none").enabled
    assert parse_display_option("none") == ("none", None)
    kind, opts = parse_display_option("vnc=:4")
    assert kind == "vnc" and opts.port == 5904
    for bad in ("1", ":x", ":70000", ":1,share=maybe", ":1,password=yes", ":1,foo=1",
                ":1,to=9", "unix:"):
        with pytest.raises(ConfigError):
            parse_vnc_option(bad)
    with pytest.raises(ConfigError):
        parse_display_option("gtk")


def test_vncdotool_captures_what_the_surface_holds(display, tmp_path):
    console, serve, events = display
    server = serve()
    client = vncapi.connect(f"127.0.0.1::{server.port}", timeout=20)
    try:
        client.captureScreen(str(tmp_path / "cap.png"))
        from PIL import Image
        got = Image.open(tmp_path / "cap.png").convert("RGB")
        w, h, rgb = console.surface.to_rgb()
        assert got.size == (w, h) and got.tobytes() == rgb
        assert got.getpixel((15, 25)) == (255, 0, 0)
        # key and pointer events go to the console's devices
        keys = []
        console.key_event = lambda keysym, down: keys.append((keysym, down))
        client.keyPress("a")
        assert wait_for(lambda: keys == [(0x61, True), (0x61, False)])
    finally:
        client.disconnect()
    assert wait_for(lambda: [e[0] for e in events] ==
                    ["VNC_CONNECTED", "VNC_INITIALIZED", "VNC_DISCONNECTED"])
    assert events[1][1]["server"]["auth"] == "none"
    assert events[0][1]["client"]["host"] == "127.0.0.1"


def test_password_set_expired_and_wrong(display):
    _console, serve, _events = display
    server = serve("127.0.0.1:0,password=on")
    assert RawClient(server.port, password="x").result == 1     # no password set yet
    server.set_password("s3cret")
    c = RawClient(server.port, password="s3cret")
    assert c.result == 0 and c.server_init()[:2] == (160, 100)
    client = vncapi.connect(f"127.0.0.1::{server.port}", password="s3cret", timeout=20)
    try:
        client.refreshScreen()
        assert client.screen.size == (160, 100)
    finally:
        client.disconnect()
    assert RawClient(server.port, password="wrong").result == 1
    server.expire_password("now")
    assert RawClient(server.port, password="s3cret").result == 1
    server.expire_password("never")
    assert RawClient(server.port, password="s3cret").result == 0


def test_several_clients_and_share_policies(display):
    _console, serve, _events = display
    server = serve()
    a, b = RawClient(server.port), RawClient(server.port)
    a.server_init(), b.server_init()
    assert wait_for(lambda: len(server.clients) == 2)
    # allow-exclusive: a client asking for exclusive access disconnects the others
    c = RawClient(server.port, shared=False)
    c.server_init()
    assert a.closed() and b.closed()
    assert wait_for(lambda: len(server.clients) == 1)
    forced = serve("127.0.0.1:0,share=force-shared")
    d = RawClient(forced.port, shared=False)
    assert d.closed()
    e = RawClient(forced.port, shared=True)
    assert e.server_init()[:2] == (160, 100)


def test_connection_limit_and_hostile_client(display):
    _console, serve, _events = display
    server = serve("127.0.0.1:0,connections=2")
    bad = socket.create_connection(("127.0.0.1", server.port))
    bad.recv(12)
    bad.sendall(b"\xff" * 64)                    # not RFB: closed, server goes on
    bad.settimeout(5)
    assert bad.recv(100) == b""
    assert wait_for(lambda: len(server.clients) == 0)
    a, b = RawClient(server.port), RawClient(server.port)
    a.server_init(), b.server_init()
    third = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    assert third.recv(12) == b""                # over connections=2: refused
    # the two others still work
    a.sock.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, 160, 100))
    assert a.recv(4)[0] == 0


def test_unix_socket(display, tmp_path):
    _console, serve, _events = display
    path = tmp_path / "vnc.sock"
    server = serve(f"unix:{path}")
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    assert sock.recv(12) == b"RFB 003.008\n"
    assert server.server_info()["family"] == "unix"
    sock.close()
    server.close()
    assert wait_for(lambda: not path.exists())


def test_listen_failure_is_one_line(display):
    _console, serve, _events = display
    server = serve()
    opts = parse_vnc_option(f"127.0.0.1:{server.port - 5900}")
    loop = IoLoop()
    try:
        with pytest.raises(ConfigError, match="cannot listen"):
            VncServer(DisplayConsole(), loop, opts)
    finally:
        loop.close()
