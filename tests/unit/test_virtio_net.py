"""virtio-net (VIRTIO 1.2 section 5.1) through virtio-mmio and the test driver."""

import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_driver import VirtioMmioDriver, make_memory

from kemu.backends.ioloop import IoLoop
from kemu.devices.base import IrqLine
from kemu.devices.virtio import VIRTIO_F_VERSION_1
from kemu.devices.virtio import net as n
from kemu.devices.virtio.mmio import VirtioMmioTransport
from kemu.devices.virtio.net import VirtioNet, default_mac, parse_mac
from kemu.errors import ConfigError

HDR = n.NET_HDR_SIZE
FRAME = bytes.fromhex("ffffffffffff525400123456") + b"\x08\x00" + bytes(range(50))


class FakeBackend:
    def __init__(self):
        self.sent = []
        self.receive = None
        self.resumed = 0
        self.closed = False

    def connect(self, receive):
        self.receive = receive

    def send(self, frame):
        self.sent.append(frame)

    def resume(self):
        self.resumed += 1

    def close(self):
        self.closed = True


def make(mrg=True, features=None, mask=~0, size=None, mem_size=4 << 20, **kw):
    mem = make_memory(mem_size)
    backend = FakeBackend()
    dev = VirtioNet(backend, default_mac(0), mrg_rxbuf=mrg, **kw)
    irq = IrqLine()
    t = VirtioMmioTransport(dev, mem, irq)
    drv = VirtioMmioDriver(t, mem)
    rx, tx = drv.init(2, features=features, mask=mask, size=size)
    return mem, backend, dev, irq, t, drv, rx, tx


def hdr(gso=0, num_buffers=0):
    return n.NET_HDR.pack(0, gso, 0, 0, 0, 0, num_buffers)


def test_identity_features_config():
    _mem, backend, _dev, _irq, _t, drv, _rx, _tx = make()
    assert drv.r32(0x008) == 1
    feats = drv.device_features()
    assert feats >> n.VIRTIO_NET_F_MAC & 1 and feats >> n.VIRTIO_NET_F_STATUS & 1
    assert feats >> n.VIRTIO_NET_F_MRG_RXBUF & 1 and feats >> VIRTIO_F_VERSION_1 & 1
    assert bytes(drv.config(i, 1) for i in range(6)) == bytes.fromhex("525400123456")
    assert drv.config(6, 2) == n.VIRTIO_NET_S_LINK_UP
    assert drv.config(8, 2) == 1
    assert backend.receive is not None
    _mem, _b, _d, _i, _t, drv, _rx, _tx = make(mrg=False)
    assert not drv.device_features() >> n.VIRTIO_NET_F_MRG_RXBUF & 1


def test_macs():
    assert default_mac(0) == bytes.fromhex("525400123456")
    assert default_mac(3) == bytes.fromhex("525400123459")
    assert parse_mac("52:54:00:ab:cd:ef") == bytes.fromhex("525400abcdef")
    for bad in ("52:54:00:ab:cd", "zz:54:00:ab:cd:ef", "01:00:5e:00:00:01", "525400abcdef"):
        with pytest.raises(ConfigError):
            parse_mac(bad)


def test_transmit_strips_header():
    _mem, backend, dev, irq, _t, drv, _rx, tx = make()
    head = tx.add([drv.buffer(hdr()), drv.buffer(FRAME[:20]), drv.buffer(FRAME[20:])])
    assert tx.get_used() == [(head, 0)]
    assert backend.sent == [FRAME] and dev.stats.tx_frames == 1 and irq.level


def test_transmit_drops_bad_frames_but_keeps_going():
    _mem, backend, dev, _irq, t, drv, _rx, tx = make()
    tx.add([drv.buffer(hdr() + b"short")], kick=False)              # < Ethernet header
    tx.add([drv.buffer(hdr(gso=1) + FRAME)], kick=False)             # GSO not negotiated
    tx.add([drv.buffer(hdr()), drv.buffer(n.MAX_FRAME + 1)], kick=False)   # too long
    tx.add([drv.buffer(hdr() + FRAME)])
    assert len(tx.get_used()) == 4
    assert backend.sent == [FRAME] and dev.stats.tx_dropped == 3 and not t.needs_reset


def test_transmit_without_header_is_a_device_error():
    mem, backend, _dev, _irq, t, drv, _rx, tx = make()
    tx.add([drv.buffer(b"\0" * 11)])
    assert t.needs_reset and backend.sent == [] and mem.violations == []


