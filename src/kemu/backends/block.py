"""Host side of disks: raw image files, and opening images by format.

A backend is what virtio-blk reads and writes (the protocol
:class:`kemu.devices.virtio.blk.BlockBackend`): ``size`` in bytes,
``read_only``, ``read``/``write`` at byte offsets, ``flush`` (which must
reach stable storage: fsync), ``discard``, ``write_zeroes``; plus ``close``.
:func:`open_image` opens a raw file or a qcow2 image.  As QEMU does, a file
is interpreted as qcow2 only when its header says so or the user asks;
format probing never turns a raw disk whose guest wrote a qcow2 header into
a qcow2 image unless the format was left unspecified.  When it was, a file
that probes as raw is opened with writes to its first sector restricted (a
guest must not turn its disk into a qcow2 image pointing at host files), and
a warning says so, as QEMU does.

Shared storage in a migration (QEMU's bdrv_inactivate_all / bdrv_activate_all):
a backend opened ``inactive`` (the destination of ``-incoming``) takes no
write locks, writes nothing and trusts no metadata it read; the source's
backends are inactivated (flushed, write locks dropped) once its guest is
paused for the last pass; :meth:`activate` takes the locks back and reads
every piece of metadata again (qcow2: header, L1/L2 tables, refcounts), on
the destination before its guest runs, on the source if the migration fails.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kemu.errors import KemuError

if TYPE_CHECKING:
    from kemu.backends.locking import Permissions
    from kemu.devices.virtio.blk import BlockBackend

QCOW2_MAGIC = b"QFI\xfb"


def __getattr__(name: str):
    # the protocol lives with its user, virtio-blk; re-exported here lazily
    if name == "BlockBackend":
        from kemu.devices.virtio.blk import BlockBackend
        return BlockBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ImageError(KemuError):
    """A disk image that cannot be opened or is malformed."""

    exit_status = 2


class ImageIOError(ImageError):
    """A host read, write or flush of an image file failed (``errno``: why), as
    opposed to a malformed image: the guest's werror/rerror policy decides."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


#: Longest chain of backing files followed before giving up.
MAX_BACKING_DEPTH = 32


def _open_fd(path: Path, read_only: bool, lock: "Permissions | None" = None,
             locking: str = "auto") -> int:
    """Open an image file; with ``lock``, take QEMU's lock bytes for those
    permissions (:mod:`kemu.backends.locking`) unless ``locking`` is "off"."""
    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise IsADirectoryError
        if lock is not None:
            from kemu.backends.locking import lock_image
            try:
                lock_image(fd, path, lock, locking)
            except BaseException:
                os.close(fd)
                raise
        return fd
    except FileNotFoundError:
        raise ImageError(f"could not open {path}: No such file or directory") from None
    except IsADirectoryError:
        raise ImageError(f"could not open {path}: Is a directory") from None
    except PermissionError:
        how = "read-only" if read_only else "read-write"
        raise ImageError(f"could not open {path} {how}: Permission denied") from None
    except OSError as e:
        raise ImageError(f"could not open {path}: {e.strerror}") from None


def _switch_locks(fd: int, path: Path, perms: "Permissions | None", locking: str,
                  fallback: "Permissions | None") -> None:
    """Hold the lock bytes of ``perms`` instead of ``fallback``'s; if they cannot be
    taken (another process uses the image) go back to ``fallback``'s and raise."""
    if perms is None:
        return
    from kemu.backends.locking import relock_image
    try:
        relock_image(fd, path, perms, locking)
    except ImageError:
        if fallback is not None:
            try:
                relock_image(fd, path, fallback, locking)
            except ImageError:
                pass
        raise


def inactive_lock(lock: "Permissions | None", inactive: bool) -> "Permissions | None":
    """The lock an open takes: ``lock``, or an inactive image's if ``inactive``."""
    if lock is None or not inactive:
        return lock
    from kemu.backends.locking import inactive_permissions
    return inactive_permissions()


def inactive_error(path: Path) -> ImageError:
    return ImageError(f"{path}: the image is inactive (handed over to a migration)")


