"""kemu.state: plain state both ways, the checked stream, and every virt device following it."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pytest

from kemu import state as st
from kemu.machines.config import DeviceConfig, DriveConfig, MachineConfig
from kemu.snapshot import config_from_plain, config_to_plain
from kemu.state import StateError
from kemu.testing.state_check import check_round_trips


@dataclass
class Inner:
    version: int
    data: bytes


@dataclass
class Outer:
    version: int
    name: str
    items: list[Inner]
    maybe: int | None = None


def test_plain_round_trip_through_the_stream():
    value = Outer(1, "x", [Inner(1, b"\x00\xff"), Inner(1, b"")], None)
    stream = st.encode_stream({"machine": {"board": "virt"}}, value)
    f = io.BytesIO(stream)
    header = st.read_header(f)
    payload = st.read_payload(f, header)
    assert st.from_plain(Outer, payload) == value


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:10], "truncated"),
    (lambda b: b"NOTKEMU!" + b[8:], "bad magic"),
    (lambda b: b[:-3], "truncated"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum"),
    (lambda b: b[:8] + (99).to_bytes(4, "little") + b[12:], "newer"),
    (lambda b: b"", "empty"),
])
def test_damaged_streams_are_refused_in_one_line(damage, message):
    good = st.encode_stream({"machine": {}}, {"a": 1})
    f = io.BytesIO(damage(good))
    with pytest.raises(StateError) as e:
        st.read_payload(f, st.read_header(f))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_header_from_another_machine_is_refused():
    with pytest.raises(StateError, match="memory is 268435456"):
        st.check_header({"machine": {"memory": 256 << 20}}, {"memory": 512 << 20})
    st.check_header({"machine": {"memory": 1, "smp": 2}}, {"memory": 1, "smp": 2})


def test_bad_shapes_are_state_errors():
    with pytest.raises(StateError):
        st.from_plain(Outer, {"version": 1, "name": 3, "items": []})
    with pytest.raises(StateError):
        st.from_plain(Outer, {"version": 1, "name": "x"})
    with pytest.raises(StateError):
        st.from_plain(Outer, [1, 2])


def test_machine_config_round_trip():
    from kemu.machines.config import ChardevConfig
    chardev = ChardevConfig("socket", "c0", {"path": "/x"})
    config = MachineConfig(memory=256 << 20, kernel=Path("/k"), append="console=ttyAMA0",
                           chardevs={"c0": chardev},
                           drives=[DriveConfig(Path("/d.raw"), "raw", id="d0")],
                           devices=[DeviceConfig("virtio-blk-device", {"drive": "d0"})],
                           globals={("virtio-mmio", "force-legacy"): "off"})
    back = config_from_plain(st.loads(st.dumps(config_to_plain(config))))
    assert back == config


def _virt_board(tmp_path):
    from kemu.backends.serial import SerialBackend
    from kemu.machines.arm64_virt import VirtMachine
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    config = MachineConfig(dumpdtb=tmp_path / "x.dtb",
                           drives=[DriveConfig(disk, "raw")],
                           devices=[DeviceConfig("virtio-rng-device"),
                                    DeviceConfig("vhost-vsock-device", {"guest-cid": "5"}),
                                    DeviceConfig("virtio-serial-device")])
    return VirtMachine(config, SerialBackend(lambda data: None))


def test_every_virt_device_saves_and_restores_plain_state(tmp_path):
    board = _virt_board(tmp_path)
    try:
        devices = [board.gic, board.uart, board.rtc, board.fw_cfg] + \
            [t for pair in board.timers for t in pair]
        for slot in board.virtio_slots:
            devices += [slot.device, slot.device.device]
        assert len(devices) >= 8
        check_round_trips(devices)
    finally:
        board.close()


def test_a_queue_gives_back_the_buffers_its_device_holds():
    from kemu.devices.virtio.queue import Virtqueue
    from kemu.memory import GuestMemory, RamRegion
    mem = GuestMemory([RamRegion(0, 1 << 16)])
    q = Virtqueue(mem, 8)
    q.size, q.desc_addr, q.driver_addr, q.device_addr = 8, 0x1000, 0x2000, 0x3000
    q.enable()
    for i in range(3):                       # three one-descriptor chains made available
        mem.write_int(0x1000 + 16 * i, 8, 0x8000 + 0x100 * i)
        mem.write_int(0x1000 + 16 * i + 8, 4, 0x100)
        mem.write_int(0x1000 + 16 * i + 12, 2, 2)            # VIRTQ_DESC_F_WRITE
        mem.write_int(0x2000 + 4 + 2 * i, 2, i)
    mem.write_int(0x2000 + 2, 2, 3)
    chains = [q.pop() for _ in range(3)]
    q.push(chains[0], 0)                     # one used, two held (receive buffers)
    saved = q.save()
    assert (saved.next_avail, saved.next_used) == (1, 1)
    fresh = Virtqueue(mem, 8)
    fresh.restore(saved)
    assert [fresh.pop().head for _ in range(2)] == [1, 2]
