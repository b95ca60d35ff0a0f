"""virtio-gpu 2D (VIRTIO 1.2 section 5.7) through virtio-mmio, driven as a guest driver would."""

import struct

import pytest
from virtio_driver import RAM_BASE, VirtioMmioDriver, make_memory

from kemu.devices.base import IrqLine
from kemu.devices.virtio import mmio as r
from kemu.devices.virtio import gpu as g
from kemu.devices.virtio.mmio import VirtioMmioTransport
from kemu.display.surface import DisplaySurface

RAM = 4 << 20


class Gpu:
    """A guest-side virtio-gpu driver: one request per chain, response read back."""

    def __init__(self, max_hostmem=g.DEFAULT_MAX_HOSTMEM, xres=64, yres=48):
        self.mem = make_memory(RAM)
        self.surface = DisplaySurface(8, 8)
        self.dev = g.VirtioGpu(self.surface, xres=xres, yres=yres, max_hostmem=max_hostmem)
        self.irq = IrqLine()
        self.t = VirtioMmioTransport(self.dev, self.mem, self.irq)
        self.drv = VirtioMmioDriver(self.t, self.mem)
        self.ctrl, self.cursorq = self.drv.init(2)

    def request(self, cmd, body=b"", flags=0, fence=0, resp_len=24 + 1032, queue=None):
        q = queue or self.ctrl
        req = self.drv.buffer(g.CTRL_HDR.pack(cmd, flags, fence, 0, 0) + body)
        resp = self.drv.buffer(resp_len, writable=True)
        q.add([req, resp])
        used = q.get_used()
        assert len(used) == 1
        data = self.mem.read(resp.addr, used[0][1])
        return data

    def code(self, cmd, body=b""):
        data = self.request(cmd, body)
        return g.CTRL_HDR.unpack_from(data)[0]

    def create(self, rid, w, h, fmt=g.FORMAT_B8G8R8X8_UNORM):
        return self.code(g.CMD_RESOURCE_CREATE_2D, g.RESOURCE_CREATE_2D.pack(rid, fmt, w, h))

    def attach(self, rid, entries):
        body = g.ATTACH_BACKING.pack(rid, len(entries)) + b"".join(
            g.MEM_ENTRY.pack(a, n) for a, n in entries)
        return self.code(g.CMD_RESOURCE_ATTACH_BACKING, body)

    def transfer(self, rid, x, y, w, h, offset=0):
        return self.code(g.CMD_TRANSFER_TO_HOST_2D, g.TRANSFER_TO_HOST_2D.pack(x, y, w, h, offset, rid))

    def scanout(self, rid, x, y, w, h, scanout=0):
        return self.code(g.CMD_SET_SCANOUT, g.SET_SCANOUT.pack(x, y, w, h, scanout, rid))

    def flush(self, rid, x, y, w, h):
        return self.code(g.CMD_RESOURCE_FLUSH, g.RESOURCE_FLUSH.pack(x, y, w, h, rid))


def pixel(surface, x, y):
    off = (y * surface.width + x) * 4
    return bytes(surface.data[off:off + 4])


def test_identity_config_and_display_info():
    gpu = Gpu()
    assert gpu.drv.r32(r.DEVICE_ID) == 16
    assert gpu.drv.device_features() >> g.VIRTIO_GPU_F_EDID & 1
    assert gpu.drv.config(8, 4) == 1          # num_scanouts
    assert gpu.drv.config(12, 4) == 0         # num_capsets
    data = gpu.request(g.CMD_GET_DISPLAY_INFO)
    assert g.CTRL_HDR.unpack_from(data)[0] == g.RESP_OK_DISPLAY_INFO
    assert len(data) == 24 + 16 * 24
    assert g.DISPLAY_ONE.unpack_from(data, 24) == (0, 0, 64, 48, 1, 0)
    assert g.DISPLAY_ONE.unpack_from(data, 48)[4] == 0     # scanout 1 disabled


