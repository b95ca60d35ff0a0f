"""virtio-blk (VIRTIO 1.2 section 5.2) through virtio-mmio and the test driver."""

import os
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from virtio_driver import VirtioMmioDriver, make_memory

from kemu.devices.base import IrqLine
from kemu.devices.virtio import MAX_CHAIN_BYTES, STATUS_DEVICE_NEEDS_RESET
from kemu.devices.virtio import blk as b
from kemu.devices.virtio.blk import VirtioBlk
from kemu.devices.virtio.mmio import VirtioMmioTransport
from kemu.errors import KemuError

DISK = 64 * 1024          # 128 sectors
SECTORS = DISK // 512


class MemBackend:
    """In-memory disk; ``size``/``read_only`` as attributes."""

    def __init__(self, size=DISK, read_only=False):
        self.data = bytearray(os.urandom(size))
        self.read_only = read_only
        self.flushes = 0
        self.discards = []
        self.fail = False

    @property
    def size(self):
        return len(self.data)

    def _check(self):
        if self.fail:
            raise OSError(5, "Input/output error")

    def read(self, offset, length):
        self._check()
        return bytes(self.data[offset:offset + length])

    def write(self, offset, data):
        self._check()
        assert offset + len(data) <= len(self.data)
        self.data[offset:offset + len(data)] = data

    def flush(self):
        self._check()
        self.flushes += 1

    def discard(self, offset, length):
        self.discards.append((offset, length))

    def write_zeroes(self, offset, length):
        self.data[offset:offset + length] = bytes(length)


class FileBackend:
    """A temp-file disk with ``size()``/``read_only()`` as methods, like RawFile may have."""

    def __init__(self, path, size):
        with open(path, "wb") as f:
            f.truncate(size)
        self.fd = os.open(path, os.O_RDWR)
        self.synced = 0

    def size(self):
        return os.fstat(self.fd).st_size

    def read_only(self):
        return False

    def read(self, offset, length):
        return os.pread(self.fd, length, offset)

    def write(self, offset, data):
        os.pwrite(self.fd, data, offset)

    def flush(self):
        os.fsync(self.fd)
        self.synced += 1

    def discard(self, offset, length):
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset, length):
        os.pwrite(self.fd, bytes(length), offset)


class Deferred:
    """An executor that runs nothing until told: stands in for an I/O thread."""

    def __init__(self):
        self.pending = []

    def submit(self, work, done):
        self.pending.append((work, done))

    def run(self, order=None):
        jobs, self.pending = self.pending, []
        for i in order or range(len(jobs)):
            work, done = jobs[i]
            done(work())


def make(backend=None, mask=~0, executor=None, **kw):
    mem = make_memory(1 << 20)
    backend = MemBackend() if backend is None else backend
    dev = VirtioBlk(backend, executor=executor, **kw)
    irq = IrqLine()
    t = VirtioMmioTransport(dev, mem, irq)
    drv = VirtioMmioDriver(t, mem)
    (q,) = drv.init(mask=mask)
    return mem, backend, dev, t, drv, q


def submit(drv, q, rtype, sector=0, out=b"", in_len=0, indirect=False):
    """One request, laid out as Linux does; returns (status, data read, used len)."""
    bufs = [drv.buffer(struct.pack("<IIQ", rtype, 0, sector))]
    if out:
        bufs.append(drv.buffer(out))
    data = drv.buffer(in_len, writable=True) if in_len else None
    if data:
        bufs.append(data)
    status = drv.buffer(1, writable=True)
    drv.memory.write(status.addr, b"\xEE")
    bufs.append(status)
    head = q.add(bufs, indirect=indirect)
    used = q.get_used()
    assert [u[0] for u in used] == [head]
    got = drv.memory.read(data.addr, in_len) if data else b""
    return drv.memory.read(status.addr, 1)[0], got, used[0][1]


