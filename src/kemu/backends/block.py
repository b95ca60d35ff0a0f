"""Host side of disks: raw image files, and opening images by format.

A backend is what virtio-blk reads and writes (the protocol
:class:`kemu.devices.virtio.blk.BlockBackend`): ``size`` in bytes,
``read_only``, ``read``/``write`` at byte offsets, ``flush`` (which must
reach stable storage: fsync), ``discard``, ``write_zeroes``; plus ``close``.
:func:`open_image` opens a raw file or a qcow2 image.  As QEMU does, a file
is interpreted as qcow2 only when its header says so or the user asks;
format probing never turns a raw disk whose guest wrote a qcow2 header into
a qcow2 image unless the format was left unspecified.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from kemu.errors import KemuError

if TYPE_CHECKING:
    from kemu.devices.virtio.blk import BlockBackend

QCOW2_MAGIC = b"QFI\xfb"


class ImageError(KemuError):
    """A disk image that cannot be opened or is malformed."""


def _open_fd(path: Path, read_only: bool) -> int:
    try:
        return os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
    except FileNotFoundError:
        raise ImageError(f"could not open {path}: No such file or directory") from None
    except IsADirectoryError:
        raise ImageError(f"could not open {path}: Is a directory") from None
    except PermissionError:
        how = "read-only" if read_only else "read-write"
        raise ImageError(f"could not open {path} {how}: Permission denied") from None
    except OSError as e:
        raise ImageError(f"could not open {path}: {e.strerror}") from None


class RawFile:
    """A raw image: guest offset = file offset."""

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._fd = _open_fd(self.path, read_only)
        self.size = os.fstat(self._fd).st_size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageError(f"{self.path}: access of {length} bytes at {offset} is beyond "
                             f"the end of the image ({self.size} bytes)")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        data = os.pread(self._fd, length, offset)
        return data + bytes(length - len(data))

    def write(self, offset: int, data: bytes) -> None:
        if self.read_only:
            raise ImageError(f"{self.path}: image is read-only")
        self._check(offset, len(data))
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def flush(self) -> None:
        if not self.read_only:
            os.fsync(self._fd)

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        if self.read_only:
            raise ImageError(f"{self.path}: image is read-only")
        self._check(offset, length)
        chunk = bytes(min(length, 1 << 20))
        while length:
            n = min(length, len(chunk))
            self.write(offset, chunk[:n])
            offset, length = offset + n, length - n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def detect_format(path: Path) -> str:
    fd = _open_fd(path, True)
    try:
        return "qcow2" if os.pread(fd, 4, 0) == QCOW2_MAGIC else "raw"
    finally:
        os.close(fd)


def open_image(path: str | Path, format: str | None = None,
               read_only: bool = False) -> "BlockBackend":
    path = Path(path)
    fmt = format or detect_format(path)
    if fmt == "raw":
        return RawFile(path, read_only)
    if fmt == "qcow2":
        try:
            from kemu.backends.qcow2 import Qcow2Image
        except ImportError:
            raise ImageError(f"{path}: qcow2 images are not supported by this build") from None
        return Qcow2Image.open(path, read_only=read_only)
    raise ImageError(f"{path}: unknown image format {fmt!r}")