def test_edid_block_is_valid_and_names_the_mode():
    gpu = Gpu(xres=1024, yres=768)
    data = gpu.request(g.CMD_GET_EDID, g.GET_EDID.pack(0))
    code, = struct.unpack_from("<I", data)
    assert code == g.RESP_OK_EDID
    size, = struct.unpack_from("<I", data, 24)
    block = data[32:32 + size]
    assert size == 128 and block[:8] == b"\x00\xff\xff\xff\xff\xff\xff\x00"
    assert sum(block) % 256 == 0
    dtd = block[54:72]
    assert dtd[2] | (dtd[4] >> 4) << 8 == 1024 and dtd[5] | (dtd[7] >> 4) << 8 == 768
    assert gpu.code(g.CMD_GET_EDID, g.GET_EDID.pack(1)) == g.RESP_ERR_INVALID_SCANOUT_ID


def test_draw_transfer_scanout_flush_reaches_the_surface():
    gpu = Gpu()
    w, h = 16, 8
    fb = gpu.drv.alloc.alloc(w * h * 4, 4096)
    # The guest draws: pixel (x, y) = B=x, G=y, R=0x80.
    gpu.mem.write(fb, b"".join(bytes([x, y, 0x80, 0]) for y in range(h) for x in range(w)))
    assert gpu.create(1, w, h) == g.RESP_OK_NODATA
    # backing in two pieces (a page boundary need not be a row boundary)
    assert gpu.attach(1, [(fb, 100), (fb + 100, w * h * 4 - 100)]) == g.RESP_OK_NODATA
    assert gpu.transfer(1, 0, 0, w, h) == g.RESP_OK_NODATA
    tracker = gpu.surface.subscribe()
    tracker.take()
    assert gpu.scanout(1, 0, 0, w, h) == g.RESP_OK_NODATA
    assert (gpu.surface.width, gpu.surface.height) == (w, h)
    assert pixel(gpu.surface, 5, 3)[:3] == bytes([5, 3, 0x80])
    resized, _ = tracker.take()
    assert resized
    # A partial update: only the flushed rectangle is dirty.
    gpu.mem.write(fb + (2 * w + 3) * 4, b"\x11\x22\x33\x00")
    assert gpu.transfer(1, 3, 2, 1, 1, offset=(2 * w + 3) * 4) == g.RESP_OK_NODATA
    assert pixel(gpu.surface, 3, 2)[:3] == bytes([3, 2, 0x80])     # not flushed yet
    assert gpu.flush(1, 3, 2, 1, 1) == g.RESP_OK_NODATA
    assert pixel(gpu.surface, 3, 2)[:3] == b"\x11\x22\x33"
    assert tracker.take() == (False, [g_rect(3, 2, 1, 1)])
    assert gpu.mem.violations == []


def g_rect(x, y, w, h):
    from kemu.display.surface import Rect
    return Rect(x, y, w, h)


def test_formats_are_converted_to_xrgb():
    gpu = Gpu()
    fb = gpu.drv.alloc.alloc(4 * 4, 4096)
    gpu.mem.write(fb, bytes([0x10, 0x20, 0x30, 0xFF]) * 4)      # R, G, B, A in memory
    assert gpu.create(2, 2, 2, g.FORMAT_R8G8B8A8_UNORM) == g.RESP_OK_NODATA
    assert gpu.attach(2, [(fb, 16)]) == g.RESP_OK_NODATA
    assert gpu.transfer(2, 0, 0, 2, 2) == g.RESP_OK_NODATA
    assert gpu.scanout(2, 0, 0, 2, 2) == g.RESP_OK_NODATA
    assert pixel(gpu.surface, 1, 1)[:3] == bytes([0x30, 0x20, 0x10])   # B, G, R


def test_fence_is_echoed():
    gpu = Gpu()
    data = gpu.request(g.CMD_GET_DISPLAY_INFO, flags=g.VIRTIO_GPU_FLAG_FENCE, fence=0x1234)
    _t, flags, fence, _ctx, _ring = g.CTRL_HDR.unpack_from(data)
    assert flags & g.VIRTIO_GPU_FLAG_FENCE and fence == 0x1234


