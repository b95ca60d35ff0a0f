"""Live migration with shared storage on the microvm board (this host's KVM): the
source and the destination use the SAME qcow2 image, as QEMU's ``migrate`` without
block migration.  The destination opens it inactive (no write locks, its metadata
not trusted), the source hands it over at the stop-and-copy (flushed, write locks
dropped), the destination reads its metadata again and takes the locks before its
guest runs.  tests/guests/virtio_blk.c waits ("kemu.wait") with its queue set up;
woken, it writes sector 6, reads it back and reads sectors 0-3 again."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kemu import Machine
from kemu.backends.locking import ImageLockError
from kemu.backends.qcow2 import Qcow2Image, check_qcow2, create_qcow2
from kemu.machines.config import DriveConfig
from kemu.snapshot import blk_backends_by_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_image_locking import lock_bytes
# the kernel fixture: tests/guests/virtio_blk.c built once for the module
from test_microvm_virtio import fnv1a, kernel  # noqa: F401
from test_snapshot_microvm import (TIMEOUT, _config, _enable, _migration_status,
                                   _woken_blk_guest, pytestmark)  # noqa: F401

MiB = 1 << 20
#: What the guest writes to sector 6 (tests/guests/virtio_blk.c, pattern_byte).
PATTERN = bytes(((i * 7 + 0x5A) & 0xFF) ^ ((i >> 8) & 0xFF) for i in range(512))


def _machine(kernel: Path, disk: Path, incoming: bool = False,
             locking: str = "auto") -> Machine:
    config = _config(kernel, drives=[DriveConfig(disk, format="qcow2", locking=locking)])
    config.append = "virtio-blk kemu.wait"
    if incoming:
        config.extra["incoming"] = "defer"        # as -incoming: the disks open inactive
    return Machine.from_config(config)


def _locked_for_write(path: Path) -> bool:
    """Whether someone holds QEMU's "write" permission byte (101) on ``path``."""
    return 101 in lock_bytes(path)


def _check_image(disk: Path, expected: dict[int, bytes]) -> None:
    with Qcow2Image.open(disk, read_only=True) as image:
        for offset, data in expected.items():
            assert image.read(offset, len(data)) == data, offset
    result = check_qcow2(disk)
    assert (result.corruptions, result.leaks, result.check_errors) == (0, 0, 0), result
    if shutil.which("qemu-img") is not None:
        out = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def _kill(*vms: Machine) -> None:
    for vm in vms:
        if not vm._started:
            vm._board.close()
        elif vm.state not in ("shutdown", "stopped"):
            vm.kill()


@pytest.mark.parametrize("locking", ["auto", "off"])
def test_destination_on_the_same_qcow2_image_sees_the_sources_writes(kernel, tmp_path,
                                                                      locking):
    """With locking, the destination was refused before; with file.locking=off it ran
    on the L1/L2 tables and refcounts it read at its start (the source's new clusters
    unseen, then overwritten): now it reads them all again at the switch."""
    disk = tmp_path / "disk.qcow2"
    create_qcow2(disk, MiB)
    source = _machine(kernel, disk, locking=locking)
    dest = None
    try:
        source.start()
        source.console.expect("waiting", timeout=TIMEOUT)
        # the destination opens the image while the source writes it (before: refused,
        # "Failed to get "write" lock") and reads its empty tables
        dest = _machine(kernel, disk, incoming=True, locking=locking)
        assert _locked_for_write(disk) == (locking == "auto")      # the source's
        # the source allocates clusters (and the L2 table) the destination has not seen
        (backend,) = blk_backends_by_name(source._board).values()
        head, far = os.urandom(4 * 512), os.urandom(70000)
        backend.write(0, head)
        backend.write(600 * 1024, far)
        _enable(source)
        _enable(dest)
        uri = f"unix:{tmp_path / 'mig.sock'}"
        dest.start_incoming(uri)
        source.migrate(uri)
        assert _migration_status(source) == "completed", source.migration.info()
        assert _migration_status(dest) == "completed", dest.migration.info()
        assert source.state == "paused"
        if locking == "auto":
            # the source cannot go on while the destination holds the image (QEMU's cont)
            with pytest.raises(ImageLockError) as e:
                source.resume()
            assert "\n" not in str(e.value)
        kv = _woken_blk_guest(dest, "g")
        assert kv["again_status"] == 0 and kv["again_sum"] == fnv1a(head)
    finally:
        _kill(source, *([dest] if dest is not None else []))
    _check_image(disk, {0: head, 600 * 1024: far, 6 * 512: PATTERN})