class RawFile:
    """A raw image: guest offset = file offset."""

    format = "raw"

    def __init__(self, path: str | Path, read_only: bool = False, *,
                 probed: bool = False, lock: "Permissions | None" = None,
                 locking: str = "auto", inactive: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        #: Format was guessed: refuse writes that would make sector 0 probe as
        #: something other than raw.
        self.probed = probed
        #: Handed over to a migration: no writes, no write locks (see the module).
        self.inactive = inactive
        self._lock_perms, self._locking = lock, locking
        self._fd = _open_fd(self.path, read_only, inactive_lock(lock, inactive), locking)
        try:
            st = os.fstat(self._fd)
            self.size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(self._fd, 0, os.SEEK_END)
        except OSError as e:
            os.close(self._fd)
            raise ImageError(f"could not open {self.path}: {e.strerror}") from None

    def resize(self, size: int) -> None:
        """Grow or shrink the image to ``size`` bytes (QMP block_resize)."""
        if self.read_only:
            raise ImageError(f"{self.path}: the image is read-only")
        if self.inactive:
            raise inactive_error(self.path)
        try:
            if not stat.S_ISREG(os.fstat(self._fd).st_mode):
                raise ImageError(f"{self.path}: cannot resize a device, only a regular file")
            os.ftruncate(self._fd, size)
        except OSError as e:
            raise ImageError(f"{self.path}: cannot resize to {size} bytes: {e.strerror}") \
                from None
        self.size = size

    def inactivate(self) -> None:
        """Flush and drop the write locks (QEMU's bdrv_inactivate)."""
        if self.inactive:
            return
        self.flush()
        _switch_locks(self._fd, self.path, inactive_lock(self._lock_perms, True),
                      self._locking, None)
        self.inactive = True

    def activate(self) -> None:
        """Take the locks back and read the size again (QEMU's bdrv_activate)."""
        if not self.inactive:
            return
        _switch_locks(self._fd, self.path, self._lock_perms, self._locking,
                      inactive_lock(self._lock_perms, True))
        try:
            st = os.fstat(self._fd)
            if stat.S_ISREG(st.st_mode):
                self.size = st.st_size
        except OSError as e:
            raise ImageError(f"{self.path}: {e.strerror}") from None
        self.inactive = False

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageError(f"{self.path}: access of {length} bytes at {offset} is beyond "
                             f"the end of the image ({self.size} bytes)")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as e:
            raise ImageIOError(f"{self.path}: read error: {e.strerror}", e.errno) from None
        return data + bytes(length - len(data))

    def write(self, offset: int, data: bytes) -> None:
        if self.read_only:
            raise ImageError(f"{self.path}: image is read-only")
        if self.inactive:
            raise inactive_error(self.path)
        self._check(offset, len(data))
        if self.probed and offset < len(QCOW2_MAGIC):
            head = self.read(0, len(QCOW2_MAGIC))
            n = min(len(QCOW2_MAGIC) - offset, len(data))
            head = head[:offset] + bytes(data[:n]) + head[offset + n:]
            if head == QCOW2_MAGIC:
                raise ImageError(f"{self.path}: refusing to write a qcow2 header into a raw "
                                 f"image whose format was probed; specify format=raw")
        view = memoryview(data).cast("B")
        try:
            while view:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:
            raise ImageIOError(f"{self.path}: write error: {e.strerror}", e.errno) from None

    def flush(self) -> None:
        if not self.read_only and not self.inactive:
            try:
                os.fsync(self._fd)
            except OSError as e:
                raise ImageIOError(f"{self.path}: flush failed: {e.strerror}", e.errno) from None

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        if self.read_only:
            raise ImageError(f"{self.path}: image is read-only")
        if self.inactive:
            raise inactive_error(self.path)
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


def detect_format(path: str | Path) -> str:
    """``"qcow2"`` if the file starts with the qcow2 magic, else ``"raw"``."""
    fd = _open_fd(Path(path), True)
    try:
        return "qcow2" if os.pread(fd, 4, 0) == QCOW2_MAGIC else "raw"
    except OSError as e:
        raise ImageError(f"could not read {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def file_identity(path: str | Path) -> tuple[int, int]:
    """(device, inode) of a file, to recognise it under another name."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImageError(f"could not open {path}: {e.strerror}") from None
    return st.st_dev, st.st_ino


def open_image(path: str | Path, format: str | None = None,
               read_only: bool = False, *,
               on_warning: Callable[[str], None] | None = None,
               chain: tuple[tuple[int, int], ...] = (), locking: str = "auto",
               force_share: bool = False, backing: bool = False,
               lock: "Permissions | None" = None, inactive: bool = False) -> "BlockBackend":
    """Open a disk image as a :class:`BlockBackend`.

    ``format`` is ``"raw"``, ``"qcow2"`` or ``None`` to probe: a file with
    the qcow2 magic opens as qcow2, anything else as raw with writes to
    sector 0 restricted, and (when opened read-write) ``on_warning`` gets a
    message saying so.
    ``chain`` holds the identities of the images that have this one as
    their backing file (backing loop detection).

    The file is locked as QEMU locks it (:mod:`kemu.backends.locking`):
    ``locking`` is QEMU's ``file.locking`` (on, off, auto), ``force_share``
    its ``-U`` (read-only opens that tolerate writers), ``backing`` says the
    image is opened as another image's backing file (its chain inherits
    ``locking``); ``lock`` overrides the permissions taken on the file.
    ``inactive``: opened for an incoming migration (see the module).
    """
    from kemu.backends.locking import image_permissions
    if force_share and not read_only:
        raise ImageError(f"{path}: force-share=on can only be used with read-only images")
    path = Path(path)
    if len(chain) >= MAX_BACKING_DEPTH:
        raise ImageError(f"{path}: backing file chain is longer than {MAX_BACKING_DEPTH}")
    if file_identity(path) in chain:
        raise ImageError(f"{path}: backing file loop (the image is its own backing file)")
    probed = format is None
    fmt = format or detect_format(path)
    if fmt == "raw":
        if probed and not read_only and on_warning is not None:
            on_warning(f"Image format was not specified for '{path}' and probing guessed raw. "
                       f"Automatically detecting the format is dangerous for raw images, "
                       f"write operations on block 0 will be restricted. Specify the "
                       f"'raw' format explicitly to remove the restrictions.")
        return RawFile(path, read_only, probed=probed and not read_only,
                       lock=lock or image_permissions("raw", read_only, backing=backing,
                                                      force_share=force_share),
                       locking=locking, inactive=inactive)
    if fmt == "qcow2":
        from kemu.backends.qcow2 import Qcow2Image
        return Qcow2Image.open(path, read_only=read_only, chain=chain, locking=locking,
                               lock=lock or image_permissions("qcow2", read_only,
                                                              backing=backing,
                                                              force_share=force_share),
                               inactive=inactive)
    raise ImageError(f"{path}: unknown image format {fmt!r} (known: raw, qcow2)")


def inactivate_all(backends) -> list:
    """Flush every disk and drop its write locks (QEMU's bdrv_inactivate_all); returns
    the ones inactivated here.  If one fails, those already done are activated again."""
    done: list = []
    try:
        for backend in backends:
            if callable(getattr(backend, "inactivate", None)) and not backend.inactive:
                backend.inactivate()
                done.append(backend)
    except BaseException:
        activate_all(done)
        raise
    return done


def activate_all(backends) -> None:
    """Take every disk's locks back and re-read its metadata (QEMU's bdrv_activate_all).
    Every one is tried; the first failure is raised (one line)."""
    _run_all(b.activate for b in backends if getattr(b, "inactive", False))


def flush_and_close(backends: list) -> None:
    """Flush and close every disk of a machine that ends.

    Each one is closed even when another fails (a full host disk at the last
    flush, say): the first failure is raised after all of them are closed.
    """
    _run_all(step for backend in backends for step in (backend.flush, backend.close))


def _run_all(steps) -> None:
    """Every step, even after one failed; the first failure is raised."""
    failure: KemuError | None = None
    for step in steps:
        try:
            step()
        except KemuError as e:
            failure = failure or e
    if failure is not None:
        raise failure
