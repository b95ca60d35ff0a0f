"""Image locking compatible with QEMU's (block/file-posix.c, "lock bytes").

QEMU describes what a user of an image file does with permission bits
(``BLK_PERM_*``, include/block/block-common.h): bit 0 "consistent read",
bit 1 "write", bit 2 "write unchanged", bit 3 "resize".  On the image file
itself it holds, with open file description locks (``F_OFD_SETLK``, shared
read locks of one byte each):

* byte ``100 + bit`` for every permission it *uses*;
* byte ``200 + bit`` for every permission it does *not share* with others.

Before using a permission a process tests that nobody holds the matching
"unshare" byte, and before refusing to share one that nobody holds its
"use" byte (``F_OFD_GETLK`` with a write lock).  kemu takes the same bytes
with the same permission sets QEMU 7.2 takes (measured in /proc/locks):

====================  ===================  ======================
open                  uses                 does not share
====================  ===================  ======================
qcow2, read-write     read, write, resize  write, resize
qcow2, read-only      read                 write, resize
raw, read-write       read, write          write
raw, read-only        read                 write
backing file          read                 (nothing)
-snapshot's image     read                 write, resize
force share (-U)      read                 (nothing)
====================  ===================  ======================

so kemu and QEMU exclude each other in both directions.  The locks live as
long as the file descriptor, and an OFD lock belongs to the open file
description, so two opens in one process exclude each other too.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from kemu.backends.block import ImageError

BLK_PERM_CONSISTENT_READ = 0x01
BLK_PERM_WRITE = 0x02
BLK_PERM_WRITE_UNCHANGED = 0x04
BLK_PERM_RESIZE = 0x08
BLK_PERM_ALL = 0x0F
#: QEMU's names for the permission bits (bdrv_perm_names), used in its messages.
PERM_NAMES = ("consistent read", "write", "write unchanged", "resize")

RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200

#: struct flock (x86-64 and aarch64 Linux): l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hhxxxxqqi4x")
#: Errors that mean "this file system has no OFD locks" (locking=auto then skips).
_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.ENOLCK, errno.ENOSYS)

LOCKING_MODES = ("on", "off", "auto")


class ImageLockError(ImageError):
    """Another process uses the image in a way this open cannot share."""


@dataclass(frozen=True)
class Permissions:
    """What an open uses (``perm``) and what it lets others use (``shared``)."""

    perm: int
    shared: int


def image_permissions(format: str, read_only: bool, *, backing: bool = False,
                      force_share: bool = False) -> Permissions:
    """The permissions QEMU's block layer takes on the image file for such an open."""
    if backing or force_share:
        return Permissions(BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
    unshared = BLK_PERM_WRITE | (BLK_PERM_RESIZE if format == "qcow2" else 0)
    perm = BLK_PERM_CONSISTENT_READ
    if not read_only:
        perm |= BLK_PERM_WRITE | (BLK_PERM_RESIZE if format == "qcow2" else 0)
    return Permissions(perm, BLK_PERM_ALL & ~unshared)


def snapshot_base_permissions() -> Permissions:
    """The image under -snapshot's temporary overlay, raw or qcow2: QEMU opens it
    as a backing file whose parent does not share writes (bdrv_default_perms_for_cow):
    it reads, and shares only reads and unchanged writes (measured: bytes 100, 201, 203)."""
    return Permissions(BLK_PERM_CONSISTENT_READ,
                       BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED)


def _bits(mask: int):
    return (bit for bit in range(len(PERM_NAMES)) if mask >> bit & 1)


def _setlk(fd: int, kind: int, byte: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))


def _held_by_other(fd: int, byte: int) -> bool:
    """Whether another open file description holds a lock on ``byte``."""
    out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
    return _FLOCK.unpack(out)[0] != fcntl.F_UNLCK


def lock_image(fd: int, path: str | Path, perms: Permissions, mode: str = "auto") -> bool:
    """Take QEMU's lock bytes for ``perms`` on ``fd`` and check nobody conflicts.

    Returns whether the file is now locked (``mode="auto"`` on a file system
    without OFD locks: no).  Raises :class:`ImageLockError` with QEMU's
    message when another user conflicts; the caller closes ``fd``, which
    drops any byte taken here.
    """
    if mode == "off":
        return False
    try:
        for bit in _bits(perms.perm):
            _setlk(fd, fcntl.F_RDLCK, RAW_LOCK_PERM_BASE + bit)
        for bit in _bits(BLK_PERM_ALL & ~perms.shared):
            _setlk(fd, fcntl.F_RDLCK, RAW_LOCK_SHARED_BASE + bit)
        conflict = next((f'"{PERM_NAMES[bit]}"' for bit in _bits(perms.perm)
                         if _held_by_other(fd, RAW_LOCK_SHARED_BASE + bit)), None)
        if conflict is None:
            conflict = next((f'shared "{PERM_NAMES[bit]}"'
                             for bit in _bits(BLK_PERM_ALL & ~perms.shared)
                             if _held_by_other(fd, RAW_LOCK_PERM_BASE + bit)), None)
    except OSError as e:
        if e.errno in _UNSUPPORTED and mode == "auto":
            return False
        if e.errno in (errno.EAGAIN, errno.EACCES):
            # someone holds an exclusive lock on a byte QEMU only ever shares
            raise ImageLockError(f"could not open {path}: Failed to lock byte: Is another "
                                 f"process using the image [{path}]?") from None
        raise ImageError(f"could not open {path}: locking failed: {e.strerror}") from None
    if conflict is not None:
        raise ImageLockError(f"could not open {path}: Failed to get {conflict} lock: "
                             f"Is another process using the image [{path}]?")
    return True


def inactive_permissions() -> Permissions:
    """An image opened or handed over *inactive* (a migration's destination before the
    switch, its source after): it reads and lets others do anything (QEMU's
    blk_root_inactivate drops the device's permissions to none, all shared)."""
    return Permissions(BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)


def relock_image(fd: int, path: str | Path, perms: Permissions, mode: str = "auto") -> bool:
    """Hold exactly QEMU's lock bytes for ``perms`` on ``fd``: the bytes of other
    permissions are released first, then :func:`lock_image` takes and checks these.
    On :class:`ImageLockError` the caller goes back to its previous permissions."""
    if mode == "off":
        return False
    try:
        for bit in _bits(BLK_PERM_ALL & ~perms.perm):
            _setlk(fd, fcntl.F_UNLCK, RAW_LOCK_PERM_BASE + bit)
        for bit in _bits(perms.shared):
            _setlk(fd, fcntl.F_UNLCK, RAW_LOCK_SHARED_BASE + bit)
    except OSError as e:
        if e.errno in _UNSUPPORTED and mode == "auto":
            return False
        raise ImageError(f"{path}: unlocking failed: {e.strerror}") from None
    return lock_image(fd, path, perms, mode)
