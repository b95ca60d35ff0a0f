"""virtio-vsock (VIRTIO 1.2 section 5.10) through virtio-mmio and the test driver."""

import socket
import threading
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_driver import VirtioMmioDriver, make_memory

from kemu.backends.ioloop import IoLoop
from kemu.devices.base import IrqLine
from kemu.devices.virtio import vsock as v
from kemu.devices.virtio.mmio import VirtioMmioTransport
from kemu.devices.virtio.vsock import HDR, HDR_SIZE, VirtioVsock

CID = 3


class FakeStream:
    def __init__(self):
        self.data = b""
        self.conn = None
        self.closed = self.shut = False
        self.ok = None
        self.reading = True

    def bind(self, conn):
        self.conn = conn

    def write(self, data):
        self.data += data
        return len(data)

    def established(self, port):
        self.ok = port

    def set_reading(self, on):
        self.reading = on

    def shutdown_write(self):
        self.shut = True

    def close(self):
        self.closed = True


class FakeBackend:
    def __init__(self, ports=(5000,)):
        self.ports = ports
        self.streams = []
        self.device = None

    def attach(self, device):
        self.device = device

    def connect(self, port):
        if port not in self.ports:
            return None
        s = FakeStream()
        self.streams.append(s)
        return s

    def close(self):
        pass


def make(ports=(5000,), mem_size=2 << 20):
    mem = make_memory(mem_size)
    backend = FakeBackend(ports)
    dev = VirtioVsock(CID, backend)
    t = VirtioMmioTransport(dev, mem, IrqLine())
    drv = VirtioMmioDriver(t, mem)
    rx, tx, _ev = drv.init(3)
    return mem, backend, dev, t, drv, rx, tx


def pkt(op, src_port=1234, dst_port=5000, data=b"", *, src_cid=CID, dst_cid=2, type_=1,
        flags=0, buf_alloc=65536, fwd_cnt=0, length=None):
    return HDR.pack(src_cid, dst_cid, src_port, dst_port, len(data) if length is None else length,
                    type_, op, flags, buf_alloc, fwd_cnt) + data


def give_rx(drv, rx, n=8, size=4096):
    bufs = [drv.buffer(size, writable=True) for _ in range(n)]
    for b in bufs:
        rx.add([b], kick=False)
    rx.kick()
    return bufs


def received(mem, rx, bufs):
    """Packets the device put in the receive buffers: (header tuple, payload)."""
    out = []
    by_head = {i: b for i, b in enumerate(bufs)}
    for head, length in rx.get_used():
        raw = mem.read(by_head[head].addr, length)
        out.append((HDR.unpack(raw[:HDR_SIZE]), raw[HDR_SIZE:]))
    return out


def test_identity_and_cid():
    _mem, _b, _dev, _t, drv, _rx, _tx = make()
    assert drv.r32(0x008) == 19
    assert drv.config(0, 8) == CID


def test_guest_connects_sends_and_gets_credit_back():
    mem, backend, dev, t, drv, rx, tx = make()
    bufs = give_rx(drv, rx)
    tx.add([drv.buffer(pkt(v.OP_REQUEST))])
    (hdr, _), = received(mem, rx, bufs)
    assert hdr[:4] == (2, CID, 5000, 1234) and hdr[6] == v.OP_RESPONSE
    assert hdr[8] == v.BUF_ALLOC
    tx.add([drv.buffer(pkt(v.OP_RW, data=b"hello")), ])
    assert backend.streams[0].data == b"hello"
    assert dev.conns[(1234, 5000)].fwd_cnt == 5
    tx.add([drv.buffer(pkt(v.OP_CREDIT_REQUEST))])
    (hdr, _), = received(mem, rx, bufs)
    assert hdr[6] == v.OP_CREDIT_UPDATE and hdr[9] == 5
    assert not t.needs_reset


def test_connect_to_nobody_is_reset():
    mem, _backend, _dev, _t, drv, rx, tx = make(ports=())
    bufs = give_rx(drv, rx)
    tx.add([drv.buffer(pkt(v.OP_REQUEST))])
    (hdr, _), = received(mem, rx, bufs)
    assert hdr[6] == v.OP_RST


def test_host_data_respects_guest_credit():
    mem, _backend, dev, _t, drv, rx, tx = make()
    bufs = give_rx(drv, rx, 16, 1024)
    tx.add([drv.buffer(pkt(v.OP_REQUEST, buf_alloc=1500))])
    received(mem, rx, bufs)
    conn = dev.conns[(1234, 5000)]
    dev.host_data(conn, bytes(range(256)) * 10)           # 2560 bytes, credit 1500
    got = received(mem, rx, bufs)
    assert sum(len(p) for _, p in got) == 1500 and all(h[6] == v.OP_RW for h, _ in got)
    assert conn.credit == 0 and len(conn.pending) == 1060
    tx.add([drv.buffer(pkt(v.OP_CREDIT_UPDATE, buf_alloc=1500, fwd_cnt=1500))])
    more = received(mem, rx, bufs)
    assert b"".join(p for _, p in got + more) == bytes(range(256)) * 10