def test_unref_detach_and_unknown_ids():
    gpu = Gpu()
    fb = gpu.drv.alloc.alloc(64, 64)
    assert gpu.create(3, 4, 4) == g.RESP_OK_NODATA
    assert gpu.create(3, 4, 4) == g.RESP_ERR_INVALID_RESOURCE_ID        # in use
    assert gpu.create(0, 4, 4) == g.RESP_ERR_INVALID_RESOURCE_ID        # 0 is no resource
    assert gpu.attach(3, [(fb, 64)]) == g.RESP_OK_NODATA
    assert gpu.attach(3, [(fb, 64)]) == g.RESP_ERR_UNSPEC               # already attached
    assert gpu.code(g.CMD_RESOURCE_DETACH_BACKING, g.RESOURCE_ID.pack(3)) == g.RESP_OK_NODATA
    assert gpu.transfer(3, 0, 0, 4, 4) == g.RESP_ERR_UNSPEC             # no backing now
    assert gpu.scanout(3, 0, 0, 4, 4) == g.RESP_OK_NODATA
    assert gpu.code(g.CMD_RESOURCE_UNREF, g.RESOURCE_ID.pack(3)) == g.RESP_OK_NODATA
    assert gpu.dev.scanouts[0].resource_id == 0 and gpu.dev.hostmem == 0
    for cmd, body in ((g.CMD_RESOURCE_UNREF, g.RESOURCE_ID.pack(3)),
                      (g.CMD_RESOURCE_FLUSH, g.RESOURCE_FLUSH.pack(0, 0, 1, 1, 9)),
                      (g.CMD_SET_SCANOUT, g.SET_SCANOUT.pack(0, 0, 1, 1, 0, 9))):
        assert gpu.code(cmd, body) == g.RESP_ERR_INVALID_RESOURCE_ID
    assert gpu.code(g.CMD_SET_SCANOUT, g.SET_SCANOUT.pack(0, 0, 1, 1, 5, 0)) == \
        g.RESP_ERR_INVALID_SCANOUT_ID
    assert gpu.code(0x0200) == g.RESP_ERR_UNSPEC                         # 3D: not offered


def test_hostile_sizes_are_refused_without_allocating():
    gpu = Gpu(max_hostmem=(1 << 20) + g.RESOURCE_COST)
    assert gpu.create(1, 65536, 65536) == g.RESP_ERR_INVALID_PARAMETER
    assert gpu.create(1, 0, 10) == g.RESP_ERR_INVALID_PARAMETER
    assert gpu.create(1, 10, 10, fmt=999) == g.RESP_ERR_INVALID_PARAMETER
    assert gpu.create(1, 16384, 16384) == g.RESP_ERR_OUT_OF_MEMORY       # 1 GiB > bound
    assert gpu.create(1, 512, 512) == g.RESP_OK_NODATA                   # exactly the bound
    assert gpu.create(2, 1, 1) == g.RESP_ERR_OUT_OF_MEMORY               # bound reached
    assert gpu.dev.hostmem == gpu.dev.max_hostmem and len(gpu.dev.resources) == 1


def test_many_small_resources_and_entries_are_bounded_too():
    gpu = Gpu(max_hostmem=64 * g.RESOURCE_COST)
    codes = [gpu.create(rid, 1, 1) for rid in range(1, 80)]
    assert codes.count(g.RESP_OK_NODATA) < 64 and codes[-1] == g.RESP_ERR_OUT_OF_MEMORY
    # backing entries are charged as well, and given back on detach and unref
    gpu = Gpu(max_hostmem=g.RESOURCE_COST + 4 + 8 * g.BACKING_ENTRY_COST)
    fb = gpu.drv.alloc.alloc(64, 64)
    assert gpu.create(1, 1, 1) == g.RESP_OK_NODATA
    assert gpu.attach(1, [(fb, 1)] * 9) == g.RESP_ERR_OUT_OF_MEMORY
    assert gpu.attach(1, [(fb, 1)] * 8) == g.RESP_OK_NODATA
    assert gpu.code(g.CMD_RESOURCE_DETACH_BACKING, g.RESOURCE_ID.pack(1)) == g.RESP_OK_NODATA
    assert gpu.attach(1, [(fb, 4)] * 8) == g.RESP_OK_NODATA
    assert gpu.code(g.CMD_RESOURCE_UNREF, g.RESOURCE_ID.pack(1)) == g.RESP_OK_NODATA
    assert gpu.dev.hostmem == 0