def test_backend_send_failure_is_a_lost_frame():
    _mem, backend, dev, _irq, t, drv, _rx, tx = make()

    def broken(frame):
        raise OSError("gone")
    backend.send = broken
    tx.add([drv.buffer(hdr() + FRAME)])
    assert tx.get_used() == [(0, 0)] and dev.stats.tx_dropped == 1 and not t.needs_reset


def test_receive_into_one_buffer():
    mem, backend, dev, irq, _t, drv, rx, _tx = make()
    buf = drv.buffer(2048, writable=True)
    head = rx.add([buf])
    drv.ack()
    assert backend.receive(FRAME) is True
    assert rx.get_used() == [(head, HDR + len(FRAME))]
    data = mem.read(buf.addr, HDR + len(FRAME))
    assert data[:HDR] == hdr(num_buffers=1) and data[HDR:] == FRAME
    assert irq.level and dev.stats.rx_frames == 1


def test_receive_waits_for_buffers_then_delivers_in_order():
    mem, backend, _dev, _irq, _t, drv, rx, _tx = make()
    frames = [FRAME + bytes([i]) for i in range(5)]
    for f in frames:
        assert backend.receive(f) is True
    assert rx.get_used() == []
    bufs = [drv.buffer(256, writable=True) for _ in range(5)]
    for b in bufs:
        rx.add([b], kick=False)
    rx.kick()
    used = rx.get_used()
    assert [u[1] for u in used] == [HDR + len(f) for f in frames]
    for b, f in zip(bufs, frames):
        assert mem.read(b.addr + HDR, len(f)) == f


def test_mergeable_frame_spans_buffers():
    mem, backend, _dev, _irq, _t, drv, rx, _tx = make()
    big = FRAME + bytes(2900)
    bufs = [drv.buffer(1024, writable=True) for _ in range(4)]
    heads = [rx.add([b], kick=False) for b in bufs]
    backend.receive(big)
    used = rx.get_used()
    assert [u[0] for u in used] == heads[:3]
    assert [u[1] for u in used] == [1024, 1024, HDR + len(big) - 2048]
    got = b"".join(mem.read(b.addr, u[1]) for b, u in zip(bufs, used))
    assert got[:HDR] == hdr(num_buffers=3) and got[HDR:] == big


def test_mergeable_frame_waits_for_enough_buffers():
    mem, backend, _dev, _irq, _t, drv, rx, _tx = make()
    big = FRAME + bytes(1500)
    first = drv.buffer(1024, writable=True)
    rx.add([first])
    backend.receive(big)
    assert rx.get_used() == []                 # held, not split across a missing buffer
    second = drv.buffer(1024, writable=True)
    rx.add([second])
    used = rx.get_used()
    assert len(used) == 2
    assert mem.read(first.addr, HDR)[-2:] == b"\x02\x00"


def test_without_mergeable_small_buffer_drops_frame_keeps_buffer():
    mem, backend, dev, _irq, t, drv, rx, _tx = make(mrg=False)
    small = drv.buffer(128, writable=True)
    rx.add([small])
    backend.receive(FRAME + bytes(200))
    assert rx.get_used() == [] and dev.stats.rx_dropped == 1
    backend.receive(FRAME)
    assert rx.get_used() == [(0, HDR + len(FRAME))]
    assert mem.read(small.addr, HDR) == hdr(num_buffers=1) and not t.needs_reset


def test_tiny_receive_buffer_is_a_device_error():
    _mem, backend, _dev, _irq, t, drv, rx, _tx = make()
    rx.add([drv.buffer(8, writable=True)])
    backend.receive(FRAME)
    assert t.needs_reset


def test_ring_that_can_never_hold_the_frame_drops_it():
    _mem, backend, dev, _irq, t, drv, rx, _tx = make(size=4)
    for _ in range(4):
        rx.add([drv.buffer(16, writable=True)], kick=False)
    backend.receive(FRAME + bytes(200))
    assert dev.stats.rx_dropped == 1 and not t.needs_reset


def test_backpressure_pauses_and_resumes_backend():
    _mem, backend, dev, _irq, _t, drv, rx, _tx = make()
    results = [backend.receive(FRAME) for _ in range(n.RX_PENDING_FRAMES)]
    assert results[-1] is False and all(results[:-1])
    assert backend.resumed == 0
    for _ in range(n.RX_PENDING_FRAMES):
        rx.add([drv.buffer(128, writable=True)], kick=False)
    rx.kick()
    assert len(rx.get_used()) == n.RX_PENDING_FRAMES
    assert backend.resumed == 1 and dev.stats.rx_dropped == 0