def test_features_and_config_space():
    _mem, _backend, dev, _t, drv, _q = make()
    f = drv.device_features()
    for bit in (b.VIRTIO_BLK_F_SIZE_MAX, b.VIRTIO_BLK_F_SEG_MAX, b.VIRTIO_BLK_F_BLK_SIZE,
                b.VIRTIO_BLK_F_FLUSH, b.VIRTIO_BLK_F_DISCARD, b.VIRTIO_BLK_F_WRITE_ZEROES):
        assert f >> bit & 1
    assert not f >> b.VIRTIO_BLK_F_RO & 1
    assert drv.r32(0x008) == 2
    assert drv.config(0, 8) == SECTORS                      # capacity
    assert drv.config(8, 4) == b.SIZE_MAX                   # size_max
    assert drv.config(12, 4) == min(256 - 2, b.SEG_MAX_LIMIT)  # seg_max
    assert drv.config(20, 4) == 512                         # blk_size
    assert drv.config(36, 4) == b.MAX_DWZ_SECTORS           # max_discard_sectors
    assert drv.config(40, 4) == 1                           # max_discard_seg
    assert drv.config(44, 4) == 1                           # discard_sector_alignment
    assert drv.config(48, 4) == b.MAX_DWZ_SECTORS           # max_write_zeroes_sectors
    assert drv.config(52, 4) == 1                           # max_write_zeroes_seg
    assert drv.config(56, 1) == 0                           # write_zeroes_may_unmap
    assert len(dev.config_space()) == 72
    # Requests the limits allow fit in one chain.
    assert dev.seg_max * b.SIZE_MAX + 16 + 1 <= MAX_CHAIN_BYTES
    assert dev.seg_max + 2 <= 256


def test_read_only_backend():
    _mem, backend, _dev, _t, drv, q = make(MemBackend(read_only=True))
    f = drv.device_features()
    assert f >> b.VIRTIO_BLK_F_RO & 1
    assert not f >> b.VIRTIO_BLK_F_DISCARD & 1 and not f >> b.VIRTIO_BLK_F_WRITE_ZEROES & 1
    before = bytes(backend.data)
    assert submit(drv, q, b.VIRTIO_BLK_T_OUT, 0, b"x" * 512)[0] == b.VIRTIO_BLK_S_IOERR
    assert bytes(backend.data) == before
    assert submit(drv, q, b.VIRTIO_BLK_T_IN, 0, in_len=512)[0] == b.VIRTIO_BLK_S_OK
    assert submit(drv, q, b.VIRTIO_BLK_T_FLUSH)[0] == b.VIRTIO_BLK_S_OK


def test_read_only_option():
    _mem, _backend, _dev, _t, drv, _q = make(read_only=True)
    assert drv.device_features() >> b.VIRTIO_BLK_F_RO & 1


@pytest.mark.parametrize("indirect", [False, True])
def test_write_then_read(indirect):
    _mem, backend, _dev, t, drv, q = make()
    payload = os.urandom(3 * 512)
    status, _, used = submit(drv, q, b.VIRTIO_BLK_T_OUT, 5, payload, indirect=indirect)
    assert status == b.VIRTIO_BLK_S_OK and used == 1
    assert backend.data[5 * 512:8 * 512] == payload
    status, got, used = submit(drv, q, b.VIRTIO_BLK_T_IN, 5, in_len=3 * 512, indirect=indirect)
    assert status == b.VIRTIO_BLK_S_OK and got == payload and used == 3 * 512 + 1
    assert not t.needs_reset


def test_any_layout_framing():
    """2.6.4: header split over descriptors, data and status sharing one."""
    mem, backend, _dev, _t, drv, q = make()
    backend.data[512:1024] = b"z" * 512
    hdr = struct.pack("<IIQ", b.VIRTIO_BLK_T_IN, 0, 1)
    h1, h2 = drv.buffer(hdr[:3]), drv.buffer(hdr[3:])
    w1 = drv.buffer(100, writable=True)
    w2 = drv.buffer(413, writable=True)      # 412 data bytes + status
    q.add([h1, h2, w1, w2])
    assert q.get_used() == [(0, 513)]
    assert mem.read(w1.addr, 100) + mem.read(w2.addr, 412) == b"z" * 512
    assert mem.read(w2.addr + 412, 1) == b"\0"


def test_whole_disk_and_last_sector():
    _mem, backend, _dev, _t, drv, q = make()
    status, got, _ = submit(drv, q, b.VIRTIO_BLK_T_IN, SECTORS - 1, in_len=512)
    assert status == b.VIRTIO_BLK_S_OK and got == backend.data[-512:]


@pytest.mark.parametrize("rtype,sector,out,in_len", [
    (b.VIRTIO_BLK_T_IN, SECTORS, b"", 512),            # starts past the end
    (b.VIRTIO_BLK_T_IN, SECTORS - 1, b"", 1024),       # runs past the end
    (b.VIRTIO_BLK_T_IN, 2**64 - 1, b"", 512),          # sector arithmetic overflow
    (b.VIRTIO_BLK_T_IN, 0, b"", 100),                  # not a multiple of 512
    (b.VIRTIO_BLK_T_OUT, SECTORS, b"x" * 512, 0),
    (b.VIRTIO_BLK_T_OUT, 2**63, b"x" * 512, 0),
    (b.VIRTIO_BLK_T_OUT, 0, b"x" * 100, 0),
])
def test_out_of_range_or_unaligned_is_ioerr(rtype, sector, out, in_len):
    _mem, backend, _dev, t, drv, q = make()
    before = bytes(backend.data)
    status, _, used = submit(drv, q, rtype, sector, out, in_len)
    assert status == b.VIRTIO_BLK_S_IOERR
    assert used == (1 if in_len == 0 else 0)
    assert bytes(backend.data) == before and not t.needs_reset


