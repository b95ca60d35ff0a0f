"""Reading an arm64 Linux kernel Image (and boot files in general).

The Image header and placement rules come from the Linux documentation
"Booting AArch64 Linux" (Documentation/arm64/booting.rst): a 64-byte header
with ``text_offset``, ``image_size`` and ``flags``, magic ``ARM\\x64`` at
offset 56; the Image is placed at ``text_offset`` from a 2 MiB aligned base
(any 2 MiB aligned address when flags bit 3 is set), x0 holds the physical
address of the device tree and x1-x3 are zero.  Debian ships the Image
gzip-compressed on some releases; that is accepted too.  Where the Image,
initrd and device tree go on the virt board (as QEMU puts them), and the
other kernel formats, are :mod:`kemu.boot.arm64_boot`'s.
"""

from __future__ import annotations

import gzip
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from kemu.errors import BootError
from kemu.memory import GuestMemory

ARM64_MAGIC = 0x644D5241  # "ARM\x64"
HEADER = struct.Struct("<IIQQQQQQII")
SZ_2M = 2 << 20
#: Refuse to inflate a compressed Image beyond this (a gzip bomb guard).
MAX_IMAGE_SIZE = 256 << 20
DTB_MAX = 2 << 20


@dataclass(frozen=True)
class Arm64Image:
    data: bytes
    text_offset: int
    image_size: int
    flags: int

    @staticmethod
    def has_magic(data: bytes) -> bool:
        """The Image header's magic is there (an uncompressed Image)."""
        return len(data) >= HEADER.size and HEADER.unpack_from(data)[8] == ARM64_MAGIC

    @classmethod
    def parse(cls, data: bytes, what: str = "kernel") -> "Arm64Image":
        data = inflate(data, what)
        if len(data) < HEADER.size:
            raise BootError(f"{what}: too short to be an arm64 Image")
        (_c0, _c1, text_offset, image_size, flags, _r2, _r3, _r4, magic,
         _r5) = HEADER.unpack_from(data)
        if magic != ARM64_MAGIC:
            raise BootError(f"{what}: not an arm64 Linux Image (no ARM\\x64 magic)")
        if flags & 1:
            raise BootError(f"{what}: big-endian kernels are not supported")
        if image_size == 0:
            # Kernels before 3.17 leave image_size 0; booting.rst says assume 16 MiB
            # past the end of the file... be conservative.
            text_offset = 0x80000
            image_size = len(data) + (16 << 20)
        if image_size < len(data):
            raise BootError(f"{what}: header image_size is smaller than the file")
        return cls(data, text_offset, image_size, flags)

    @classmethod
    def load_file(cls, path: str | Path) -> "Arm64Image":
        return cls.parse(read_boot_file(path, "kernel"), f"kernel {path}")


def inflate(data: bytes, what: str) -> bytes:
    """``data`` gunzipped when it is gzip data (as QEMU's loader tries first), else as is."""
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = d.decompress(data, MAX_IMAGE_SIZE)
        if d.unconsumed_tail:
            raise BootError(f"{what}: compressed Image inflates beyond "
                            f"{MAX_IMAGE_SIZE >> 20} MiB")
    except (zlib.error, EOFError, gzip.BadGzipFile) as e:
        raise BootError(f"{what}: corrupt gzip data: {e}") from None
    return out


#: The largest kernel or initrd kemu reads (QEMU's virt takes up to 128 MiB of
#: kernel; Debian's initrds are tens of MiB): a bound, not a guess at RAM size.
MAX_BOOT_FILE = 1 << 30


def read_boot_file(path: str | Path, what: str, limit: int = MAX_BOOT_FILE) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes (a kernel, an initrd).

    Anything else (a device such as /dev/zero, a FIFO, a directory, a file
    larger than the bound or one that grows while read) is refused in one line.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BootError(f"{what} file not found: {path}") from None
    except PermissionError:
        raise BootError(f"{what} file is not readable: {path}") from None
    except OSError as e:
        raise BootError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise BootError(f"{what} path is a directory: {path}")
        if not stat.S_ISREG(st.st_mode):
            raise BootError(f"{what} {path}: not a regular file")
        if st.st_size > limit:
            raise BootError(f"{what} {path}: too large ({st.st_size >> 20} MiB; "
                            f"at most {limit >> 20} MiB)")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise BootError(f"cannot read {what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise BootError(f"{what} {path}: too large (more than {limit >> 20} MiB)")
    return data