def test_hostile_rectangles_offsets_and_backing():
    gpu = Gpu()
    fb = gpu.drv.alloc.alloc(16 * 16 * 4, 64)
    assert gpu.create(1, 16, 16) == g.RESP_OK_NODATA
    # backing outside RAM, straddling its end, wrapping around 2**64, too many entries
    for entries in ([(RAM_BASE + RAM, 4096)], [(RAM_BASE + RAM - 16, 4096)],
                    [(2**64 - 8, 4096)], [(0, 4096)]):
        assert gpu.attach(1, entries) == g.RESP_ERR_INVALID_PARAMETER, entries
    body = g.ATTACH_BACKING.pack(1, 0xFFFFFFFF)
    assert gpu.code(g.CMD_RESOURCE_ATTACH_BACKING, body) == g.RESP_ERR_INVALID_PARAMETER
    body = g.ATTACH_BACKING.pack(1, 100) + g.MEM_ENTRY.pack(fb, 64)      # fewer than announced
    assert gpu.code(g.CMD_RESOURCE_ATTACH_BACKING, body) == g.RESP_ERR_UNSPEC
    assert gpu.attach(1, [(fb, 16 * 16 * 4)]) == g.RESP_OK_NODATA
    for x, y, w, h in ((0xFFFFFFFF, 0, 2, 1), (0, 0, 17, 1), (0, 15, 1, 2), (0, 0, 0, 0),
                       (8, 8, 0xFFFFFFF8, 0xFFFFFFF8)):
        assert gpu.transfer(1, x, y, w, h) == g.RESP_ERR_INVALID_PARAMETER
        assert gpu.flush(1, x, y, w, h) == g.RESP_ERR_INVALID_PARAMETER
        assert gpu.scanout(1, x, y, w, h) == g.RESP_ERR_INVALID_PARAMETER
    # offsets that run past the backing, or overflow a 64-bit sum
    assert gpu.transfer(1, 0, 0, 16, 16, offset=4) == g.RESP_ERR_INVALID_PARAMETER
    assert gpu.transfer(1, 0, 0, 1, 1, offset=2**64 - 4) == g.RESP_ERR_INVALID_PARAMETER
    assert gpu.transfer(1, 0, 15, 16, 1, offset=15 * 64) == g.RESP_OK_NODATA
    assert gpu.mem.violations == []


def test_short_requests_and_responses():
    gpu = Gpu()
    # a header cut short: ERR_UNSPEC, not a device error
    req = gpu.drv.buffer(b"\x00\x01\x00\x00")
    resp = gpu.drv.buffer(24, writable=True)
    gpu.ctrl.add([req, resp])
    (_head, n), = gpu.ctrl.get_used()
    assert n == 24 and g.CTRL_HDR.unpack_from(gpu.mem.read(resp.addr, 24))[0] == g.RESP_ERR_UNSPEC
    # arguments cut short
    assert gpu.code(g.CMD_RESOURCE_CREATE_2D, b"\x01\x00") == g.RESP_ERR_UNSPEC
    # no room for the response: returned with nothing written
    data = gpu.request(g.CMD_GET_DISPLAY_INFO, resp_len=8)
    assert data == b""
    # a display-info response cut to what the driver left room for
    data = gpu.request(g.CMD_GET_DISPLAY_INFO, resp_len=30)
    assert len(data) == 30
    assert gpu.drv.status & 64 == 0          # never DEVICE_NEEDS_RESET


def test_cursor_queue_returns_buffers():
    gpu = Gpu()
    body = g.CURSOR.pack(0, 10, 20, 0, 0, 0, 0)
    req = gpu.drv.buffer(g.CTRL_HDR.pack(g.CMD_MOVE_CURSOR, 0, 0, 0, 0) + body)
    gpu.cursorq.add([req])
    assert gpu.cursorq.get_used() == [(0, 0)]
    assert gpu.dev.cursor[1:] == (10, 20)
    short = gpu.drv.buffer(b"\x01\x03")
    gpu.cursorq.add([short])
    assert len(gpu.cursorq.get_used()) == 1


def test_display_side_resize_raises_config_event():
    gpu = Gpu()
    gpu.drv.ack()
    assert gpu.surface.request_size(800, 600)
    assert gpu.drv.interrupt_status() & r.VIRTIO_MMIO_INT_CONFIG
    assert gpu.drv.config(0, 4) == g.VIRTIO_GPU_EVENT_DISPLAY
    data = gpu.request(g.CMD_GET_DISPLAY_INFO)
    assert g.DISPLAY_ONE.unpack_from(data, 24)[2:4] == (800, 600)
    gpu.t.write(r.CONFIG + 4, 4, g.VIRTIO_GPU_EVENT_DISPLAY)          # events_clear
    assert gpu.drv.config(0, 4) == 0


