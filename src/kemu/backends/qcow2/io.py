"""The host file under a qcow2 image, and a bounded write-back table cache.

:class:`HostFile` counts writes and fsyncs so the metadata layers can tell
whether something they depend on is already on stable storage (qcow2
ordering: a refcount increment must be durable before an L2 entry
referencing the cluster is written).

:class:`TableCache` is the LRU cache behind the L2 tables and refcount
blocks (QEMU's "qcow2 metadata cache"): a bounded number of decoded
tables, dirty ones written back through a callback on eviction or flush.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Generic, Iterator, Protocol, TypeVar

from kemu.backends.block import ImageError, ImageIOError, _open_fd, _switch_locks

if TYPE_CHECKING:
    from kemu.backends.locking import Permissions


class HostFile:
    """A file opened by path, accessed with pread/pwrite at offsets."""

    def __init__(self, path: str | Path, read_only: bool, lock: "Permissions | None" = None,
                 locking: str = "auto") -> None:
        self.path = Path(path)
        self.read_only = read_only
        self.lock, self.locking = lock, locking
        self.fd = _open_fd(self.path, read_only, lock, locking)
        try:
            self.refresh_size()
        except ImageError:
            os.close(self.fd)
            raise
        #: Number of pwrite calls so far, and how many of them an fsync covers.
        self.writes = 0
        self.synced_writes = 0

    def refresh_size(self) -> None:
        """Read the file's size again (another process may have grown it)."""
        try:
            self.size = os.fstat(self.fd).st_size
        except OSError as e:
            raise ImageError(f"could not open {self.path}: {e.strerror}") from None

    def relock(self, lock: "Permissions | None", fallback: "Permissions | None") -> None:
        """Hold ``lock``'s bytes instead of ``fallback``'s (back to them on a conflict)."""
        _switch_locks(self.fd, self.path, lock, self.locking, fallback)

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; short only at end of file."""
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as e:
            raise ImageIOError(f"{self.path}: read error at {offset:#x}: {e.strerror}",
                               e.errno) from None
        if len(data) == length or not data:
            return data
        parts = [data]
        offset += len(data)
        length -= len(data)
        while length > 0:
            try:
                chunk = os.pread(self.fd, length, offset)
            except OSError as e:
                raise ImageIOError(f"{self.path}: read error at {offset:#x}: {e.strerror}",
                                   e.errno) from None
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def pread_exact(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise ImageError(f"{self.path}: {what} at {offset:#x} (+{length} bytes) lies "
                             f"beyond the end of the file")
        data = self.pread(offset, length)
        if len(data) != length:
            raise ImageError(f"{self.path}: short read of {what} at {offset:#x}")
        return data

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        end = offset + len(view)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:
            # bytes up to ``offset`` may have reached the file (a short write on a
            # full disk): the end of the file moved, its tail is no longer a hole
            self.size = max(self.size, offset)
            raise ImageIOError(f"{self.path}: write error at {offset:#x}: {e.strerror}",
                               e.errno) from None
        self.writes += 1
        if end > self.size:
            self.size = end

    def fsync(self) -> None:
        writes = self.writes
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise ImageIOError(f"{self.path}: flush failed: {e.strerror}", e.errno) from None
        self.synced_writes = writes

    def durable(self, write_count: int) -> bool:
        """True when the first ``write_count`` writes are covered by an fsync."""
        return self.synced_writes >= write_count

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Table(Protocol):
    dirty: bool


T = TypeVar("T", bound=Table)


class TableCache(Generic[T]):
    """An LRU map from host offset to a decoded table, at most ``capacity``
    tables.  Evicting a dirty table calls ``writeback(offset, table)``."""

    def __init__(self, capacity: int, load: Callable[[int], T],
                 writeback: Callable[[int, T], None]) -> None:
        self.capacity = max(2, capacity)
        self._load = load
        self._writeback = writeback
        self._tables: OrderedDict[int, T] = OrderedDict()

    def get(self, offset: int) -> T:
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
            return table
        table = self._load(offset)
        self.put(offset, table)
        return table

    def put(self, offset: int, table: T) -> None:
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        while len(self._tables) > self.capacity:
            old_offset, old = next(iter(self._tables.items()))
            if old.dirty:
                try:
                    self._writeback(old_offset, old)
                except ImageIOError:
                    # the host could not take it (a full disk): keep the table dirty,
                    # over capacity, for the next flush; this caller's change is unrelated
                    break
            # the write-back may itself have touched the cache
            if self._tables.get(old_offset) is old and not old.dirty:
                del self._tables[old_offset]
            elif self._tables.get(old_offset) is old:
                self._tables.move_to_end(old_offset)
                break

    def peek(self, offset: int) -> T | None:
        return self._tables.get(offset)

    def drop(self, offset: int) -> None:
        self._tables.pop(offset, None)

    def dirty(self) -> Iterator[tuple[int, T]]:
        """The dirty tables, in host offset order (a snapshot of the list)."""
        return iter(sorted(((o, t) for o, t in self._tables.items() if t.dirty),
                           key=lambda item: item[0]))

    def __len__(self) -> int:
        return len(self._tables)