def test_frames_before_driver_ok_and_after_reset_are_dropped():
    mem = make_memory()
    backend = FakeBackend()
    dev = VirtioNet(backend)
    t = VirtioMmioTransport(dev, mem, IrqLine())
    assert backend.receive(FRAME) is True and dev.stats.rx_dropped == 1
    drv = VirtioMmioDriver(t, mem)
    drv.init(2)
    backend.receive(FRAME)
    drv.w32(0x070, 0)                      # reset
    assert backend.receive(FRAME) is True and dev.stats.rx_dropped == 2


def test_link_down_is_a_config_change():
    _mem, backend, dev, _irq, _t, drv, _rx, _tx = make()
    drv.ack()
    dev.set_link(False)
    assert drv.config(6, 2) == 0 and drv.interrupt_status() & 2
    assert backend.receive(FRAME) is True and dev.stats.rx_dropped == 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 3000), st.booleans()), max_size=12),
       st.lists(st.binary(min_size=0, max_size=3000), max_size=6))
def test_fuzz_queues_never_crash(tx_chains, frames):
    mem, backend, _dev, _irq, _t, drv, rx, tx = make(mem_size=1 << 20)
    for hdr_len, body, writable in tx_chains:
        bufs = [drv.buffer(bytes(hdr_len))] + ([drv.buffer(body, writable)] if body else [])
        tx.add(bufs, kick=False)
        rx.add([drv.buffer(body or 1, writable=writable)], kick=False)
    tx.kick()
    rx.kick()
    for f in frames:
        assert backend.receive(f) in (True, False)
    assert mem.violations == []


def pair_with_fake_passt():
    """A StreamBackend (passt's protocol) on a socketpair; the test plays passt."""
    from kemu.backends.passt import StreamBackend

    ours, theirs = socket.socketpair()
    loop = IoLoop(threading.RLock())
    return StreamBackend(loop, ours, "fake"), theirs, loop


def test_passt_stream_framing_both_ways():
    backend, peer, loop = pair_with_fake_passt()
    got = []
    backend.connect(lambda f: got.append(f) or True)
    # two frames, split awkwardly across writes
    data = b"".join(struct.pack(">I", len(f)) + f for f in (FRAME, FRAME[::-1]))
    peer.sendall(data[:7])
    time.sleep(0.05)
    peer.sendall(data[7:])
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == [FRAME, FRAME[::-1]]
    backend.send(FRAME)
    peer.settimeout(5)
    assert peer.recv(4) == struct.pack(">I", len(FRAME))
    assert peer.recv(len(FRAME), socket.MSG_WAITALL) == FRAME
    backend.close()
    loop.close()


def test_passt_oversized_frame_hangs_up():
    backend, peer, loop = pair_with_fake_passt()
    got = []
    backend.connect(lambda f: got.append(f) or True)
    peer.sendall(struct.pack(">I", 1 << 30) + b"x" * 100)
    time.sleep(0.2)
    assert got == [] and backend._paused
    loop.close()


def test_hostfwd_spelling():
    from kemu.backends.passt import HostForward, parse_hostfwd
    assert parse_hostfwd("tcp::8022-:22") == HostForward("tcp", "", 8022, 22)
    assert parse_hostfwd("udp:127.0.0.1:53-10.0.2.15:5353").passt_args() == [
        "-u", "127.0.0.1/53:5353"]
    assert parse_hostfwd("::8080-:80").passt_args() == ["-t", "8080:80"]
    for bad in ("tcp:8022-:22", "sctp::1-:2", "tcp::0-:22", "tcp::x-:22", "tcp::8022"):
        with pytest.raises(ConfigError):
            parse_hostfwd(bad)


def test_missing_passt_is_one_clear_error(monkeypatch):
    from kemu.backends import passt
    monkeypatch.setattr(passt.shutil, "which", lambda name: None)
    with pytest.raises(passt.PasstError, match="apt-get install passt") as exc:
        passt.PasstBackend(IoLoop())
    assert exc.value.exit_status == 2


def test_tap_open_failure_is_one_clear_error(tmp_path):
    from kemu.backends.tap import TapError, open_tap
    with pytest.raises(TapError, match="cannot open"):
        open_tap("tap0", str(tmp_path / "no-tun"))
    with pytest.raises(TapError, match="longer than 15"):
        open_tap("x" * 20)


