"""Shared storage in a migration (QEMU's bdrv_inactivate / bdrv_activate): an image
opened inactive takes no write locks and writes nothing; activate() takes the locks
and reads every piece of cached metadata again, so it sees what another opener wrote
meanwhile (a qcow2 image's new L2 tables and refcounts, a raw file's new size)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kemu.backends.block import ImageError, open_image
from kemu.backends.locking import ImageLockError
from kemu.backends.qcow2 import Qcow2Image, check_qcow2, create_qcow2

from test_image_locking import lock_bytes

MiB = 1 << 20


def _qemu_img_check(path: Path) -> None:
    if shutil.which("qemu-img") is None:
        return          # kemu's own check below still runs
    out = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_normal_second_open_is_refused_while_the_source_writes(tmp_path):
    """What a destination did before: it opened the image as its own and was refused."""
    path = tmp_path / "disk.qcow2"
    create_qcow2(path, 16 * MiB)
    with open_image(path, "qcow2"):
        with pytest.raises(ImageLockError, match="write"):
            open_image(path, "qcow2")


def test_qcow2_activate_reads_again_what_the_other_opener_wrote(tmp_path):
    path = tmp_path / "disk.qcow2"
    create_qcow2(path, 16 * MiB)
    source = open_image(path, "qcow2")
    dest = open_image(path, "qcow2", inactive=True)       # no conflict with the writer
    try:
        assert dest.inactive and isinstance(dest, Qcow2Image)
        with pytest.raises(ImageError, match="inactive"):
            dest.write(0, b"x" * 512)
        # the destination caches the empty tables; the source then allocates new
        # clusters and L2 tables in three places
        assert dest.read(0, 512) == bytes(512)
        data = {off: os.urandom(70000) for off in (0, 5 * MiB + 123, 15 * MiB)}
        for off, blob in data.items():
            source.write(off, blob)
        source.inactivate()
        assert dest.read(0, 512) == bytes(512)                 # stale until activated
        held_before = lock_bytes(path)
        dest.activate()
        assert not dest.inactive
        assert {101, 201} <= lock_bytes(path) and not {101, 201} <= held_before
        for off, blob in data.items():
            assert dest.read(off, len(blob)) == blob
        # the destination goes on writing: allocations go after the source's clusters
        more = os.urandom(3 * 65536)
        dest.write(9 * MiB, more)
        dest.write(100, b"overwritten")
        dest.flush()
        # the source cannot take it back now: one line, and it stays inactive
        with pytest.raises(ImageLockError, match="Is another process using the image"):
            source.activate()
        assert source.inactive
        with pytest.raises(ImageError, match="inactive"):
            source.write(0, b"y")
    finally:
        dest.close()
        source.close()
    with Qcow2Image.open(path, read_only=True) as image:
        assert image.read(9 * MiB, len(more)) == more
        assert image.read(100, 11) == b"overwritten"
        assert image.read(15 * MiB, 70000) == data[15 * MiB]
    result = check_qcow2(path)
    assert result.corruptions == 0 and result.leaks == 0, result
    _qemu_img_check(path)


def test_qcow2_source_takes_its_disk_back_after_a_cancelled_handover(tmp_path):
    path = tmp_path / "disk.qcow2"
    create_qcow2(path, 4 * MiB)
    source = open_image(path, "qcow2")
    dest = open_image(path, "qcow2", inactive=True)
    try:
        source.write(0, b"a" * 4096)
        source.inactivate()
        assert 101 not in lock_bytes(path)                     # nobody writes now
        source.activate()                                      # the migration failed
        source.write(65536, b"b" * 4096)
        source.flush()
        # the destination cannot take it while the source writes
        with pytest.raises(ImageLockError):
            dest.activate()
        assert dest.inactive
    finally:
        dest.close()
        source.close()
    with Qcow2Image.open(path, read_only=True) as image:
        assert image.read(0, 4096) == b"a" * 4096 and image.read(65536, 4096) == b"b" * 4096
    _qemu_img_check(path)


def test_raw_activate_takes_the_locks_and_the_new_size(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(MiB))
    source = open_image(path, "raw")
    dest = open_image(path, "raw", inactive=True)
    try:
        with pytest.raises(ImageError, match="inactive"):
            dest.write(0, b"x")
        source.resize(2 * MiB)
        source.write(MiB + 7, b"tail")
        source.inactivate()
        dest.activate()
        assert dest.size == 2 * MiB and dest.read(MiB + 7, 4) == b"tail"
        dest.write(0, b"dest")
        with pytest.raises(ImageLockError):
            source.activate()
    finally:
        dest.close()
        source.close()
    assert path.read_bytes()[:4] == b"dest"


def test_a_request_that_meets_a_handed_over_disk_is_held_then_run(tmp_path):
    """A doorbell rung before the migration paused the guest, seen only after the
    disk was handed over: the request is held (no error for the guest) and runs
    once the source takes its disk back (cont)."""
    from test_full_disk import blk_device, post_write
    path = tmp_path / "disk.qcow2"
    create_qcow2(path, 16 * MiB)
    disk = open_image(path, "qcow2")
    try:
        dev, drv, q, errors = blk_device(disk)
        disk.inactivate()
        data = os.urandom(4096)
        head, status = post_write(drv, q, 8, data)
        assert q.get_used() == [] and dev.held_requests == 1 and errors == []
        disk.activate()
        dev.retry_held()
        assert q.get_used() == [(head, 1)] and drv.memory.read(status.addr, 1) == b"\0"
        assert disk.read(8 * 512, 4096) == data
    finally:
        disk.close()
