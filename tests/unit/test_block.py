"""Opening images by format: probing, the raw sector-0 restriction, backing
chains through :func:`open_image`, and the backend protocol."""

from __future__ import annotations

import errno
import os

import pytest

from kemu.backends.block import ImageError, RawFile, detect_format, open_image
from kemu.backends.qcow2 import Qcow2Image, create_qcow2
from kemu.devices.virtio.blk import BlockBackend

BACKEND_METHODS = ("read", "write", "flush", "discard", "write_zeroes", "close")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_backends_implement_the_protocol(tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    if fmt == "raw":
        path.write_bytes(bytes(65536))
    else:
        create_qcow2(path, 65536)
    disk: BlockBackend = open_image(path, fmt)
    assert disk.size == 65536 and disk.read_only is False and disk.format == fmt
    for name in BACKEND_METHODS:
        assert callable(getattr(disk, name))
    disk.write(100, b"hello")
    disk.flush()
    assert disk.read(98, 9) == b"\0\0hello\0\0"
    disk.write_zeroes(101, 2)
    assert disk.read(100, 5) == b"h\0\0lo"
    disk.discard(0, 65536)
    disk.close()


def test_probing_opens_qcow2_by_magic_and_raw_otherwise(tmp_path):
    q = tmp_path / "disk.img"
    create_qcow2(q, 1 << 20)
    warnings: list[str] = []
    disk = open_image(q, on_warning=warnings.append)
    assert isinstance(disk, Qcow2Image) and not warnings
    disk.close()
    r = tmp_path / "raw.img"
    r.write_bytes(bytes(4096))
    disk = open_image(r, on_warning=warnings.append)
    assert isinstance(disk, RawFile) and disk.probed
    assert len(warnings) == 1 and "probing guessed raw" in warnings[0]
    disk.close()
    disk = open_image(r, read_only=True, on_warning=warnings.append)
    assert len(warnings) == 1          # read-only: nothing to restrict, no warning
    disk.close()


def test_probed_raw_refuses_to_become_qcow2(tmp_path):
    r = tmp_path / "raw.img"
    r.write_bytes(bytes(4096))
    disk = open_image(r)
    with pytest.raises(ImageError, match="qcow2 header"):
        disk.write(0, b"QFI\xfb" + bytes(508))
    disk.write(0, b"QFI")              # not the whole magic: fine
    with pytest.raises(ImageError, match="qcow2 header"):
        disk.write(3, b"\xfb")
    disk.write(512, b"QFI\xfb")        # elsewhere: fine
    disk.close()
    assert detect_format(r) == "raw"
    explicit = open_image(r, "raw")    # format given: no restriction
    explicit.write(0, b"QFI\xfb")
    explicit.close()
    assert detect_format(r) == "qcow2"


def test_raw_is_never_read_as_qcow2_when_format_given(tmp_path):
    r = tmp_path / "guest-wrote-a-header.img"
    create_qcow2(r, 1 << 20, backing_file="/etc/passwd", backing_format="raw")
    disk = open_image(r, "raw", read_only=True)
    assert isinstance(disk, RawFile) and disk.read(0, 4) == b"QFI\xfb"
    disk.close()


def test_open_errors(tmp_path):
    with pytest.raises(ImageError, match="No such file"):
        open_image(tmp_path / "missing.qcow2", "qcow2")
    with pytest.raises(ImageError, match="Is a directory"):
        open_image(tmp_path)
    with pytest.raises(ImageError, match="unknown image format 'vmdk'"):
        open_image(__file__, "vmdk", read_only=True)
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + bytes(60))
    with pytest.raises(ImageError, match="bad.qcow2"):
        open_image(bad)
    with pytest.raises(ImageError, match="not a qcow2 image"):
        open_image(__file__, "qcow2", read_only=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses file permissions")
def test_read_only_host_file_opened_read_write(tmp_path):
    path = tmp_path / "ro.qcow2"
    create_qcow2(path, 1 << 20)
    os.chmod(path, 0o444)
    with pytest.raises(ImageError, match="could not open .*ro.qcow2 read-write: Permission denied"):
        open_image(path)
    open_image(path, read_only=True).close()


def test_backing_chain_depth_limit(tmp_path):
    base = tmp_path / "img0.qcow2"
    create_qcow2(base, 65536)
    for i in range(1, 40):
        create_qcow2(tmp_path / f"img{i}.qcow2", 65536, backing_file=f"img{i - 1}.qcow2",
                     backing_format="qcow2")
    open_image(tmp_path / "img20.qcow2", read_only=True).close()
    with pytest.raises(ImageError, match="chain is longer"):
        open_image(tmp_path / "img39.qcow2", read_only=True)


def test_backing_files_are_opened_read_only(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"B" * 65536)
    top = tmp_path / "top.qcow2"
    create_qcow2(top, 65536, backing_file=str(base), backing_format="raw")
    with open_image(top) as disk:
        assert disk.backing.read_only and isinstance(disk.backing, RawFile)
        disk.write(10, b"top")
        assert disk.read(8, 7) == b"BBtopBB"
    assert base.read_bytes() == b"B" * 65536


def test_flush_and_close_closes_every_disk_and_raises_the_first_failure(tmp_path):
    """A machine that ends with its host disk full still closes (and unlocks) all disks."""
    from kemu.backends.block import ImageIOError, flush_and_close, open_image

    paths = [tmp_path / f"d{i}.raw" for i in range(3)]
    for p in paths:
        p.write_bytes(bytes(4096))
    disks = [open_image(p, "raw") for p in paths]
    calls = []

    def failing_flush():
        calls.append("flush")
        raise ImageIOError("d0.raw: No space left on device", errno.ENOSPC)
    disks[0].flush = failing_flush
    with pytest.raises(ImageIOError):
        flush_and_close(disks)
    assert calls == ["flush"]
    # Every image is closed: each can be opened for writing again (no lock held).
    for p in paths:
        open_image(p, "raw").close()
