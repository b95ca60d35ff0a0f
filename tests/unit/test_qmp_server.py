"""The QMP socket server over a stand-in machine: clients, events, a client that stops reading."""

import json
import os
import socket
import stat
import time

import pytest
from test_qmp_commands import FakeVm

from kemu.errors import ConfigError
from kemu.qmp.protocol import event
from kemu.qmp.server import MAX_EVENT_BACKLOG, QmpServer, parse_qmp_option


class ListeningVm(FakeVm):
    def __init__(self):
        super().__init__()
        self.listeners = []

    def add_listener(self, listener):
        self.listeners.append(listener)


@pytest.fixture
def server(tmp_path):
    vm = ListeningVm()
    srv = QmpServer(vm, parse_qmp_option(f"unix:{tmp_path / 'q.sock'},server=on,wait=off"))
    srv.start()
    yield srv, vm, tmp_path / "q.sock"
    srv.close()


def connect(path, negotiate=True):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(path))
    f = s.makefile("rwb")
    assert "QMP" in json.loads(f.readline())
    if negotiate:
        f.write(b'{"execute": "qmp_capabilities"}\n')
        f.flush()
        assert json.loads(f.readline()) == {"return": {}}
    return s, f


def test_socket_mode_and_events_to_negotiated_clients_only(server):
    srv, vm, path = server
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    a, fa = connect(path)
    b, fb = connect(path)
    c, fc = connect(path, negotiate=False)
    [listener] = vm.listeners
    listener(event("STOP"))
    assert json.loads(fa.readline())["event"] == "STOP"
    assert json.loads(fb.readline())["event"] == "STOP"
    # c never negotiated: its next line is the answer to its command, no event
    fc.write(b'{"execute": "query-status"}\n')
    fc.flush()
    assert json.loads(fc.readline())["error"]["class"] == "CommandNotFound"
    for s in (a, b, c):
        s.close()


def test_a_client_that_stops_reading_is_dropped(server):
    srv, vm, path = server
    lazy, _ = connect(path)
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    busy, fbusy = connect(path)
    [listener] = vm.listeners
    big = event("BIG", {"pad": "x" * 65536})
    for _ in range(3 * MAX_EVENT_BACKLOG // 65536):
        listener(big)
        assert json.loads(fbusy.readline())["event"] == "BIG"   # busy keeps up
    deadline = time.monotonic() + 10
    while len(srv._clients) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(srv._clients) == 1
    fbusy.write(b'{"execute": "query-status"}\n')
    fbusy.flush()
    assert json.loads(fbusy.readline())["return"]["status"] == "running"
    lazy.close()
    busy.close()


def test_tcp_on_loopback_and_an_address_in_use(tmp_path):
    vm = ListeningVm()
    srv = QmpServer(vm, parse_qmp_option("tcp::0,server=on,wait=off"))
    srv.start()
    try:
        assert srv._server.sockets[0].getsockname()[0] == "127.0.0.1"
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        assert b"QMP" in s.makefile("rb").readline()
        s.close()
        clash = QmpServer(vm, parse_qmp_option(f"tcp::{srv.port},server=on,wait=off"))
        with pytest.raises(ConfigError):
            clash.start()
    finally:
        srv.close()
