"""virtio-blk (VIRTIO 1.2, section 5.2 "Block Device") over a block backend.

One request queue.  A request is ``struct virtio_blk_req`` (5.2.6): a
16-byte device-readable header (type, reserved, sector), data, and a final
device-writable status byte; the framing is not relied on (2.6.4), the
header is read from the start of the readable bytes and the status is the
last writable byte.

What the guest gets back:

* a chain too short for a header, or with no writable status byte, is not
  a block request at all: device error (DEVICE_NEEDS_RESET), as for any
  malformed virtqueue;
* everything else gets a status byte: VIRTIO_BLK_S_IOERR for ranges beyond
  the capacity, data not a multiple of 512 bytes, writes to a read-only
  disk, malformed discard/write-zeroes segments and backend failures;
  VIRTIO_BLK_S_UNSUPP for unknown request types, features not negotiated
  and unknown segment flags (5.2.6.2).

Limits offered to the driver keep every request below the virtqueue's
:data:`~kemu.devices.virtio.queue.MAX_CHAIN_BYTES`: ``seg_max`` segments
of at most ``size_max`` bytes each (5.2.4).

Backend calls go through the device's executor (see
:mod:`kemu.devices.virtio`): the request is parsed and write data copied
out of guest memory first, so ``work`` touches only the backend.

A request the host fails (an ``OSError`` errno, e.g. a full disk) follows
QEMU's ``werror``/``rerror`` policy (:mod:`kemu.backends.block_error`):
``report`` gives the guest VIRTIO_BLK_S_IOERR, ``ignore`` VIRTIO_BLK_S_OK,
``stop`` holds the request until :meth:`VirtioBlk.retry_held` (the
machine pauses meanwhile, and retries on ``cont``).  ``on_io_error`` hears
of every such failure; stderr gets one line per episode of failures.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from functools import partial
from typing import Callable, Protocol

from kemu.backends.block_error import DEFAULT_RERROR, DEFAULT_WERROR, error_action

from kemu.devices.virtio import VIRTIO_ID_BLOCK, Executor, VirtioDevice, VirtioSession
from kemu.devices.virtio.queue import (
    DescriptorChain,
    VirtioError,
    Virtqueue,
    VirtqueueError,
)
from kemu.errors import KemuError, MemoryAccessError

log = logging.getLogger(__name__)

# Feature bits (5.2.3).
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types (5.2.6).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

# Status values (5.2.6).
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

SECTOR_SIZE = 512
VIRTIO_BLK_ID_BYTES = 20
HEADER = struct.Struct("<IIQ")            # type, reserved, sector
DWZ_SEGMENT = struct.Struct("<QII")       # struct virtio_blk_discard_write_zeroes
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3xIII")  # struct virtio_blk_config up to the zoned part

DEFAULT_QUEUE_SIZE = 256
#: Largest data segment the driver may use (config size_max).
SIZE_MAX = 256 << 10
#: Most data segments per request (config seg_max); SEG_MAX * SIZE_MAX = 32 MiB.
SEG_MAX_LIMIT = 128
#: Per-segment sector limit of discard and write zeroes (config max_*_sectors): 1 GiB.
MAX_DWZ_SECTORS = 1 << 21
#: Segments per discard / write zeroes request (config max_*_seg).
MAX_DWZ_SEG = 1


class BlockBackend(Protocol):
    """The host side of a disk (implemented by ``kemu.backends.block``).

    ``size`` (bytes) and ``read_only`` may be attributes or zero-argument methods.
    """

    size: int
    read_only: bool

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...


def _value(obj: object, name: str):
    v = getattr(obj, name)
    return v() if callable(v) else v


@dataclass(frozen=True)
class HostIOError:
    """``work``'s result when the host failed the request (``errno``)."""

    errno: int
    message: str


@dataclass(frozen=True)
class BlkRequest:
    """A parsed request: everything ``work`` needs, no guest memory references."""

    chain: DescriptorChain
    type: int
    sector: int
    #: Device-readable data after the header (OUT, DISCARD, WRITE_ZEROES).
    data: bytes
    #: Device-writable bytes before the status byte (IN, GET_ID).
    in_len: int
    features: int