class _Sink:
    """A destination that reads the whole stream and never answers."""

    def __init__(self, path: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            self.conn, _ = self.server.accept()
            while self.conn.recv(1 << 20):
                pass
        except OSError:
            pass            # closed by the test: the destination went away

    def close(self) -> None:
        if self.conn is not None:
            # shutdown first: a close() alone leaves the reader thread's recv() holding
            # the socket open, and the source never sees the destination go away
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.conn.close()
        self.server.close()


def _wait_handed_over(disk: Path) -> None:
    """Until the source dropped its write lock (it waits for the sink's answer then)."""
    end = time.monotonic() + TIMEOUT
    while _locked_for_write(disk):
        assert time.monotonic() < end, "the source never handed its disk over"
        time.sleep(0.01)


def test_migration_cancelled_after_the_handover_gives_the_source_its_disk_back(
        kernel, tmp_path):
    disk = tmp_path / "disk.qcow2"
    create_qcow2(disk, MiB)
    source = _machine(kernel, disk)
    sink = _Sink(tmp_path / "sink.sock")
    try:
        source.start()
        source.console.expect("waiting", timeout=TIMEOUT)
        (backend,) = blk_backends_by_name(source._board).values()
        head = os.urandom(4 * 512)
        backend.write(0, head)
        _enable(source)
        source.migrate(f"unix:{tmp_path / 'sink.sock'}")
        _wait_handed_over(disk)
        assert source.state == "paused"
        source.migration.cancel()
        assert _migration_status(source) == "cancelled", source.migration.info()
        assert source.state == "running" and _locked_for_write(disk)
        kv = _woken_blk_guest(source, "s")                 # its write goes to the disk
        assert kv["again_sum"] == fnv1a(head)
    finally:
        sink.close()
        _kill(source)
    _check_image(disk, {0: head, 6 * 512: PATTERN})


def test_source_that_cannot_take_its_disk_back_stays_paused(kernel, tmp_path):
    """Another process took the image while the source waited for its destination:
    the migration fails in one line and the source stays paused, as QEMU's does."""
    from kemu.backends.block import open_image
    disk = tmp_path / "disk.qcow2"
    create_qcow2(disk, MiB)
    source = _machine(kernel, disk)
    sink = _Sink(tmp_path / "sink.sock")
    other = None
    try:
        source.start()
        source.console.expect("waiting", timeout=TIMEOUT)
        _enable(source)
        source.migrate(f"unix:{tmp_path / 'sink.sock'}")
        _wait_handed_over(disk)
        other = open_image(disk, "qcow2")                  # a writer takes the image
        sink.close()                                       # the destination goes away
        assert _migration_status(source) == "failed"
        error = source.migration.info()["error-desc"]
        assert "lock" in error and "paused" in error and "\n" not in error, error
        assert source.state == "paused"
        other.close()
        other = None
        source.resume()                                    # cont takes the disk back
        assert _locked_for_write(disk)
        _woken_blk_guest(source, "r")
    finally:
        if other is not None:
            other.close()
        sink.close()
        _kill(source)
    _check_image(disk, {6 * 512: PATTERN})


def test_two_kemu_processes_on_one_qcow2_image(kernel, tmp_path):
    """The CLI's -incoming: the destination process starts on the image the source
    process writes (before: it exited, "Failed to get "write" lock"), takes it over
    at the switch, and its guest's write lands in a consistent image."""
    from kemu.testing.qmp_client import QmpClient
    from kemu.testing.stdio_console import Console
    disk = tmp_path / "disk.qcow2"
    create_qcow2(disk, MiB)
    head = os.urandom(4 * 512)
    with Qcow2Image.open(disk) as image:
        image.write(0, head)
    args = ["-M", "microvm", "-accel", "kvm", "-m", "64", "-kernel", str(kernel),
            "-append", "virtio-blk kemu.wait", "-display", "none", "-serial", "stdio",
            "-no-reboot", "-drive", f"file={disk},format=qcow2,if=virtio"]
    mig = tmp_path / "mig.sock"
    src = Console(args + ["-qmp", f"unix:{tmp_path / 'src.qmp'},server=on,wait=off"])
    dst = None
    try:
        src.expect(rb"waiting", TIMEOUT)
        dst = Console(args + ["-qmp", f"unix:{tmp_path / 'dst.qmp'},server=on,wait=off",
                              "-incoming", f"unix:{mig}"])
        qd = QmpClient(tmp_path / "dst.qmp")
        assert qd.execute("query-status")["status"] == "inmigrate"
        end = time.monotonic() + TIMEOUT          # the destination listens
        while not mig.exists() and time.monotonic() < end:
            time.sleep(0.02)
        q = QmpClient(tmp_path / "src.qmp")
        q.execute("migrate", uri=f"unix:{mig}")
        assert q.wait_migration(("completed", "failed"), TIMEOUT)["status"] == "completed"
        assert q.execute("query-status")["status"] == "postmigrate"
        dst.send("d")
        dst.expect(rb"done", TIMEOUT)
        assert dst.wait(TIMEOUT) == 0
        out = dst.buffer.decode(errors="replace")
        kv = {k: int(v, 16) for k, _, v in (line.partition(" ") for line in out.splitlines())
              if v.startswith("0x")}
        assert (kv["write_status"], kv["verify_bad"]) == (0, 0)
        assert kv["again_sum"] == fnv1a(head)
    finally:
        for c in (src, dst):
            if c is not None:
                c.close()
    _check_image(disk, {0: head, 6 * 512: PATTERN})
