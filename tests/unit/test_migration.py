"""kemu.migration without a guest: the wire protocol, write tracking, settings, HMP spellings."""

from __future__ import annotations

import os
import threading
import time

import pytest

from kemu import migration as mig
from kemu.memory import GuestMemory, RamRegion

MiB = 1 << 20


class FakeBoard:
    def __init__(self, size: int = 4 * MiB) -> None:
        self.memory = GuestMemory([RamRegion(0x40000000, size)])
        self.lock = threading.RLock()
        self.started_with = None

    def state_fingerprint(self) -> dict:
        return {"board": "fake", "memory": self.memory.size}

    def save_state(self) -> dict:
        return {"version": 1, "regs": [1, 2, 3], "blob": b"\x00\xff"}


class FakeVm:
    """What Outgoing/Incoming use of kemu.api.Machine."""

    def __init__(self, board: FakeBoard) -> None:
        from kemu.machines.config import MachineConfig
        self._board = board
        self.config = MachineConfig()
        self.state = "running"
        self._postmigrate = False
        self.events = []
        self.failed = None
        self.done = threading.Event()
        self.migration = mig.Migration(self)
        self.migration.emit = lambda name, data: self.events.append((name, data))

    def pause(self):
        self.state = "paused"

    def stop(self):
        self.state = "shutdown"

    def resume(self):
        self.state = "running"

    def _finish_incoming(self, state, paused):
        self._board.started_with = state
        self.done.set()

    def _incoming_failed(self, message):
        self.failed = message
        self.done.set()


def dirtier(memory: GuestMemory, stop: threading.Event) -> None:
    """Writes random bytes at random pages until told to stop (a guest dirtying memory)."""
    region = memory.regions[0]
    while not stop.is_set():
        off = int.from_bytes(os.urandom(4), "little") % (region.size - 64)
        region.buffer[off:off + 64] = os.urandom(64)
        time.sleep(0.0005)


def test_live_migration_carries_every_dirtied_byte(tmp_path):
    src, dst = FakeVm(FakeBoard()), FakeVm(FakeBoard())
    src._board.memory.regions[0].buffer[:MiB] = os.urandom(MiB)
    for vm in (src, dst):
        vm.migration.set_capabilities([{"capability": "events", "state": True}])
    uri = f"unix:{tmp_path / 'm.sock'}"
    dst.migration.incoming_from(uri, paused=False)
    stop = threading.Event()
    writer = threading.Thread(target=dirtier, args=(src._board.memory, stop))
    writer.start()
    # a slow link and a tight limit: several passes while the "guest" writes
    src.migration.set_parameters({"max-bandwidth": 32 * MiB, "downtime-limit": 5})
    real_pause = src.pause

    def pause():                      # the guest stops writing when the VM stops
        stop.set()
        writer.join()
        real_pause()
    src.pause = pause
    # However little the writer thread runs on a busy host, the guest has dirtied a
    # MiB by the end of the first pass (MIGRATION_PASS comes before the dirty count):
    # more than the downtime limit allows at this bandwidth, so a second pass follows.
    emit = src.migration.emit

    def emit_and_dirty(name, data):
        emit(name, data)
        if name == "MIGRATION_PASS" and data["pass"] == 1:
            buf = src._board.memory.regions[0].buffer
            for page in range(256):
                off = (2 * MiB + page * 8192) % (len(buf) - 64)
                buf[off:off + 64] = os.urandom(64)
    src.migration.emit = emit_and_dirty
    src.migration.migrate(uri)
    src.migration.outgoing.join(60)
    assert dst.done.wait(30)
    info = src.migration.info()
    assert info["status"] == "completed", info
    assert dst.failed is None
    assert src._board.memory.regions[0].buffer[:] == dst._board.memory.regions[0].buffer[:]
    assert dst._board.started_with == src._board.save_state()
    assert src._postmigrate and src.state == "paused"
    assert info["ram"]["dirty-sync-count"] >= 2
    names = [e[0] for e in src.events]
    assert names.count("MIGRATION_PASS") == info["ram"]["dirty-sync-count"]
    assert [d["status"] for n, d in src.events if n == "MIGRATION"] == \
        ["setup", "active", "device", "completed"]


def test_destination_refuses_another_machine_and_the_source_runs_on(tmp_path):
    src, dst = FakeVm(FakeBoard(4 * MiB)), FakeVm(FakeBoard(8 * MiB))
    src._board.memory.regions[0].buffer[:] = os.urandom(4 * MiB)
    uri = f"unix:{tmp_path / 'm.sock'}"
    dst.migration.incoming_from(uri, paused=False)
    src.migration.migrate(uri)
    src.migration.outgoing.join(60)
    assert dst.done.wait(30)
    assert "made for another machine" in dst.failed
    assert src.migration.info()["status"] == "failed"
    assert src.state == "running" and not src._postmigrate


def test_corrupted_stream_is_refused(tmp_path):
    dst = FakeVm(FakeBoard())
    path = tmp_path / "stream"
    path.write_bytes(b"KEMUSNAP" + bytes(100))
    dst.migration.incoming_from(f"exec:cat {path}", paused=False)
    assert dst.done.wait(30)
    assert dst.failed.startswith("load of migration failed:") and "\n" not in dst.failed