def test_tap_backend_framing_over_a_pipe_pair():
    """The TAP backend adds and strips the 12-byte vnet header (a socketpair stands in)."""
    from kemu.backends.tap import TapBackend
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    loop = IoLoop()
    tap = TapBackend(loop, "fake", fd=ours.detach())
    got = []
    tap.connect(lambda f: got.append(f) or True)
    theirs.send(bytes(12) + FRAME)
    theirs.send(bytes([0, 1]) + bytes(10) + FRAME)     # GSO: dropped
    theirs.send(bytes(12) + FRAME[::-1])
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == [FRAME, FRAME[::-1]] and tap.dropped == 1
    tap.send(FRAME)
    assert theirs.recv(4096) == bytes(12) + FRAME
    tap.close()
    loop.close()


def test_cli_network_options():
    from kemu.options import parse_qemu_options
    from kemu.machines.config import MachineConfig

    cfg = parse_qemu_options(["-netdev", "user,id=n0,hostfwd=tcp::8022-:22,hostfwd=udp::53-:53",
                              "-device", "virtio-net-device,netdev=n0,mac=52:54:00:00:00:09"],
                             MachineConfig())
    assert [(d.type, d.id, d.hostfwd) for d in cfg.netdevs] == [
        ("user", "n0", ["tcp::8022-:22", "udp::53-:53"])]
    assert cfg.devices[0].props == {"netdev": "n0", "mac": "52:54:00:00:00:09"}
    cfg = parse_qemu_options(["--net", "user,hostfwd=tcp::2222-:22"], MachineConfig())
    assert cfg.netdevs[0].hostfwd == ["tcp::2222-:22"]
    assert cfg.devices[0].driver == "virtio-net-pci"      # QEMU virt's default NIC
    cfg = parse_qemu_options(["-net", "nic,model=virtio,macaddr=52:54:00:00:00:01", "-net", "user"],
                             MachineConfig())
    assert len(cfg.netdevs) == 1 and cfg.devices[0].props["mac"] == "52:54:00:00:00:01"
    cfg = parse_qemu_options(["-nic", "tap,ifname=tap3,script=no,downscript=no"], MachineConfig())
    assert cfg.netdevs[0].props == {"ifname": "tap3"}
    assert parse_qemu_options(["-nic", "none", "-net", "none"], MachineConfig()).netdevs == []


@pytest.mark.parametrize("argv", [["-netdev", "user"], ["-netdev", "socket,id=a"],
                                  ["-netdev", "user,id=a,hostfwd=tcp:22"],
                                  ["-netdev", "tap,id=a,script=/etc/qemu-ifup"],
                                  ["-netdev", "user,id=a,smb=/tmp"], ["-nic", "user,model=e1000"]])
def test_cli_bad_network_options(argv):
    from kemu.options import parse_qemu_options
    from kemu.machines.config import MachineConfig
    with pytest.raises(ConfigError):
        parse_qemu_options(argv, MachineConfig())


def test_wiring_errors_are_config_errors():
    from kemu.machines.config import DeviceConfig, MachineConfig, NetdevConfig
    from kemu.machines.virtio_devices import attach_devices

    class Board:
        memory = None
        virtio_slots: list = []

        def virtio_irq(self, index):
            raise AssertionError("nothing should be attached")

        def add_virtio(self, device):
            raise AssertionError("nothing should be attached")

    for netdevs, devices in (([], [DeviceConfig("virtio-net-device", {"netdev": "x"})]),
                             ([NetdevConfig("user", "a")], []),
                             ([NetdevConfig("user", "a"), NetdevConfig("user", "a")], [])):
        with pytest.raises(ConfigError):
            attach_devices(Board(), MachineConfig(netdevs=netdevs, devices=devices))


@pytest.mark.parametrize("offered,accepted", [(True, True), (True, False), (False, False)])
def test_guest_csum_marks_received_frames_data_valid(offered, accepted):
    mask = ~0 if accepted else ~(1 << n.VIRTIO_NET_F_GUEST_CSUM)
    mem, backend, _dev, _irq, _t, drv, rx, _tx = make(mask=mask, rx_checksums_valid=offered)
    assert bool(drv.device_features() >> n.VIRTIO_NET_F_GUEST_CSUM & 1) == offered
    buf = drv.buffer(2048, writable=True)
    rx.add([buf])
    backend.receive(FRAME)
    flags = mem.read(buf.addr, 1)[0]
    assert flags == (n.VIRTIO_NET_HDR_F_DATA_VALID if accepted else 0)