def test_guest_exceeding_credit_is_reset():
    mem, backend, dev, _t, drv, rx, tx = make(mem_size=4 << 20)
    bufs = give_rx(drv, rx)
    tx.add([drv.buffer(pkt(v.OP_REQUEST))])
    received(mem, rx, bufs)
    backend.streams[0].write = lambda data: 0          # the host peer reads nothing
    for _ in range(v.BUF_ALLOC // v.MAX_PKT):
        tx.add([drv.buffer(pkt(v.OP_RW, data=bytes(v.MAX_PKT)))])
    assert (1234, 5000) in dev.conns
    tx.add([drv.buffer(pkt(v.OP_RW, data=b"x"))])
    assert (1234, 5000) not in dev.conns and backend.streams[0].closed
    assert received(mem, rx, bufs)[-1][0][6] == v.OP_RST


def test_host_initiated_connection():
    mem, _backend, dev, _t, drv, rx, tx = make()
    bufs = give_rx(drv, rx)
    stream = FakeStream()
    conn = dev.host_connect(6000, stream)
    (hdr, _), = received(mem, rx, bufs)
    assert hdr[6] == v.OP_REQUEST and hdr[3] == 6000 and hdr[2] == conn.host_port
    tx.add([drv.buffer(pkt(v.OP_RESPONSE, src_port=6000, dst_port=conn.host_port))])
    assert stream.ok == conn.host_port
    dev.host_eof(conn)
    (hdr, _), = received(mem, rx, bufs)
    assert hdr[6] == v.OP_SHUTDOWN and hdr[7] == v.SHUTDOWN_SEND
    tx.add([drv.buffer(pkt(v.OP_SHUTDOWN, src_port=6000, dst_port=conn.host_port, flags=3))])
    assert stream.closed and not dev.conns


def test_bad_packets_never_crash():
    mem, _backend, dev, t, drv, rx, tx = make()
    bufs = give_rx(drv, rx)
    tx.add([drv.buffer(pkt(v.OP_REQUEST, src_cid=7))])          # spoofed source: dropped
    tx.add([drv.buffer(pkt(v.OP_REQUEST, type_=2))])            # seqpacket not offered
    tx.add([drv.buffer(pkt(v.OP_RW, length=100))])              # len beyond the buffer
    tx.add([drv.buffer(pkt(99))])                               # unknown op
    tx.add([drv.buffer(pkt(v.OP_RW, src_port=9, data=b"x"))])   # no such connection
    ops = [h[6] for h, _ in received(mem, rx, bufs)]
    assert ops == [v.OP_RST] * 4 and dev.bad_packets == 4 and not t.needs_reset
    tx.add([drv.buffer(b"short")])                              # no header at all
    assert t.needs_reset and mem.violations == []


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([CID, CID, 2, 7]), st.sampled_from([2, 2, 1, 3]),
                          st.integers(0, 3), st.sampled_from([5000, 5000, 1]),
                          st.integers(0, 9), st.integers(0, 3), st.binary(max_size=64),
                          st.integers(0, 1 << 32 - 1)), max_size=20))
def test_fuzz_packets(packets):
    mem, _backend, dev, _t, drv, rx, tx = make()
    give_rx(drv, rx, 4, 64)
    for cid, dst, sport, dport, op, flags, data, credit in packets:
        tx.add([drv.buffer(pkt(op, sport, dport, data, src_cid=cid, dst_cid=dst, flags=flags,
                               buf_alloc=credit))])
        for conn in list(dev.conns.values()):
            dev.host_data(conn, b"y" * 100)
    assert mem.violations == []
    assert len(dev._control) <= v.CONTROL_MAX


def test_uds_backend_both_directions(tmp_path):
    from kemu.backends.vsock_uds import UdsVsockBackend

    mem = make_memory(2 << 20)
    loop = IoLoop(threading.RLock())
    path = str(tmp_path / "v.sock")
    backend = UdsVsockBackend(loop, path)
    dev = VirtioVsock(CID, backend)
    t = VirtioMmioTransport(dev, mem, IrqLine())
    drv = VirtioMmioDriver(t, mem)
    rx, tx, _ev = drv.init(3)

    def locked(fn, *a):
        with loop.lock:
            return fn(*a)

    bufs = locked(give_rx, drv, rx, 32, 1024)
    # host -> guest: CONNECT, the guest answers, OK comes back
    host = socket.socket(socket.AF_UNIX)
    host.connect(path)
    host.sendall(b"CONNECT 6000\nearly")
    deadline = time.monotonic() + 5
    while not dev.conns and time.monotonic() < deadline:
        time.sleep(0.01)
    (_key, conn), = dev.conns.items()
    locked(tx.add, [drv.buffer(pkt(v.OP_RESPONSE, src_port=6000, dst_port=conn.host_port))])
    host.settimeout(5)
    assert host.recv(100) == b"OK %d\n" % conn.host_port
    deadline = time.monotonic() + 5
    payload = b""
    while b"early" not in payload and time.monotonic() < deadline:
        time.sleep(0.02)
        payload = b"".join(p for _, p in locked(received, mem, rx, bufs))
    assert payload == b"early"
    locked(tx.add, [drv.buffer(pkt(v.OP_RW, 6000, conn.host_port, b"to-host"))])
    assert host.recv(100) == b"to-host"
    # guest -> host: a listener at path_5000
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(path + "_5000")
    lst.listen()
    locked(tx.add, [drv.buffer(pkt(v.OP_REQUEST, 77, 5000))])
    peer, _ = lst.accept()
    locked(tx.add, [drv.buffer(pkt(v.OP_RW, 77, 5000, b"hi"))])
    peer.settimeout(5)
    assert peer.recv(10) == b"hi"
    locked(backend.close)
    loop.close()
