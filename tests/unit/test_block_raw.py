import os

import pytest

from kemu.backends.block import ImageError, RawFile, detect_format, open_image


def test_raw_roundtrip_flush_and_zeroes(tmp_path):
    path = tmp_path / "d.raw"
    path.write_bytes(b"\xff" * 8192)
    disk = open_image(path)
    assert isinstance(disk, RawFile) and disk.size == 8192 and not disk.read_only
    disk.write(512, b"abc")
    disk.flush()
    disk.write_zeroes(1024, 100)
    assert disk.read(512, 3) == b"abc"
    assert disk.read(1024, 100) == bytes(100)
    disk.close()
    data = path.read_bytes()
    assert data[512:515] == b"abc" and data[1024:1124] == bytes(100) and data[1124] == 0xFF


@pytest.mark.parametrize("offset,length", [(8190, 4), (-1, 1), (9000, 1)])
def test_out_of_range_refused(tmp_path, offset, length):
    path = tmp_path / "d.raw"
    path.write_bytes(bytes(8192))
    disk = RawFile(path)
    with pytest.raises(ImageError):
        disk.read(offset, length)
    with pytest.raises(ImageError):
        disk.write(offset, b"x" * length)


def test_read_only(tmp_path):
    path = tmp_path / "d.raw"
    path.write_bytes(bytes(4096))
    disk = RawFile(path, read_only=True)
    with pytest.raises(ImageError, match="read-only"):
        disk.write(0, b"x")


def test_open_errors_are_one_line(tmp_path):
    with pytest.raises(ImageError, match="No such file"):
        open_image(tmp_path / "missing")
    path = tmp_path / "ro.raw"
    path.write_bytes(bytes(512))
    os.chmod(path, 0o444)
    if os.geteuid() != 0:  # root can open anything
        with pytest.raises(ImageError, match="read-write: Permission denied"):
            open_image(path)


def test_format_detection(tmp_path):
    raw = tmp_path / "a.img"
    raw.write_bytes(bytes(512))
    assert detect_format(raw) == "raw"
    q = tmp_path / "b.img"
    q.write_bytes(b"QFI\xfb" + bytes(508))
    assert detect_format(q) == "qcow2"