def test_flush():
    _mem, backend, _dev, _t, drv, q = make()
    assert submit(drv, q, b.VIRTIO_BLK_T_FLUSH)[0] == b.VIRTIO_BLK_S_OK
    assert backend.flushes == 1


def test_file_backend_with_method_style_size(tmp_path):
    backend = FileBackend(tmp_path / "disk.img", 8192)
    _mem, backend, _dev, _t, drv, q = make(backend)
    assert drv.config(0, 8) == 16
    assert submit(drv, q, b.VIRTIO_BLK_T_OUT, 3, b"q" * 512)[0] == b.VIRTIO_BLK_S_OK
    assert submit(drv, q, b.VIRTIO_BLK_T_FLUSH)[0] == b.VIRTIO_BLK_S_OK
    assert backend.synced == 1
    with open(tmp_path / "disk.img", "rb") as f:
        assert f.read()[3 * 512:4 * 512] == b"q" * 512


@pytest.mark.parametrize("serial,expect", [
    ("kemu-disk-0", b"kemu-disk-0" + b"\0" * 9),
    ("a" * 20, b"a" * 20),                  # exactly 20 bytes: no NUL
    ("b" * 30, b"b" * 20),                  # truncated
    ("", b"\0" * 20),
])
def test_get_id(serial, expect):
    _mem, _backend, _dev, _t, drv, q = make(serial=serial)
    status, got, used = submit(drv, q, b.VIRTIO_BLK_T_GET_ID, in_len=20)
    assert status == b.VIRTIO_BLK_S_OK and got == expect and used == 21


def test_get_id_with_short_buffer():
    _mem, _backend, _dev, _t, drv, q = make(serial="abcdefgh")
    status, got, used = submit(drv, q, b.VIRTIO_BLK_T_GET_ID, in_len=4)
    assert status == b.VIRTIO_BLK_S_OK and got == b"abcd" and used == 5


def dwz(*segments):
    return b"".join(struct.pack("<QII", *s) for s in segments)


def test_discard():
    _mem, backend, _dev, _t, drv, q = make()
    assert submit(drv, q, b.VIRTIO_BLK_T_DISCARD, out=dwz((4, 8, 0)))[0] == b.VIRTIO_BLK_S_OK
    assert backend.discards == [(4 * 512, 8 * 512)]


def test_write_zeroes():
    _mem, backend, _dev, _t, drv, q = make()
    for flags in (0, b.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP):
        backend.data[:] = b"\xff" * DISK
        status = submit(drv, q, b.VIRTIO_BLK_T_WRITE_ZEROES, out=dwz((2, 3, flags)))[0]
        assert status == b.VIRTIO_BLK_S_OK
        assert backend.data[1024:2560] == bytes(1536)
        assert backend.data[1022:1024] == b"\xff\xff" and backend.data[2560] == 0xFF


@pytest.mark.parametrize("rtype,out,expect", [
    (b.VIRTIO_BLK_T_DISCARD, dwz((0, 1, 1)), b.VIRTIO_BLK_S_UNSUPP),       # unmap on discard
    (b.VIRTIO_BLK_T_DISCARD, dwz((0, 1, 2)), b.VIRTIO_BLK_S_UNSUPP),       # unknown flag
    (b.VIRTIO_BLK_T_WRITE_ZEROES, dwz((0, 1, 4)), b.VIRTIO_BLK_S_UNSUPP),
    (b.VIRTIO_BLK_T_DISCARD, dwz((SECTORS, 1, 0)), b.VIRTIO_BLK_S_IOERR),  # out of range
    (b.VIRTIO_BLK_T_WRITE_ZEROES, dwz((2**64 - 1, 2, 0)), b.VIRTIO_BLK_S_IOERR),
    (b.VIRTIO_BLK_T_DISCARD, dwz((0, b.MAX_DWZ_SECTORS + 1, 0)), b.VIRTIO_BLK_S_IOERR),
    (b.VIRTIO_BLK_T_DISCARD, dwz((0, 1, 0), (4, 1, 0)), b.VIRTIO_BLK_S_IOERR),  # > max_discard_seg
    (b.VIRTIO_BLK_T_DISCARD, dwz((0, 1, 0))[:15], b.VIRTIO_BLK_S_IOERR),   # not 16-byte segments
    (b.VIRTIO_BLK_T_WRITE_ZEROES, b"", b.VIRTIO_BLK_S_IOERR),              # no segment
])
def test_bad_discard_write_zeroes(rtype, out, expect):
    _mem, backend, _dev, _t, drv, q = make()
    before = bytes(backend.data)
    assert submit(drv, q, rtype, out=out)[0] == expect
    assert bytes(backend.data) == before and backend.discards == []


