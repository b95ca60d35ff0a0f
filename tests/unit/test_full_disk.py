"""A full host disk under raw and qcow2 images (issue 16 item 3), at the
block layer: writes and flushes fail with ENOSPC as one-line errors that
carry errno, nothing the guest was told succeeded is lost, and once space
is freed the failed requests go through and the image is clean
(kemu's check and qemu-img check)."""

from __future__ import annotations

import errno
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from fulldisk import fill, small_tmpfs

from kemu.backends.block import ImageIOError, open_image
from kemu.backends.qcow2 import check_qcow2, create_qcow2

MiB = 1 << 20
SIZE = 24 * MiB


@pytest.fixture
def tmpfs(tmp_path):
    with small_tmpfs(tmp_path, 6 * MiB) as where:
        yield where


def make_image(kind: str, where: Path, base_dir: Path, rnd: random.Random) -> tuple[Path, str, bytearray]:
    """An image in ``where`` and the model of what the guest sees in it."""
    if kind == "raw":
        path = where / "disk.raw"
        with open(path, "wb") as f:
            f.truncate(SIZE)          # sparse: every write may need space
        return path, "raw", bytearray(SIZE)
    path = where / "disk.qcow2"
    model = bytearray(SIZE)
    if kind == "qcow2-backing":
        base = base_dir / "base.raw"
        model[:] = rnd.randbytes(SIZE)
        base.write_bytes(model)
        create_qcow2(path, SIZE, backing_file=str(base), backing_format="raw")
    else:
        create_qcow2(path, SIZE)
    return path, "qcow2", model


def guest_writes(rnd: random.Random, n: int):
    """Writes as a guest file system makes them: runs of whole clusters, partial
    clusters (copy-on-write) and rewrites of earlier places."""
    done: list[int] = []
    for i in range(n):
        if done and i % 5 == 4:
            off = rnd.choice(done)
        else:
            off = rnd.randrange(0, SIZE // 4096 - 64) * 4096
        length = rnd.choice((4096, 65536, 3 * 4096, 192 * 1024))
        done.append(off)
        yield off, rnd.randbytes(length)


@pytest.mark.parametrize("kind", ["raw", "qcow2", "qcow2-backing"])
def test_filling_the_host_disk_loses_nothing_acknowledged(tmpfs, tmp_path, kind):
    rnd = random.Random(16)
    path, fmt, model = make_image(kind, tmpfs, tmp_path, rnd)
    filler = tmpfs / "filler"
    fill(filler, 2 * MiB)          # freed later: what the administrator deletes
    disk = open_image(path, fmt)
    failed: list[tuple[int, bytes]] = []
    faults = 0
    for i, (off, data) in enumerate(guest_writes(rnd, 400)):
        try:
            disk.write(off, data)
        except ImageIOError as e:
            assert e.errno == errno.ENOSPC and "\n" not in str(e)
            faults += 1
            failed.append((off, data))   # the guest got an error: content undefined
            if len(failed) == 8:
                break
            continue
        model[off:off + len(data)] = data
        if i % 8 == 7:
            try:
                disk.flush()
            except ImageIOError as e:
                assert e.errno == errno.ENOSPC
                faults += 1
    assert faults, "the disk never filled up"
    filler.unlink()                      # space again: the failed requests are retried
    for off, data in failed:
        disk.write(off, data)
        model[off:off + len(data)] = data
    disk.flush()
    disk.close()
    if fmt == "qcow2":
        result = check_qcow2(path)
        assert result.corruptions == 0, result.messages[:5]
        if shutil.which("qemu-img"):
            r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
            assert r.returncode in (0, 3), r.stdout + r.stderr     # 3: leaks only
    disk = open_image(path, fmt)
    lost = sum(1 for o in range(0, SIZE, 65536)
               if disk.read(o, 65536) != bytes(model[o:o + 65536]))
    disk.close()
    assert lost == 0, f"{lost} of {SIZE // 65536} 64 KiB blocks differ after {faults} faults"


# -- through virtio-blk: werror= policies, as a guest driver sees them -------------------------

def blk_device(disk, **kw):
    from virtio_driver import VirtioMmioDriver, make_memory

    from kemu.devices.base import IrqLine
    from kemu.devices.virtio.blk import VirtioBlk
    from kemu.devices.virtio.mmio import VirtioMmioTransport
    errors: list[tuple[str, str, int]] = []
    mem = make_memory(32 << 20)
    dev = VirtioBlk(disk, on_io_error=lambda *e: errors.append(e), **kw)
    drv = VirtioMmioDriver(VirtioMmioTransport(dev, mem, IrqLine()), mem)
    (q,) = drv.init()
    return dev, drv, q, errors


def post_write(drv, q, sector: int, data: bytes):
    """Queue a write; returns (head, status buffer)."""
    import struct

    from kemu.devices.virtio import blk as b
    status = drv.buffer(1, writable=True)
    drv.memory.write(status.addr, b"\xEE")
    head = q.add([drv.buffer(struct.pack("<IIQ", b.VIRTIO_BLK_T_OUT, 0, sector)),
                  drv.buffer(data), status])
    return head, status


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("werror", ["enospc", "stop", "report", "ignore"])
def test_werror_policies_on_a_full_disk(tmpfs, tmp_path, fmt, werror):
    from kemu.devices.virtio import blk as b
    rnd = random.Random(3)
    path, fmt, model = make_image(fmt, tmpfs, tmp_path, rnd)
    filler = tmpfs / "filler"
    fill(filler, 2 * MiB)
    disk = open_image(path, fmt)
    dev, drv, q, errors = blk_device(disk, werror=werror)
    acked: dict[int, bytes] = {}
    held = None
    for i in range(4 * SIZE // (256 << 10)):
        sector = (i * (256 << 10)) % SIZE // 512
        data = rnd.randbytes(256 << 10)
        head, status = post_write(drv, q, sector, data)
        used = q.get_used()
        if not errors:
            assert used == [(head, 1)] and drv.memory.read(status.addr, 1) == b"\0"
            acked[sector] = data
            continue
        assert errors == [("write", "report" if werror == "report" else
                           "ignore" if werror == "ignore" else "stop", errno.ENOSPC)]
        if werror in ("enospc", "stop"):
            assert used == [] and dev.held_requests == 1      # held: the guest waits
            held = (head, status, sector, data)
        elif werror == "report":
            assert used == [(head, 1)] and drv.memory.read(status.addr, 1)[0] == b.VIRTIO_BLK_S_IOERR
        else:
            assert used == [(head, 1)] and drv.memory.read(status.addr, 1)[0] == b.VIRTIO_BLK_S_OK
        break
    else:
        pytest.fail("the disk never filled up")
    filler.unlink()
    if held is not None:               # cont: the held request runs again and completes
        dev.retry_held()
        head, status, sector, data = held
        assert q.get_used() == [(head, 1)] and drv.memory.read(status.addr, 1) == b"\0"
        acked[sector] = data
    disk.flush()
    disk.close()
    disk = open_image(path, fmt)
    lost = [s for s, data in acked.items() if disk.read(s * 512, len(data)) != data]
    disk.close()
    assert lost == []
    if fmt == "qcow2":
        assert check_qcow2(path).corruptions == 0
