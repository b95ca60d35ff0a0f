"""Writing initramfs archives: the cpio "newc" format, gzip-compressed.

Format from the Linux documentation "ramfs, rootfs and initramfs" and
"initramfs buffer format" (Documentation/driver-api/early-userspace/
buffer-format.rst): a 110-byte ASCII header (magic 070701, 13 hex fields),
the NUL-terminated name padded to 4 bytes, the data padded to 4 bytes, and a
final "TRAILER!!!" entry.
"""

from __future__ import annotations

import gzip
import io
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def directory(name: str, perm: int = 0o755) -> Entry:
    return Entry(name, stat.S_IFDIR | perm)


def file(name: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def chardev(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(name, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def newc(entries: list[Entry]) -> bytes:
    out = io.BytesIO()
    for ino, e in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = e.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        fields = (ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1],
                  len(name), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(header + name + _pad(len(header) + len(name)))
        out.write(e.data + _pad(len(e.data)))
    return out.getvalue()


def initramfs(entries: list[Entry], level: int = 6) -> bytes:
    """A gzip-compressed newc archive, as the kernel's initramfs unpacker reads."""
    return gzip.compress(newc(entries), compresslevel=level, mtime=0)