def test_reset_frees_resources():
    gpu = Gpu()
    assert gpu.create(1, 8, 8) == g.RESP_OK_NODATA
    gpu.drv.w32(r.STATUS, 0)
    assert gpu.dev.resources == {} and gpu.dev.hostmem == 0


@pytest.mark.parametrize("bad", [(0, 10), (10, 0), (20000, 10)])
def test_bad_xres_yres(bad):
    with pytest.raises(ValueError):
        g.VirtioGpu(DisplaySurface(), xres=bad[0], yres=bad[1])


def test_save_and_restore_redraw_the_same_screen():
    gpu = Gpu()
    fb = gpu.drv.alloc.alloc(8 * 4 * 4, 64)
    gpu.mem.write(fb, bytes(range(128)))
    assert gpu.create(7, 8, 4) == g.RESP_OK_NODATA
    assert gpu.attach(7, [(fb, 128)]) == g.RESP_OK_NODATA
    assert gpu.transfer(7, 0, 0, 8, 4) == g.RESP_OK_NODATA
    assert gpu.scanout(7, 0, 0, 8, 4) == g.RESP_OK_NODATA
    state = gpu.dev.save()
    screen = gpu.surface.snapshot()
    other = Gpu()
    other.dev.restore(state)
    assert other.surface.snapshot() == screen
    assert other.dev.hostmem == gpu.dev.hostmem
    assert other.flush(7, 0, 0, 8, 4) == g.RESP_OK_NODATA        # the resource is live
    bad = g.VirtioGpuState(1, 64, 48, 0, [(1, 999, 4, 4, b"", [])], [(0, 0, 0, 0, 0)])
    with pytest.raises(ValueError):
        other.dev.restore(bad)
    assert other.dev.resources == {}


# -- any request a guest can write ---------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

COMMANDS = [g.CMD_GET_DISPLAY_INFO, g.CMD_RESOURCE_CREATE_2D, g.CMD_RESOURCE_UNREF,
            g.CMD_SET_SCANOUT, g.CMD_RESOURCE_FLUSH, g.CMD_TRANSFER_TO_HOST_2D,
            g.CMD_RESOURCE_ATTACH_BACKING, g.CMD_RESOURCE_DETACH_BACKING, g.CMD_GET_EDID,
            g.CMD_GET_CAPSET_INFO, 0x0200, 0xFFFFFFFF]
small = st.integers(0, 70)
field32 = st.one_of(small, st.integers(0, 2**32 - 1), st.sampled_from([2**31, 2**32 - 1]))
field64 = st.one_of(small, st.integers(0, 2**64 - 1),
                    st.integers(RAM_BASE, RAM_BASE + RAM + 64))


@st.composite
def request(draw):
    cmd = draw(st.sampled_from(COMMANDS))
    words = draw(st.lists(field32, min_size=0, max_size=8))
    body = b"".join(w.to_bytes(4, "little") for w in words)
    if cmd == g.CMD_RESOURCE_ATTACH_BACKING and draw(st.booleans()):
        entries = draw(st.lists(st.tuples(field64, field32), max_size=4))
        body = g.ATTACH_BACKING.pack(draw(small), len(entries)) + b"".join(
            g.MEM_ENTRY.pack(a, n) for a, n in entries)
    if cmd == g.CMD_TRANSFER_TO_HOST_2D and draw(st.booleans()):
        body = g.TRANSFER_TO_HOST_2D.pack(*(draw(field32) for _ in range(4)), draw(field64),
                                          draw(small))
    return cmd, body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(request(), max_size=25))
def test_random_requests_get_answers_and_stay_bounded(requests):
    gpu = Gpu(max_hostmem=1 << 20)
    valid = {g.RESP_OK_NODATA, g.RESP_OK_DISPLAY_INFO, g.RESP_OK_EDID, g.RESP_ERR_UNSPEC,
             g.RESP_ERR_OUT_OF_MEMORY, g.RESP_ERR_INVALID_SCANOUT_ID,
             g.RESP_ERR_INVALID_RESOURCE_ID, g.RESP_ERR_INVALID_PARAMETER}
    for cmd, body in requests:
        assert gpu.code(cmd, body) in valid
        assert gpu.dev.hostmem <= gpu.dev.max_hostmem
    assert gpu.drv.status & 64 == 0            # never DEVICE_NEEDS_RESET
    assert gpu.mem.violations == []            # nothing touched outside guest RAM
