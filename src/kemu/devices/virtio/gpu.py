"""virtio-gpu, 2D (VIRTIO 1.2, section 5.7 "GPU Device").

Two queues (5.7.2): ``controlq`` (0) carries requests that each start with
``struct virtio_gpu_ctrl_hdr`` and get a response header back in the
chain's writable part; ``cursorq`` (1) carries UPDATE_CURSOR / MOVE_CURSOR,
which are returned with no response.  The configuration space (5.7.4) is
``events_read``, ``events_clear``, ``num_scanouts``, ``num_capsets``; the
device sets VIRTIO_GPU_EVENT_DISPLAY in ``events_read`` and raises a
configuration change when the display side asks for another size, and the
driver clears it through ``events_clear`` (5.7.4.1).  Feature bits:
VIRTIO_GPU_F_EDID only (no virgl, no blobs).

2D operation (5.7.6.7): the driver creates a host resource
(RESOURCE_CREATE_2D), attaches guest pages as its backing store
(RESOURCE_ATTACH_BACKING), copies from the backing into the resource
(TRANSFER_TO_HOST_2D), points a scanout at it (SET_SCANOUT) and says what
to show (RESOURCE_FLUSH): this model then copies the flushed rectangle into
the :class:`~kemu.display.surface.DisplaySurface` that the host side reads.

Every field is the guest's.  kemu's checks, each answered with a
VIRTIO_GPU_RESP_ERR_* response (never a device error):

* resource ids non-zero and unique, formats one of the eight 32-bit ones of
  5.7.6.8, widths and heights in 1..:data:`MAX_DIMENSION`;
* all resources together at most ``max_hostmem`` bytes of host memory
  (QEMU's property of that name, 256 MiB by default), counting each
  resource's pixels plus :data:`RESOURCE_COST` bytes for the resource and
  :data:`BACKING_ENTRY_COST` per backing entry (so a million 1x1 resources
  cannot eat the host either): beyond it ERR_OUT_OF_MEMORY, and no host
  memory is allocated;
* backing: at most :data:`MAX_BACKING_ENTRIES` entries, each wholly inside
  guest RAM, their total no larger than ``max_hostmem``; a transfer reads
  only inside the backing and rejects offsets that would overflow it;
* rectangles inside the resource (checked on 64-bit-free Python integers, so
  ``x + width`` cannot wrap), scanout ids below ``num_scanouts``.

A chain whose readable part is shorter than its request gets ERR_UNSPEC;
one without room for the response is returned with nothing written.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field

from kemu.devices.virtio import Executor, VirtioDevice, VirtioSession
from kemu.devices.virtio.queue import DescriptorChain, Virtqueue
from kemu.display.surface import DisplaySurface
from kemu.errors import MemoryAccessError

log = logging.getLogger(__name__)

VIRTIO_ID_GPU = 16                     # 5.7.1
CONTROLQ, CURSORQ = 0, 1               # 5.7.2

VIRTIO_GPU_F_EDID = 1                  # 5.7.3
VIRTIO_GPU_EVENT_DISPLAY = 1 << 0      # 5.7.4
VIRTIO_GPU_FLAG_FENCE = 1 << 0         # 5.7.6.7
VIRTIO_GPU_MAX_SCANOUTS = 16

# enum virtio_gpu_ctrl_type (5.7.6.7).
CMD_GET_DISPLAY_INFO = 0x0100
CMD_RESOURCE_CREATE_2D = 0x0101
CMD_RESOURCE_UNREF = 0x0102
CMD_SET_SCANOUT = 0x0103
CMD_RESOURCE_FLUSH = 0x0104
CMD_TRANSFER_TO_HOST_2D = 0x0105
CMD_RESOURCE_ATTACH_BACKING = 0x0106
CMD_RESOURCE_DETACH_BACKING = 0x0107
CMD_GET_CAPSET_INFO = 0x0108
CMD_GET_CAPSET = 0x0109
CMD_GET_EDID = 0x010A
CMD_UPDATE_CURSOR = 0x0300
CMD_MOVE_CURSOR = 0x0301
RESP_OK_NODATA = 0x1100
RESP_OK_DISPLAY_INFO = 0x1101
RESP_OK_EDID = 0x1104
RESP_ERR_UNSPEC = 0x1200
RESP_ERR_OUT_OF_MEMORY = 0x1201
RESP_ERR_INVALID_SCANOUT_ID = 0x1202
RESP_ERR_INVALID_RESOURCE_ID = 0x1203
RESP_ERR_INVALID_CONTEXT_ID = 0x1204
RESP_ERR_INVALID_PARAMETER = 0x1205

# enum virtio_gpu_formats (5.7.6.8): all 32 bits per pixel.
FORMAT_B8G8R8A8_UNORM = 1
FORMAT_B8G8R8X8_UNORM = 2
FORMAT_A8R8G8B8_UNORM = 3
FORMAT_X8R8G8B8_UNORM = 4
FORMAT_R8G8B8A8_UNORM = 67
FORMAT_X8B8G8R8_UNORM = 68
FORMAT_A8B8G8R8_UNORM = 121
FORMAT_R8G8B8X8_UNORM = 134
#: For each format, where B, G and R sit in a pixel's 4 bytes in memory.
FORMAT_BGR_OFFSETS = {
    FORMAT_B8G8R8A8_UNORM: (0, 1, 2), FORMAT_B8G8R8X8_UNORM: (0, 1, 2),
    FORMAT_A8R8G8B8_UNORM: (3, 2, 1), FORMAT_X8R8G8B8_UNORM: (3, 2, 1),
    FORMAT_R8G8B8A8_UNORM: (2, 1, 0), FORMAT_X8B8G8R8_UNORM: (1, 2, 3),
    FORMAT_A8B8G8R8_UNORM: (1, 2, 3), FORMAT_R8G8B8X8_UNORM: (2, 1, 0),
}
BPP = 4

CTRL_HDR = struct.Struct("<IIQIB3x")          # type, flags, fence_id, ctx_id, ring_idx
RECT = struct.Struct("<IIII")
RESOURCE_CREATE_2D = struct.Struct("<IIII")   # resource_id, format, width, height
SET_SCANOUT = struct.Struct("<IIIIII")        # rect, scanout_id, resource_id
RESOURCE_FLUSH = struct.Struct("<IIIII4x")    # rect, resource_id
TRANSFER_TO_HOST_2D = struct.Struct("<IIIIQI4x")  # rect, offset, resource_id
RESOURCE_ID = struct.Struct("<I4x")           # resource_id (unref, detach_backing)
ATTACH_BACKING = struct.Struct("<II")         # resource_id, nr_entries
MEM_ENTRY = struct.Struct("<QI4x")            # addr, length
GET_EDID = struct.Struct("<I4x")              # scanout
CURSOR = struct.Struct("<IIIIIII4x")          # pos{scanout,x,y,pad}, resource_id, hot_x, hot_y
DISPLAY_ONE = struct.Struct("<IIIIII")        # rect, enabled, flags

#: Largest width or height of a resource or scanout.
MAX_DIMENSION = 16384
#: Largest number of backing entries of one resource (as QEMU's bound).
MAX_BACKING_ENTRIES = 16384
#: Default bound on host memory for all resources (QEMU's max_hostmem default).
DEFAULT_MAX_HOSTMEM = 256 << 20
DEFAULT_QUEUE_SIZE = 256
CURSOR_QUEUE_SIZE = 16
#: Host bytes charged against max_hostmem per resource and per backing entry
#: (Python's bookkeeping for them, rounded up).
RESOURCE_COST = 1024
BACKING_ENTRY_COST = 128


class GpuError(Exception):
    """A request refused with a VIRTIO_GPU_RESP_ERR_* code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass
class Resource:
    """A host-side 2D resource and the guest pages backing it."""

    id: int
    format: int
    width: int
    height: int
    data: bytearray
    backing: list[tuple[int, int]] = field(default_factory=list)

    @property
    def stride(self) -> int:
        return self.width * BPP

    @property
    def backing_len(self) -> int:
        return sum(length for _addr, length in self.backing)

    @property
    def host_cost(self) -> int:
        """Host memory charged for this resource against max_hostmem."""
        return len(self.data) + RESOURCE_COST + BACKING_ENTRY_COST * len(self.backing)


@dataclass
class Scanout:
    resource_id: int = 0
    x: int = 0
    y: int = 0
    width: int = 0
    height: int = 0


@dataclass
class VirtioGpuState:
    """What :meth:`VirtioGpu.save` returns (version 1): plain data."""

    version: int
    xres: int
    yres: int
    events_read: int
    #: (id, format, width, height, pixels, backing entries)
    resources: list[tuple[int, int, int, int, bytes, list[tuple[int, int]]]]
    #: per scanout: (resource_id, x, y, width, height)
    scanouts: list[tuple[int, int, int, int, int]]
    cursor: tuple[int, int, int] = (0, 0, 0)


def edid(width: int, height: int, refresh: int = 60) -> bytes:
    """A 128-byte EDID 1.4 block whose preferred mode is ``width`` x ``height``
    (VESA E-EDID: header, vendor "KEM", one detailed timing descriptor, a name)."""
    width, height = min(width, 4095), min(height, 4095)
    hblank, vblank = max(160, width // 8), max(30, height // 25)
    clock = (width + hblank) * (height + vblank) * refresh // 10_000   # 10 kHz units
    clock = min(clock, 0xFFFF)
    block = bytearray(128)
    block[0:8] = b"\x00\xff\xff\xff\xff\xff\xff\x00"
    vendor = ((ord("K") - 64) << 10) | ((ord("E") - 64) << 5) | (ord("M") - 64)
    block[8:10] = vendor.to_bytes(2, "big")
    block[10:12] = (1).to_bytes(2, "little")        # product code
    block[16], block[17] = 1, 34                     # week, year 1990+34
    block[18], block[19] = 1, 4                      # EDID 1.4
    block[20] = 0xA5                                 # digital, 8 bits per colour, DisplayPort
    block[21], block[22] = width * 254 // 9600 or 1, height * 254 // 9600 or 1   # cm at 96 dpi
    block[23] = 120                                  # gamma 2.2
    block[24] = 0x06                                 # RGB 4:4:4, preferred mode is native
    block[35:38] = b"\0\0\0"                         # no established timings
    block[38:54] = b"\x01\x01" * 8                   # no standard timings
    dtd = bytearray(18)
    dtd[0:2] = clock.to_bytes(2, "little")
    dtd[2], dtd[3] = width & 0xFF, hblank & 0xFF
    dtd[4] = (width >> 8) << 4 | (hblank >> 8)
    dtd[5], dtd[6] = height & 0xFF, vblank & 0xFF
    dtd[7] = (height >> 8) << 4 | (vblank >> 8)
    hfp, hsync, vfp, vsync = hblank // 4, hblank // 4, 3, 5
    dtd[8], dtd[9] = hfp & 0xFF, hsync & 0xFF
    dtd[10] = (vfp & 0xF) << 4 | (vsync & 0xF)
    dtd[11] = (hfp >> 8) << 6 | (hsync >> 8) << 4
    dtd[12], dtd[13] = block[21] * 10 & 0xFF, block[22] * 10 & 0xFF   # mm
    dtd[14] = ((block[21] * 10) >> 8) << 4 | ((block[22] * 10) >> 8)
    dtd[17] = 0x1E                                   # digital separate sync, +h +v
    block[54:72] = dtd
    name = b"\0\0\0\xfc\0" + b"kemu\n".ljust(13, b" ")
    block[72:90] = name
    block[90:108] = b"\0\0\0\x10\0" + bytes(13)      # dummy descriptors
    block[108:126] = b"\0\0\0\x10\0" + bytes(13)
    block[127] = -sum(block[:127]) & 0xFF
    return bytes(block)


class VirtioGpu(VirtioDevice):
    """A one-scanout 2D virtio-gpu drawing into ``surface``."""

    device_id = VIRTIO_ID_GPU

    def __init__(self, surface: DisplaySurface, *, xres: int = 1280, yres: int = 800,
                 max_hostmem: int = DEFAULT_MAX_HOSTMEM, edid: bool = True,
                 executor: Executor | None = None, name: str = "virtio-gpu") -> None:
        self.name = name
        super().__init__([DEFAULT_QUEUE_SIZE, CURSOR_QUEUE_SIZE], executor)
        if not (1 <= xres <= MAX_DIMENSION and 1 <= yres <= MAX_DIMENSION):
            raise ValueError(f"{name}: xres/yres {xres}x{yres} out of range 1..{MAX_DIMENSION}")
        self.surface = surface
        self.xres, self.yres = xres, yres
        self.max_hostmem = max_hostmem
        self.edid_enabled = edid
        self.num_scanouts = 1
        self.events_read = 0
        self.resources: dict[int, Resource] = {}
        self.hostmem = 0
        self.scanouts = [Scanout() for _ in range(self.num_scanouts)]
        self.cursor = (0, 0, 0)        # resource, x, y (not drawn: clients draw their own)
        surface.on_size_request = self.request_size

    # -- feature bits and configuration space (5.7.3, 5.7.4) ------------------------------
    def device_features(self) -> int:
        return (1 << VIRTIO_GPU_F_EDID) if self.edid_enabled else 0

    def config_space(self) -> bytes:
        return struct.pack("<IIII", self.events_read, 0, self.num_scanouts, 0)

    def config_write(self, offset: int, data: bytes) -> None:
        """``events_clear`` (offset 4): write-1-to-clear bits of ``events_read``."""
        for i, byte in enumerate(data, offset):
            if 4 <= i < 8:
                self.events_read &= ~(byte << 8 * (i - 4))

    def request_size(self, width: int, height: int) -> None:
        """The display side wants ``width`` x ``height``: tell the driver (5.7.4)."""
        width = max(1, min(width, MAX_DIMENSION))
        height = max(1, min(height, MAX_DIMENSION))
        self.xres, self.yres = width, height
        self.events_read |= VIRTIO_GPU_EVENT_DISPLAY
        self.config_changed()

    # -- queues ---------------------------------------------------------------------------
    def queue_notify(self, index: int, queue: Virtqueue) -> None:
        session = self.session
        if session is None:
            return
        used = False
        while (chain := queue.pop()) is not None:
            if index == CONTROLQ:
                written = self._control(session, chain)
            else:
                self._cursor(session, chain)
                written = 0
            queue.push(chain, written)
            used = True
        if used:
            session.signal_used(index)

    def _control(self, session: VirtioSession, chain: DescriptorChain) -> int:
        memory = session.memory
        raw = chain.read(memory, 0, CTRL_HDR.size)
        if len(raw) < CTRL_HDR.size:
            log.debug("%s: request shorter than its header", self.name)
            return self._respond(session, chain, (0, 0, 0, 0, 0), RESP_ERR_UNSPEC)
        hdr = CTRL_HDR.unpack(raw)
        try:
            code, payload = self._dispatch(session, chain, hdr[0])
        except GpuError as exc:
            log.debug("%s: command %#x refused: %s", self.name, hdr[0], exc)
            code, payload = exc.code, b""
        return self._respond(session, chain, hdr, code, payload)

    def _respond(self, session: VirtioSession, chain: DescriptorChain, hdr: tuple, code: int,
                 payload: bytes = b"") -> int:
        _type, flags, fence_id, ctx_id, ring_idx = hdr
        reply = CTRL_HDR.pack(code, flags & VIRTIO_GPU_FLAG_FENCE, fence_id, ctx_id,
                              ring_idx if flags & VIRTIO_GPU_FLAG_FENCE else 0) + payload
        if chain.writable_len < CTRL_HDR.size:
            log.debug("%s: no room for a response", self.name)
            return 0
        return chain.write(session.memory, 0, reply[:chain.writable_len])

    @staticmethod
    def _args(session: VirtioSession, chain: DescriptorChain, fmt: struct.Struct) -> tuple:
        raw = chain.read(session.memory, CTRL_HDR.size, fmt.size)
        if len(raw) < fmt.size:
            raise GpuError(RESP_ERR_UNSPEC, f"request of {CTRL_HDR.size + len(raw)} bytes is short")
        return fmt.unpack(raw)

    def _dispatch(self, session: VirtioSession, chain: DescriptorChain,
                  cmd: int) -> tuple[int, bytes]:
        if cmd == CMD_GET_DISPLAY_INFO:
            return RESP_OK_DISPLAY_INFO, self._display_info()
        if cmd == CMD_GET_EDID:
            (scanout,) = self._args(session, chain, GET_EDID)
            if scanout >= self.num_scanouts:
                raise GpuError(RESP_ERR_INVALID_SCANOUT_ID, f"scanout {scanout}")
            block = edid(self.xres, self.yres)
            return RESP_OK_EDID, struct.pack("<I4x", len(block)) + block.ljust(1024, b"\0")
        if cmd == CMD_RESOURCE_CREATE_2D:
            self._create_2d(*self._args(session, chain, RESOURCE_CREATE_2D))
        elif cmd == CMD_RESOURCE_UNREF:
            self._unref(*self._args(session, chain, RESOURCE_ID))
        elif cmd == CMD_SET_SCANOUT:
            x, y, w, h, scanout, rid = self._args(session, chain, SET_SCANOUT)
            self._set_scanout(scanout, rid, x, y, w, h)
        elif cmd == CMD_RESOURCE_FLUSH:
            x, y, w, h, rid = self._args(session, chain, RESOURCE_FLUSH)
            self._flush(rid, x, y, w, h)
        elif cmd == CMD_TRANSFER_TO_HOST_2D:
            x, y, w, h, offset, rid = self._args(session, chain, TRANSFER_TO_HOST_2D)
            self._transfer(session, rid, x, y, w, h, offset)
        elif cmd == CMD_RESOURCE_ATTACH_BACKING:
            rid, n = self._args(session, chain, ATTACH_BACKING)
            self._attach_backing(session, chain, rid, n)
        elif cmd == CMD_RESOURCE_DETACH_BACKING:
            (rid,) = self._args(session, chain, RESOURCE_ID)
            res = self._resource(rid)
            self.hostmem -= BACKING_ENTRY_COST * len(res.backing)
            res.backing = []
        else:
            # capsets (no virgl: num_capsets is 0), 3D and blob commands.
            raise GpuError(RESP_ERR_UNSPEC, f"unsupported command {cmd:#x}")
        return RESP_OK_NODATA, b""

    # -- commands -------------------------------------------------------------------------
    def _display_info(self) -> bytes:
        modes = [DISPLAY_ONE.pack(0, 0, self.xres, self.yres, 1, 0)]
        modes += [bytes(DISPLAY_ONE.size)] * (VIRTIO_GPU_MAX_SCANOUTS - 1)
        return b"".join(modes)

    def _resource(self, rid: int) -> Resource:
        res = self.resources.get(rid)
        if res is None:
            raise GpuError(RESP_ERR_INVALID_RESOURCE_ID, f"no resource {rid}")
        return res

    def _create_2d(self, rid: int, fmt: int, width: int, height: int) -> None:
        if rid == 0 or rid in self.resources:
            raise GpuError(RESP_ERR_INVALID_RESOURCE_ID, f"resource id {rid} is 0 or in use")
        if fmt not in FORMAT_BGR_OFFSETS:
            raise GpuError(RESP_ERR_INVALID_PARAMETER, f"format {fmt}")
        if not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION):
            raise GpuError(RESP_ERR_INVALID_PARAMETER, f"size {width}x{height}")
        size = width * height * BPP
        if self.hostmem + size + RESOURCE_COST > self.max_hostmem:
            raise GpuError(RESP_ERR_OUT_OF_MEMORY,
                           f"{size} bytes over the {self.max_hostmem}-byte bound")
        self.resources[rid] = Resource(rid, fmt, width, height, bytearray(size))
        self.hostmem += size + RESOURCE_COST

    def _unref(self, rid: int) -> None:
        res = self._resource(rid)
        for scanout in self.scanouts:
            if scanout.resource_id == rid:
                scanout.resource_id = 0
        del self.resources[rid]
        self.hostmem -= res.host_cost

    @staticmethod
    def _check_rect(res: Resource, x: int, y: int, w: int, h: int) -> None:
        if w == 0 or h == 0 or x + w > res.width or y + h > res.height:
            raise GpuError(RESP_ERR_INVALID_PARAMETER,
                           f"rectangle {w}x{h}+{x}+{y} outside resource {res.id} "
                           f"({res.width}x{res.height})")

    def _set_scanout(self, scanout_id: int, rid: int, x: int, y: int, w: int, h: int) -> None:
        if scanout_id >= self.num_scanouts:
            raise GpuError(RESP_ERR_INVALID_SCANOUT_ID, f"scanout {scanout_id}")
        scanout = self.scanouts[scanout_id]
        if rid == 0:                   # disable the scanout
            scanout.resource_id = 0
            return
        res = self._resource(rid)
        self._check_rect(res, x, y, w, h)
        scanout.resource_id, scanout.x, scanout.y = rid, x, y
        scanout.width, scanout.height = w, h
        self.surface.resize(w, h)
        self._show(res, scanout, x, y, w, h)

    def _flush(self, rid: int, x: int, y: int, w: int, h: int) -> None:
        res = self._resource(rid)
        self._check_rect(res, x, y, w, h)
        for scanout in self.scanouts:
            if scanout.resource_id == rid:
                self._show(res, scanout, x, y, w, h)

    def _show(self, res: Resource, scanout: Scanout, x: int, y: int, w: int, h: int) -> None:
        """Copy the part of ``(x, y, w, h)`` (resource coordinates) inside the scanout."""
        x0, y0 = max(x, scanout.x), max(y, scanout.y)
        x1 = min(x + w, scanout.x + scanout.width)
        y1 = min(y + h, scanout.y + scanout.height)
        if x1 <= x0 or y1 <= y0:
            return
        surface = self.surface
        if (surface.width, surface.height) != (scanout.width, scanout.height):
            surface.resize(scanout.width, scanout.height)
        stride, data = res.stride, res.data
        span = (x1 - x0) * BPP
        convert = _converter(res.format)
        rows = (convert(data[r * stride + x0 * BPP:r * stride + x0 * BPP + span])
                for r in range(y0, y1))
        surface.update(x0 - scanout.x, y0 - scanout.y, x1 - x0, y1 - y0, rows)

    def _transfer(self, session: VirtioSession, rid: int, x: int, y: int, w: int, h: int,
                  offset: int) -> None:
        """Copy rows of the backing (from ``offset``, the resource's stride apart) in."""
        res = self._resource(rid)
        self._check_rect(res, x, y, w, h)
        if not res.backing:
            raise GpuError(RESP_ERR_UNSPEC, f"resource {rid} has no backing")
        stride, span = res.stride, w * BPP
        end = offset + stride * (h - 1) + span
        if end > res.backing_len:
            raise GpuError(RESP_ERR_INVALID_PARAMETER,
                           f"transfer to {end} beyond the {res.backing_len}-byte backing")
        data, memory = res.data, session.memory
        try:
            if x == 0 and w == res.width:     # whole rows: one contiguous run
                dst = y * stride
                self._gather(memory, res.backing, offset, data, dst, stride * h)
                return
            for row in range(h):
                dst = (y + row) * stride + x * BPP
                self._gather(memory, res.backing, offset + row * stride, data, dst, span)
        except MemoryAccessError as exc:     # checked at attach; RAM does not move
            raise GpuError(RESP_ERR_UNSPEC, str(exc)) from None

    @staticmethod
    def _gather(memory, backing: list[tuple[int, int]], offset: int, out: bytearray,
                dst: int, size: int) -> None:
        for addr, length in backing:
            if size <= 0:
                return
            if offset >= length:
                offset -= length
                continue
            take = min(length - offset, size)
            out[dst:dst + take] = memory.view(addr + offset, take)
            dst += take
            size -= take
            offset = 0

    def _attach_backing(self, session: VirtioSession, chain: DescriptorChain, rid: int,
                        n: int) -> None:
        res = self._resource(rid)
        if res.backing:
            raise GpuError(RESP_ERR_UNSPEC, f"resource {rid} already has a backing")
        if not 1 <= n <= MAX_BACKING_ENTRIES:
            raise GpuError(RESP_ERR_INVALID_PARAMETER, f"{n} backing entries")
        if self.hostmem + BACKING_ENTRY_COST * n > self.max_hostmem:
            raise GpuError(RESP_ERR_OUT_OF_MEMORY, f"{n} backing entries over max_hostmem")
        start = CTRL_HDR.size + ATTACH_BACKING.size
        raw = chain.read(session.memory, start, n * MEM_ENTRY.size)
        if len(raw) < n * MEM_ENTRY.size:
            raise GpuError(RESP_ERR_UNSPEC, f"{n} backing entries announced, fewer sent")
        entries, total = [], 0
        for i in range(n):
            addr, length = MEM_ENTRY.unpack_from(raw, i * MEM_ENTRY.size)
            if not session.memory.contains(addr, length):
                raise GpuError(RESP_ERR_INVALID_PARAMETER,
                               f"backing entry {addr:#x}+{length:#x} outside guest RAM")
            total += length
            if total > self.max_hostmem:
                raise GpuError(RESP_ERR_INVALID_PARAMETER, "backing larger than max_hostmem")
            entries.append((addr, length))
        res.backing = entries
        self.hostmem += BACKING_ENTRY_COST * n

    def _cursor(self, session: VirtioSession, chain: DescriptorChain) -> None:
        raw = chain.read(session.memory, 0, CTRL_HDR.size + CURSOR.size)
        if len(raw) < CTRL_HDR.size + CURSOR.size:
            return
        cmd = CTRL_HDR.unpack_from(raw)[0]
        scanout, x, y, _pad, rid, _hot_x, _hot_y = CURSOR.unpack_from(raw, CTRL_HDR.size)
        if scanout >= self.num_scanouts:
            return
        if cmd == CMD_UPDATE_CURSOR:
            self.cursor = (rid if rid in self.resources else 0, x, y)
        elif cmd == CMD_MOVE_CURSOR:
            self.cursor = (self.cursor[0], x, y)

    # -- snapshots ------------------------------------------------------------------------
    def save(self) -> VirtioGpuState:
        return VirtioGpuState(
            1, self.xres, self.yres, self.events_read,
            [(r.id, r.format, r.width, r.height, bytes(r.data), list(r.backing))
             for r in self.resources.values()],
            [(sc.resource_id, sc.x, sc.y, sc.width, sc.height) for sc in self.scanouts],
            self.cursor)

    def restore(self, state: VirtioGpuState) -> None:
        """Load ``state`` (checked as a guest request would be) and redraw the surface."""
        if state.version != 1 or len(state.scanouts) != self.num_scanouts:
            raise ValueError(f"{self.name}: incompatible virtio-gpu state")
        self._clear()
        self.xres, self.yres, self.events_read = state.xres, state.yres, state.events_read
        try:
            for rid, fmt, width, height, pixels, backing in state.resources:
                self._create_2d(rid, fmt, width, height)
                res = self.resources[rid]
                if len(pixels) != len(res.data):
                    raise GpuError(RESP_ERR_INVALID_PARAMETER, f"resource {rid}: pixel data")
                res.data[:] = pixels
                res.backing = [(int(a), int(n)) for a, n in backing]
                self.hostmem += BACKING_ENTRY_COST * len(res.backing)
            for scanout_id, (rid, x, y, w, h) in enumerate(state.scanouts):
                if rid:
                    self._set_scanout(scanout_id, rid, x, y, w, h)
        except GpuError as exc:
            self._clear()
            raise ValueError(f"{self.name}: bad virtio-gpu state: {exc}") from None
        self.cursor = tuple(state.cursor)

    # -- lifecycle ------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._clear()

    def _clear(self) -> None:
        self.resources.clear()
        self.hostmem = 0
        self.scanouts = [Scanout() for _ in range(self.num_scanouts)]
        self.events_read = 0
        self.cursor = (0, 0, 0)


def _identity(row):
    return row


def _converter(fmt: int):
    """A function turning a row of ``fmt`` pixels into XRGB8888 (B, G, R, X bytes)."""
    b, g, r = FORMAT_BGR_OFFSETS[fmt]
    if (b, g, r) == (0, 1, 2):
        return _identity

    def convert(row):
        out = bytearray(len(row))
        out[0::4] = row[b::4]
        out[1::4] = row[g::4]
        out[2::4] = row[r::4]
        return out
    return convert