def test_discard_not_negotiated_is_unsupp():
    _mem, _backend, _dev, _t, drv, q = make(mask=~(1 << b.VIRTIO_BLK_F_DISCARD | 1 << b.VIRTIO_BLK_F_WRITE_ZEROES))
    assert submit(drv, q, b.VIRTIO_BLK_T_DISCARD, out=dwz((0, 1, 0)))[0] == b.VIRTIO_BLK_S_UNSUPP
    assert submit(drv, q, b.VIRTIO_BLK_T_WRITE_ZEROES, out=dwz((0, 1, 0)))[0] == b.VIRTIO_BLK_S_UNSUPP


@pytest.mark.parametrize("rtype", [2, 3, 5, 10, 14, 15, 0x80000001, 0xFFFFFFFF])
def test_unknown_request_type_is_unsupp(rtype):
    _mem, _backend, _dev, _t, drv, q = make()
    assert submit(drv, q, rtype, in_len=512)[0] == b.VIRTIO_BLK_S_UNSUPP


def test_backend_failure_is_ioerr():
    _mem, backend, _dev, t, drv, q = make()
    backend.fail = True
    assert submit(drv, q, b.VIRTIO_BLK_T_IN, 0, in_len=512)[0] == b.VIRTIO_BLK_S_IOERR
    assert submit(drv, q, b.VIRTIO_BLK_T_OUT, 0, b"x" * 512)[0] == b.VIRTIO_BLK_S_IOERR
    assert submit(drv, q, b.VIRTIO_BLK_T_FLUSH)[0] == b.VIRTIO_BLK_S_IOERR
    backend.fail = False
    assert submit(drv, q, b.VIRTIO_BLK_T_FLUSH)[0] == b.VIRTIO_BLK_S_OK
    assert not t.needs_reset


def test_short_backend_read_is_ioerr():
    _mem, backend, _dev, _t, drv, q = make()
    backend.read = lambda off, n: b"short"
    assert submit(drv, q, b.VIRTIO_BLK_T_IN, 0, in_len=512)[0] == b.VIRTIO_BLK_S_IOERR


def test_request_without_header_is_a_device_error():
    mem, _backend, _dev, t, drv, q = make()
    q.add([drv.buffer(b"\0" * 15), drv.buffer(1, writable=True)])
    assert t.needs_reset and "header" in t.error
    assert mem.violations == []


def test_request_without_status_byte_is_a_device_error():
    _mem, _backend, _dev, t, drv, q = make()
    q.add([drv.buffer(struct.pack("<IIQ", b.VIRTIO_BLK_T_FLUSH, 0, 0))])
    assert t.needs_reset and "status" in t.error


def test_resize_sends_config_change():
    _mem, backend, dev, _t, drv, _q = make()
    gen = drv.r32(0x0FC)
    backend.data += bytes(DISK)
    dev.resized()
    assert drv.config(0, 8) == 2 * SECTORS
    assert drv.r32(0x0FC) == gen + 1 and drv.interrupt_status() & 2


def test_deferred_completion_out_of_order():
    ex = Deferred()
    mem, backend, _dev, _t, drv, q = make(executor=ex)
    st_bufs = []
    for sector in (1, 2, 3):
        st_buf = drv.buffer(1, writable=True)
        data = drv.buffer(512, writable=True)
        q.add([drv.buffer(struct.pack("<IIQ", b.VIRTIO_BLK_T_IN, 0, sector)), data, st_buf])
        st_bufs.append((data, st_buf))
    assert len(ex.pending) == 3 and q.get_used() == []
    ex.run(order=[2, 0, 1])
    assert [u[0] for u in q.get_used()] == [6, 0, 3]
    for sector, (data, st_buf) in zip((1, 2, 3), st_bufs):
        assert mem.read(st_buf.addr, 1) == b"\0"
        assert mem.read(data.addr, 512) == backend.data[sector * 512:(sector + 1) * 512]