def test_uris_parameters_and_capabilities():
    assert mig.parse_uri("tcp:127.0.0.1:4444") == ("tcp", "127.0.0.1:4444")
    for bad in ("ftp:x", "unix:", "nothing"):
        with pytest.raises(mig.MigrationError):
            mig.parse_uri(bad)
    m = mig.Migration(FakeVm(FakeBoard()))
    m.set_parameters({"downtime-limit": 100, "max-bandwidth": 1 << 20})
    assert m.query_parameters() == {"downtime-limit": 100, "max-bandwidth": 1 << 20}
    for bad in ({"downtime-limit": -1}, {"xbzrle-cache-size": 1}, {"max-bandwidth": True}):
        with pytest.raises(mig.MigrationError):
            m.set_parameters(bad)
    with pytest.raises(mig.MigrationError, match="not supported"):
        m.set_capabilities([{"capability": "postcopy-ram", "state": True}])
    m.set_capabilities([{"capability": "x-checksum", "state": True}])
    assert {"capability": "x-checksum", "state": True} in m.query_capabilities()
    with pytest.raises(mig.MigrationError, match="has not been found"):
        mig.connect("fd:nope", {})


def test_hmp_spellings():
    from kemu.monitor.hmp import Hmp
    from kemu.qmp.commands import Commands
    vm = FakeVm(FakeBoard())
    hmp = Hmp(Commands(vm))
    assert hmp.execute("migrate_set_parameter downtime-limit 250") == ""
    assert "downtime-limit: 250 ms" in hmp.execute("info migrate_parameters")
    assert hmp.execute("migrate_set_capability events on") == ""
    assert "events: on" in hmp.execute("info migrate_capabilities")
    assert hmp.execute("info migrate") == ""          # nothing yet
    assert hmp.execute("migrate_set_capability xbzrle on").startswith("Error:")


# -- several RAM regions: pages go by RAM offset (the regions end to end) ----------------------------
SPLIT = [(0x0, 3 * MiB), (0x100000000, 2 * MiB + 4096)]      # a hole between, an odd end


class SplitBoard(FakeBoard):
    """A board whose RAM is split around a hole, as microvm's above 3 GiB; with
    ``log``, it has a dirty log (guest-physical page numbers, as KVM's)."""

    def __init__(self, layout=SPLIT, log: bool = False) -> None:
        super().__init__()
        self.memory = GuestMemory([RamRegion(b, s) for b, s in layout])
        if log:
            self.start_dirty_log = lambda: self.memory.track_writes(True)
            self.dirty_pages = self.memory.take_written
            self.stop_dirty_log = lambda: self.memory.track_writes(False)


def _everything(memory: GuestMemory) -> bytes:
    return b"".join(bytes(r.buffer) for r in memory.regions)


@pytest.mark.parametrize("log", [False, True], ids=["shadow", "dirty-log"])
def test_live_migration_of_ram_split_around_a_hole(tmp_path, log):
    """Both write-tracking ways carry every byte of both regions, written before and
    between passes (by guest-physical address, the dirty log's page numbers), into
    the destination's regions at the same addresses; x-checksum agrees."""
    src, dst = FakeVm(SplitBoard(log=log)), FakeVm(SplitBoard(log=log))
    mem = src._board.memory
    mem.write(0x1000, os.urandom(8192))
    mem.write(0x100000000 + 2 * MiB, os.urandom(4096))            # the last page
    mem.write(3 * MiB - 100, b"l" * 100)                           # the end of the low one
    for vm in (src, dst):
        vm.migration.set_capabilities([{"capability": "events", "state": True},
                                       {"capability": "x-checksum", "state": True}])
    emit = src.migration.emit

    def emit_and_dirty(name, data):
        emit(name, data)
        if name == "MIGRATION_PASS" and data["pass"] == 1:
            for addr in (0x2000, 0x100000000, 0x100000000 + MiB + 0x123):
                mem.write(addr, os.urandom(64))
    src.migration.emit = emit_and_dirty
    src.migration.set_parameters({"downtime-limit": 0})
    uri = f"unix:{tmp_path / 'm.sock'}"
    dst.migration.incoming_from(uri, paused=False)
    src.migration.migrate(uri)
    src.migration.outgoing.join(60)
    assert dst.done.wait(30)
    info = src.migration.info()
    assert info["status"] == "completed" and dst.failed is None, (info, dst.failed)
    assert info["ram"]["dirty-sync-count"] >= 2
    assert _everything(dst._board.memory) == _everything(mem)
    assert info["x-ram-sha256"] == dst.migration.info()["x-ram-sha256"]


def test_destination_with_another_ram_layout_refuses_in_one_line(tmp_path):
    """The same RAM size split elsewhere: no page lands at a wrong address."""
    other = [(0x0, 2 * MiB), (0x100000000, 3 * MiB + 4096)]
    src, dst = FakeVm(SplitBoard()), FakeVm(SplitBoard(other))
    uri = f"unix:{tmp_path / 'm.sock'}"
    dst.migration.incoming_from(uri, paused=False)
    src.migration.migrate(uri)
    src.migration.outgoing.join(60)
    assert dst.done.wait(30)
    assert "made for RAM 3 MiB at 0x0 + 2052 KiB at 0x100000000, this machine has " \
        "2 MiB at 0x0 + 3076 KiB at 0x100000000" in dst.failed, dst.failed
    assert "\n" not in dst.failed
    assert src.migration.info()["status"] == "failed" and src.state == "running"