@dataclass
class BlkStats:
    """Completed guest requests and their bytes, as QEMU's BlockDeviceStats counts them."""

    rd_bytes: int = 0
    wr_bytes: int = 0
    rd_operations: int = 0
    wr_operations: int = 0
    flush_operations: int = 0
    wr_highest_offset: int = 0


class VirtioBlk(VirtioDevice):
    """A virtio block device on a :class:`BlockBackend`."""

    device_id = VIRTIO_ID_BLOCK

    def __init__(self, backend: BlockBackend, *, serial: str = "", read_only: bool = False,
                 queue_size: int = DEFAULT_QUEUE_SIZE, blk_size: int = SECTOR_SIZE,
                 executor: Executor | None = None, name: str = "virtio-blk",
                 werror: str = DEFAULT_WERROR, rerror: str = DEFAULT_RERROR,
                 on_io_error: Callable[[str, str, int], None] | None = None) -> None:
        self.name = name
        self.werror, self.rerror = werror, rerror
        error_action(werror, 0), error_action(rerror, 0)       # known policies
        #: Told (operation, action, errno) of every request the host failed.
        self.on_io_error = on_io_error
        #: Requests held by the ``stop`` policy, retried by :meth:`retry_held`.
        self._held: list[tuple[int, BlkRequest]] = []
        self._failing = False          # in an episode of host errors (logged once)
        super().__init__([queue_size], executor)
        if queue_size < 4:
            raise ValueError(f"{name}: queue size must be at least 4")
        if blk_size < SECTOR_SIZE or blk_size & (blk_size - 1):
            raise ValueError(f"{name}: block size {blk_size} is not a power of two >= 512")
        self.backend = backend
        self.read_only = read_only or bool(_value(backend, "read_only"))
        self.serial = serial.encode("ascii", "replace")[:VIRTIO_BLK_ID_BYTES]
        self.blk_size = blk_size
        self.seg_max = min(queue_size - 2, SEG_MAX_LIMIT)
        self.can_discard = hasattr(backend, "discard") and not self.read_only
        self.can_write_zeroes = hasattr(backend, "write_zeroes") and not self.read_only
        #: What the guest asked of the disk (QMP's query-blockstats).
        self.stats = BlkStats()

    # -- feature bits and configuration space --------------------------------------------------
    def device_features(self) -> int:
        bits = [VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH]
        if self.read_only:
            bits.append(VIRTIO_BLK_F_RO)
        if self.can_discard:
            bits.append(VIRTIO_BLK_F_DISCARD)
        if self.can_write_zeroes:
            bits.append(VIRTIO_BLK_F_WRITE_ZEROES)
        return sum(1 << b for b in bits)

    @property
    def capacity(self) -> int:
        """Disk size in 512-byte sectors (a partial last sector is not visible)."""
        return int(_value(self.backend, "size")) // SECTOR_SIZE

    def config_space(self) -> bytes:
        """``struct virtio_blk_config`` (5.2.4), without the zoned characteristics."""
        align = self.blk_size // SECTOR_SIZE
        return CONFIG.pack(
            self.capacity, SIZE_MAX, self.seg_max,
            0, 0, 0,                                     # geometry (not offered)
            self.blk_size,
            0, 0, 0, 0,                                  # topology (not offered)
            0, 0, 1,                                     # writeback, unused0, num_queues
            MAX_DWZ_SECTORS, MAX_DWZ_SEG, align,         # discard
            MAX_DWZ_SECTORS, MAX_DWZ_SEG, 0,             # write zeroes; may_unmap = 0
            0, 0, 0)                                     # secure erase (not offered)

    def resize(self, size: int) -> None:
        """Resize the backend to ``size`` bytes (a whole number of sectors), then tell the
        driver its capacity changed (QMP block_resize)."""
        if self.read_only:
            raise KemuError(f"{self.name}: the disk is read-only")
        if size % SECTOR_SIZE:
            raise KemuError(f"{self.name}: size {size} is not a multiple of {SECTOR_SIZE}")
        resize = getattr(self.backend, "resize", None)
        if resize is None:
            raise KemuError(f"{self.name}: its {type(self.backend).__name__} backend cannot "
                            "be resized")
        resize(size)
        self.resized()

    def resized(self) -> None:
        """Call after the backend changed size: capacity changed, tell the driver (5.2.6.2)."""
        self.config_changed()

    # -- requests --------------------------------------------------------------------------
    def queue_notify(self, index: int, queue: Virtqueue) -> None:
        session = self.session
        if session is None:
            return
        while (chain := queue.pop()) is not None:
            req = self._parse(session, chain)
            self.executor.submit(partial(self._execute, req),
                                 partial(self._complete, session, index, queue, req))

    def _parse(self, session: VirtioSession, chain: DescriptorChain) -> BlkRequest:
        readable, writable = chain.readable_len, chain.writable_len
        if readable < HEADER.size:
            raise VirtqueueError(f"{self.name}: request of {readable} readable bytes has no header")
        if writable < 1:
            raise VirtqueueError(f"{self.name}: request has no status byte")
        rtype, _reserved, sector = HEADER.unpack(chain.read(session.memory, 0, HEADER.size))
        data = b""
        if rtype in (VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            data = chain.read(session.memory, HEADER.size, readable - HEADER.size)
        return BlkRequest(chain, rtype, sector, data, writable - 1, session.features)

    def _execute(self, req: BlkRequest) -> tuple[int, bytes] | HostIOError | None:
        """The backend part of a request: returns (status, data for the driver),
        the host error for the werror/rerror policy, or None when the image is
        inactive (handed over to a migration: QEMU drains its disks first)."""
        if getattr(self.backend, "inactive", False):
            return None
        try:
            return self._dispatch(req)
        except Exception as e:  # a failing backend is an I/O error, never a VMM crash
            err = getattr(e, "errno", None)
            if isinstance(err, int) and err > 0:
                return HostIOError(err, str(e))
            if not self._failing:
                log.error("kemu: %s: request type %d failed: %s", self.name, req.type,
                          str(e).splitlines()[0] if str(e) else type(e).__name__)
            self._failing = True
            return VIRTIO_BLK_S_IOERR, b""

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        return nbytes % SECTOR_SIZE == 0 and sector + nbytes // SECTOR_SIZE <= self.capacity

    def _dispatch(self, req: BlkRequest) -> tuple[int, bytes]:
        t = req.type
        if t == VIRTIO_BLK_T_IN:
            if not self._range_ok(req.sector, req.in_len):
                return VIRTIO_BLK_S_IOERR, b""
            data = bytes(self.backend.read(req.sector * SECTOR_SIZE, req.in_len))
            if len(data) != req.in_len:
                return VIRTIO_BLK_S_IOERR, b""
            self.stats.rd_operations += 1
            self.stats.rd_bytes += len(data)
            return VIRTIO_BLK_S_OK, data
        if t == VIRTIO_BLK_T_OUT:
            if self.read_only or not self._range_ok(req.sector, len(req.data)):
                return VIRTIO_BLK_S_IOERR, b""
            if req.data:
                self.backend.write(req.sector * SECTOR_SIZE, req.data)
            self.stats.wr_operations += 1
            self.stats.wr_bytes += len(req.data)
            end = req.sector * SECTOR_SIZE + len(req.data)
            self.stats.wr_highest_offset = max(self.stats.wr_highest_offset, end)
            return VIRTIO_BLK_S_OK, b""
        if t == VIRTIO_BLK_T_FLUSH:
            if not self.read_only:
                self.backend.flush()
            self.stats.flush_operations += 1
            return VIRTIO_BLK_S_OK, b""
        if t == VIRTIO_BLK_T_GET_ID:
            return VIRTIO_BLK_S_OK, self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        if t in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            return self._discard_write_zeroes(req), b""
        return VIRTIO_BLK_S_UNSUPP, b""

    def _discard_write_zeroes(self, req: BlkRequest) -> int:
        discard = req.type == VIRTIO_BLK_T_DISCARD
        feature = VIRTIO_BLK_F_DISCARD if discard else VIRTIO_BLK_F_WRITE_ZEROES
        if not req.features >> feature & 1:
            return VIRTIO_BLK_S_UNSUPP
        n, rest = divmod(len(req.data), DWZ_SEGMENT.size)
        if rest or not 1 <= n <= MAX_DWZ_SEG:
            return VIRTIO_BLK_S_IOERR
        segments = [DWZ_SEGMENT.unpack_from(req.data, i * DWZ_SEGMENT.size) for i in range(n)]
        for sector, count, flags in segments:
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (discard and flags):
                return VIRTIO_BLK_S_UNSUPP
        if self.read_only:
            return VIRTIO_BLK_S_IOERR
        for sector, count, _flags in segments:
            if count > MAX_DWZ_SECTORS or not self._range_ok(sector, count * SECTOR_SIZE):
                return VIRTIO_BLK_S_IOERR
        for sector, count, _flags in segments:
            if count:
                op = self.backend.discard if discard else self.backend.write_zeroes
                op(sector * SECTOR_SIZE, count * SECTOR_SIZE)
        return VIRTIO_BLK_S_OK

    def _on_host_error(self, index: int, req: BlkRequest, err: HostIOError) -> int | None:
        """Apply werror/rerror to a failed request: the status for the guest, or
        None when the request is held (``stop``)."""
        operation = "read" if req.type in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID) else "write"
        action = error_action(self.rerror if operation == "read" else self.werror, err.errno)
        if not self._failing:
            what = {"stop": "the machine pauses until cont", "report": "the guest gets an I/O error",
                    "ignore": "ignored"}[action]
            log.error("kemu: %s: %s (%s=%s: %s)", self.name, err.message,
                      "rerror" if operation == "read" else "werror",
                      self.rerror if operation == "read" else self.werror, what)
        self._failing = True
        if action == "stop":
            self._held.append((index, req))
        if self.on_io_error is not None:
            self.on_io_error(operation, action, err.errno)
        if action == "stop":
            return None
        return VIRTIO_BLK_S_IOERR if action == "report" else VIRTIO_BLK_S_OK

    def retry_held(self) -> None:
        """Run again the requests the ``stop`` policy held (the machine resumed)."""
        session = self.session
        held, self._held = self._held, []
        if session is None or not session.active:
            return
        for index, req in held:
            queue = session.queues[index]
            self.executor.submit(partial(self._execute, req),
                                 partial(self._complete, session, index, queue, req))

    @property
    def held_requests(self) -> int:
        return len(self._held)

    def reset(self) -> None:
        self._held = []
        super().reset()

    def _complete(self, session: VirtioSession, index: int, queue: Virtqueue, req: BlkRequest,
                  result: tuple[int, bytes] | HostIOError | None) -> None:
        """Write data and status back and return the chain (runs in device context)."""
        if not session.active:
            return  # reset or failed while the backend was busy: drop
        if result is None:
            # A doorbell the guest rang before the migration paused it, seen after
            # the disk was handed over: held, and run if the source runs on (cont
            # takes the disk back first); a destination takes it from the ring.
            self._held.append((index, req))
            return
        if isinstance(result, HostIOError):
            status = self._on_host_error(index, req, result)
            if status is None:
                return
            result = (status, bytes(req.in_len) if status == VIRTIO_BLK_S_OK else b"")
        else:
            self._failing = False
        status, data = result
        try:
            written = req.chain.write(session.memory, 0, data[:req.in_len]) if data else 0
            req.chain.write(session.memory, req.chain.writable_len - 1, bytes([status]))
            # Used length (2.7.8.1): the bytes written from the start of the writable
            # buffers on, so the status byte counts only when the data reached it.
            queue.push(req.chain, req.in_len + 1 if written == req.in_len else written)
        except (VirtioError, MemoryAccessError) as exc:
            session.device_error(str(exc))
            return
        session.signal_used(index)