def test_completion_after_reset_is_dropped():
    ex = Deferred()
    mem, _backend, _dev, t, drv, q = make(executor=ex)
    status = drv.buffer(1, writable=True)
    mem.write(status.addr, b"\xEE")
    q.add([drv.buffer(struct.pack("<IIQ", b.VIRTIO_BLK_T_FLUSH, 0, 0)), status])
    drv.w32(0x070, 0)                 # reset while the backend is busy
    ex.run()
    assert mem.read(status.addr, 1) == b"\xEE"
    assert q.used_idx() == 0 and not t.needs_reset


def test_queue_size_must_allow_a_request():
    with pytest.raises(ValueError):
        VirtioBlk(MemBackend(), queue_size=2)
    with pytest.raises(ValueError):
        VirtioBlk(MemBackend(), blk_size=1000)


# -- property: random requests, well-formed or not ----------------------------------------

requests = st.fixed_dictionaries({
    "type": st.one_of(st.sampled_from([0, 1, 4, 8, 11, 13]), st.integers(0, 2**32 - 1)),
    "sector": st.one_of(st.integers(0, SECTORS + 2), st.integers(0, 2**64 - 1)),
    "header_len": st.one_of(st.just(16), st.integers(0, 24)),
    "out": st.one_of(st.just(b""), st.binary(max_size=1100),
                     st.builds(dwz, st.tuples(st.integers(0, SECTORS + 1), st.integers(0, 8),
                                              st.integers(0, 3)))),
    "in_len": st.one_of(st.sampled_from([0, 20, 512, 1024]), st.integers(0, 1100)),
    "status": st.integers(0, 2),
    "indirect": st.booleans(),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests, min_size=1, max_size=4), st.booleans())
def test_random_requests_never_escape(reqs, read_only):
    mem, backend, _dev, t, drv, q = make(MemBackend(read_only=read_only), serial="fuzz")
    for rq in reqs:
        header = struct.pack("<IIQ", rq["type"], 0, rq["sector"])[:rq["header_len"]]
        bufs = [drv.buffer(header)] if header else []
        if rq["out"]:
            bufs.append(drv.buffer(rq["out"]))
        if rq["in_len"]:
            bufs.append(drv.buffer(rq["in_len"], writable=True))
        if rq["status"]:
            bufs.append(drv.buffer(rq["status"], writable=True))
        if not bufs:
            continue
        q.add(bufs, indirect=rq["indirect"])
        if t.needs_reset:
            break
        last = bufs[-1]
        if last.writable:
            event(f"status {mem.read(last.addr + last.length - 1, 1)[0]}")
    assert mem.violations == []
    used = q.get_used()
    event("device error" if t.needs_reset else "all completed")
    if t.needs_reset:
        assert drv.status & STATUS_DEVICE_NEEDS_RESET
    else:
        assert len(used) == sum(1 for rq in reqs if rq["header_len"] or rq["out"] or rq["in_len"]
                                or rq["status"])
    assert len(backend.data) == DISK


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_resize_grows_capacity_with_a_config_change_interrupt(tmp_path, fmt):
    """QMP block_resize's device half: the image grows, the capacity in config space with
    it, the config-change bit (2) rises in InterruptStatus, and the new sectors work."""
    from kemu.backends.block import ImageError, open_image
    from kemu.img import main as kemu_img
    path = tmp_path / f"d.{fmt}"
    assert kemu_img(["create", "-f", fmt, str(path), "1M"]) == 0
    backend = open_image(path, fmt)
    try:
        _mem, _b, dev, _t, drv, q = make(backend)
        assert drv.config(0, 8) == 2048
        drv.ack()
        assert not drv.interrupt_status() & 2
        dev.resize(2 << 20)
        assert drv.config(0, 8) == 4096
        assert drv.interrupt_status() & 2
        assert submit(drv, q, b.VIRTIO_BLK_T_OUT, 3000, out=b"N" * 512)[0] == b.VIRTIO_BLK_S_OK
        assert submit(drv, q, b.VIRTIO_BLK_T_IN, 3000, in_len=512)[1] == b"N" * 512
        with pytest.raises(KemuError, match="not a multiple of 512"):
            dev.resize((2 << 20) + 1)
        if fmt == "qcow2":
            with pytest.raises(ImageError, match="does not shrink"):
                dev.resize(1 << 20)
            with pytest.raises(ImageError, match="larger L1 table"):
                dev.resize(1 << 40)
            assert drv.config(0, 8) == 4096
    finally:
        backend.close()
    from kemu.img import image_info
    assert image_info(path, fmt)["virtual-size"] == 2 << 20
    with pytest.raises(KemuError, match="cannot be resized"):
        make()[2].resize(1 << 20)
    with pytest.raises(KemuError, match="read-only"):
        make(read_only=True)[2].resize(1 << 20)
