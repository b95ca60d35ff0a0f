"""Split virtqueue (VIRTIO 1.2 section 2.7), driven through virtio-mmio by the test driver."""

import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from virtio_driver import RAM_BASE, Buf, VirtioMmioDriver, make_memory

from kemu.devices.base import IrqLine
from kemu.devices.virtio import (
    MAX_CHAIN_BYTES,
    STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VirtioDevice,
    Virtqueue,
)
from kemu.devices.virtio.mmio import VirtioMmioTransport
from kemu.devices.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
NO_RING_FEATURES = ~((1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_F_INDIRECT_DESC))


class Sink(VirtioDevice):
    """Pops every chain, records it, returns it claiming all writable bytes written."""

    device_id = 0x3F
    name = "sink"

    def __init__(self, size: int = 8) -> None:
        super().__init__([size])
        self.chains = []

    def queue_notify(self, index, queue):
        while (chain := queue.pop()) is not None:
            self.chains.append(chain)
            queue.push(chain, chain.writable_len)
            self.session.signal_used(index)


def setup(size=8, mask=~0, ram=1 << 20, qsize=None):
    mem = make_memory(ram)
    dev = Sink(size)
    irq = IrqLine()
    t = VirtioMmioTransport(dev, mem, irq)
    drv = VirtioMmioDriver(t, mem)
    (q,) = drv.init(mask=mask, size=qsize)
    return mem, dev, irq, t, drv, q


def test_direct_chain_roundtrip():
    mem, dev, irq, _t, drv, q = setup()
    a, b, c = drv.buffer(b"hdr"), drv.buffer(b"data!"), drv.buffer(7, writable=True)
    head = q.add([a, b, c])
    (chain,) = dev.chains
    assert chain.head == head
    assert chain.segments == [(a.addr, 3, False), (b.addr, 5, False), (c.addr, 7, True)]
    assert chain.readable_len == 8 and chain.writable_len == 7
    assert chain.read(mem, 2, 4) == b"rdat"
    assert chain.read(mem, 6, 100) == b"a!"
    assert chain.write(mem, 5, b"xyz") == 2
    assert mem.read(c.addr + 5, 2) == b"xy"
    assert q.get_used() == [(head, 7)]
    assert irq.level and drv.interrupt_status() == 1
    drv.ack()
    assert not irq.level
    assert mem.violations == []


def test_indirect_chain():
    _mem, dev, _irq, t, drv, q = setup()
    bufs = [drv.buffer(b"r" * 16), drv.buffer(4, writable=True), drv.buffer(8, writable=True)]
    head = q.add(bufs, indirect=True)
    (chain,) = dev.chains
    assert chain.head == head
    assert [s[2] for s in chain.segments] == [False, True, True]
    assert q.get_used() == [(head, 12)]
    assert not t.needs_reset


def test_direct_descriptors_then_indirect_table():
    """2.7.5.3.2: zero or more chained descriptors followed by one indirect one."""
    _mem, dev, _irq, _t, drv, q = setup()
    r0 = drv.buffer(b"a" * 8)
    w0 = drv.buffer(4, writable=True)
    table = drv.alloc.alloc(16)
    q.write_desc(0, w0.addr, 4, WRITE, 0, table)
    # WRITE on the indirect descriptor itself is ignored (2.7.5.3.2).
    q.write_desc(0, r0.addr, 8, NEXT, 1)
    q.write_desc(1, table, 16, INDIRECT | WRITE, 0)
    q.publish(0)
    q.kick()
    (chain,) = dev.chains
    assert chain.segments == [(r0.addr, 8, False), (w0.addr, 4, True)]


def test_zero_length_descriptor_is_not_checked():
    _mem, dev, _irq, t, _drv, q = setup()
    q.write_desc(0, 0xFFFF_FFFF_FFFF_FFF0, 0, WRITE, 0)
    q.publish(0)
    q.kick()
    assert not t.needs_reset and len(dev.chains) == 1
    assert q.get_used() == [(0, 0)]


def _ram_end(mem):
    return mem.regions[0].end


# Each case writes a malformed ring through the driver queue; all must end in
# DEVICE_NEEDS_RESET with a config interrupt, nothing processed, no bad access.
def _out_of_ram(q, mem, drv):
    q.write_desc(0, 0x1000, 16, 0, 0)
    q.publish(0)


def _straddles_end(q, mem, drv):
    q.write_desc(0, _ram_end(mem) - 8, 16, WRITE, 0)
    q.publish(0)


def _overflows_64_bits(q, mem, drv):
    q.write_desc(0, 2**64 - 8, 16, 0, 0)
    q.publish(0)


def _longer_than_ram(q, mem, drv):
    q.write_desc(0, RAM_BASE, 2**32 - 1, 0, 0)
    q.publish(0)


def _loop(q, mem, drv):
    buf = drv.buffer(8)
    q.write_desc(0, buf.addr, 8, NEXT, 1)
    q.write_desc(1, buf.addr, 8, NEXT, 0)
    q.publish(0)


def _self_loop(q, mem, drv):
    buf = drv.buffer(8)
    q.write_desc(3, buf.addr, 8, NEXT | WRITE, 3)
    q.publish(3)


def _next_out_of_range(q, mem, drv):
    buf = drv.buffer(8)
    q.write_desc(0, buf.addr, 8, NEXT, q.size)
    q.publish(0)


def _head_out_of_range(q, mem, drv):
    q.publish(q.size)


def _indirect_longer_than_queue(q, mem, drv):
    buf = drv.buffer(8)
    n = q.size + 1
    table = drv.alloc.alloc(16 * n)
    for i in range(n):
        q.write_desc(i, buf.addr, 8, NEXT if i < n - 1 else 0, i + 1, table)
    q.write_desc(0, table, 16 * n, INDIRECT, 0)
    q.publish(0)


def _indirect_loop(q, mem, drv):
    buf = drv.buffer(8)
    table = drv.alloc.alloc(32)
    q.write_desc(0, buf.addr, 8, NEXT, 1, table)
    q.write_desc(1, buf.addr, 8, NEXT, 0, table)
    q.write_desc(0, table, 32, INDIRECT, 0)
    q.publish(0)


def _indirect_next_out_of_table(q, mem, drv):
    buf = drv.buffer(8)
    table = drv.alloc.alloc(32)
    q.write_desc(0, buf.addr, 8, NEXT, 2, table)
    q.write_desc(0, table, 32, INDIRECT, 0)
    q.publish(0)


def _indirect_len(length):
    def case(q, mem, drv):
        table = drv.alloc.alloc(64)
        q.write_desc(0, table, length, INDIRECT, 0)
        q.publish(0)
    return case


def _indirect_outside_ram(q, mem, drv):
    q.write_desc(0, _ram_end(mem) - 16, 32, INDIRECT, 0)
    q.publish(0)


def _nested_indirect(q, mem, drv):
    inner = drv.alloc.alloc(16)
    outer = drv.alloc.alloc(16)
    q.write_desc(0, drv.buffer(8).addr, 8, 0, 0, inner)
    q.write_desc(0, inner, 16, INDIRECT, 0, outer)
    q.write_desc(0, outer, 16, INDIRECT, 0)
    q.publish(0)


def _indirect_with_next(q, mem, drv):
    table = drv.alloc.alloc(16)
    q.write_desc(0, drv.buffer(8).addr, 8, 0, 0, table)
    q.write_desc(0, table, 16, INDIRECT | NEXT, 1)
    q.write_desc(1, drv.buffer(8).addr, 8, 0, 0)
    q.publish(0)


def _readable_after_writable(q, mem, drv):
    q.add([Buf(drv.buffer(8).addr, 8, True), Buf(drv.buffer(8).addr, 8, False)], kick=False)


def _readable_after_writable_indirect(q, mem, drv):
    q.add([Buf(drv.buffer(8).addr, 8, True), Buf(drv.buffer(8).addr, 8, False)],
          indirect=True, kick=False)


def _avail_idx_jump(q, mem, drv):
    q.add([drv.buffer(8)], kick=False)
    q.set_avail_idx(q.size + 1)


def _avail_idx_backwards(q, mem, drv):
    q.set_avail_idx(0xFFFF)


MALFORMED = {
    "out_of_ram": _out_of_ram,
    "straddles_ram_end": _straddles_end,
    "addr_plus_len_overflows_64_bits": _overflows_64_bits,
    "length_exceeds_ram": _longer_than_ram,
    "loop": _loop,
    "self_loop": _self_loop,
    "next_out_of_range": _next_out_of_range,
    "head_out_of_range": _head_out_of_range,
    "indirect_longer_than_queue": _indirect_longer_than_queue,
    "indirect_loop": _indirect_loop,
    "indirect_next_outside_table": _indirect_next_out_of_table,
    "indirect_len_zero": _indirect_len(0),
    "indirect_len_not_multiple_of_16": _indirect_len(17),
    "indirect_table_outside_ram": _indirect_outside_ram,
    "nested_indirect": _nested_indirect,
    "indirect_with_next": _indirect_with_next,
    "readable_after_writable": _readable_after_writable,
    "readable_after_writable_indirect": _readable_after_writable_indirect,
    "avail_idx_jumps_past_queue_size": _avail_idx_jump,
    "avail_idx_goes_backwards": _avail_idx_backwards,
}


@pytest.mark.parametrize("case", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_ring_is_a_device_error(case):
    mem, dev, irq, t, drv, q = setup()
    case(q, mem, drv)
    q.kick()
    assert t.needs_reset and t.error
    assert drv.status & STATUS_DEVICE_NEEDS_RESET
    assert dev.chains == []
    assert drv.interrupt_status() == 2 and irq.level  # configuration change notification
    assert mem.violations == []
    # The device stays dead until reset, then works again.
    q.add([drv.buffer(4)])
    assert dev.chains == []
    (q,) = drv.init()
    q.add([drv.buffer(4), drv.buffer(4, writable=True)])
    assert len(dev.chains) == 1 and not t.needs_reset


def test_indirect_without_feature_is_a_device_error():
    _mem, _dev, _irq, t, drv, q = setup(mask=NO_RING_FEATURES)
    q.add([drv.buffer(8), drv.buffer(8, writable=True)], indirect=True)
    assert t.needs_reset and "INDIRECT" in t.error


def test_chain_total_length_is_bounded():
    _mem, dev, _irq, t, drv, q = setup(ram=MAX_CHAIN_BYTES + (8 << 20))
    half = MAX_CHAIN_BYTES // 2 + 1
    a = drv.alloc.alloc(half, 4096)
    b = drv.alloc.alloc(half, 4096)
    q.add([Buf(a, half, True), Buf(b, half, True)])
    assert t.needs_reset and "exceeds" in t.error
    # Exactly the bound is fine.
    (q,) = drv.init()
    q.add([Buf(a, MAX_CHAIN_BYTES // 2, True), Buf(b, MAX_CHAIN_BYTES // 2, True)])
    assert len(dev.chains) == 1 and not t.needs_reset


def test_chain_of_exactly_queue_size_descriptors():
    _mem, dev, _irq, t, drv, q = setup(size=4)
    bufs = [drv.buffer(4) for _ in range(4)]
    q.add(bufs)
    assert len(dev.chains) == 1 and not t.needs_reset
    q.add([drv.buffer(4) for _ in range(4)], indirect=True)
    assert len(dev.chains) == 2 and not t.needs_reset


@pytest.mark.parametrize("qsize", [3, 6, 16, 0])
def test_bad_queue_num_is_refused_at_queue_ready(qsize):
    """QueueNum must be a power of two no larger than QueueNumMax (8 here)."""
    mem = make_memory()
    t = VirtioMmioTransport(Sink(8), mem, IrqLine())
    drv = VirtioMmioDriver(t, mem)
    assert drv.negotiate()
    drv.w32(0x030, 0)                     # QueueSel
    drv.w32(0x038, qsize)                 # QueueNum
    for reg in (0x080, 0x090, 0x0A0):     # valid, aligned rings
        drv.w32(reg, (RAM_BASE + 0x1000 * (reg >> 4)) & 0xFFFFFFFF)
    drv.w32(0x044, 1)                     # QueueReady
    assert t.needs_reset and "size" in t.error
    assert drv.r32(0x044) == 0
    assert mem.violations == []


@pytest.mark.parametrize("reg,addr", [
    (0x080, RAM_BASE + 8),        # descriptor table not 16-byte aligned
    (0x090, RAM_BASE + 1),        # driver area not 2-byte aligned
    (0x0A0, RAM_BASE + 2),        # device area not 4-byte aligned
    (0x080, 0x1000),              # outside RAM
    (0x0A0, RAM_BASE + (1 << 20) - 16),  # runs off the end of RAM
])
def test_bad_ring_address_is_refused(reg, addr):
    mem = make_memory()
    t = VirtioMmioTransport(Sink(8), mem, IrqLine())
    drv = VirtioMmioDriver(t, mem)
    assert drv.negotiate()
    drv.w32(0x030, 0)
    drv.w32(0x038, 8)
    for r in (0x080, 0x090, 0x0A0):
        drv.w32(r, RAM_BASE + 0x1000)
    drv.w32(reg, addr & 0xFFFFFFFF)
    drv.w32(reg + 4, addr >> 32)
    drv.w32(0x044, 1)
    assert t.needs_reset and drv.r32(0x044) == 0
    assert mem.violations == []


def test_max_queue_size_limits():
    mem = make_memory()
    with pytest.raises(ValueError):
        Virtqueue(mem, 65536)
    with pytest.raises(ValueError):
        Virtqueue(mem, 12)
    with pytest.raises(ValueError):
        Sink(3)
    Virtqueue(mem, 32768)


def test_no_interrupt_flag_suppresses_notification():
    _mem, _dev, irq, _t, drv, q = setup(mask=NO_RING_FEATURES)
    q.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    q.add([drv.buffer(4, writable=True)])
    assert len(q.get_used()) == 1
    assert not irq.level and drv.interrupt_status() == 0
    q.set_avail_flags(0)
    q.add([drv.buffer(4, writable=True)])
    assert irq.level


def test_event_idx_used_event_suppresses_until_crossed():
    _mem, _dev, irq, t, drv, q = setup()
    assert t.queues[0].event_idx
    # The first used buffer always notifies (no previous signal to compare with).
    q.add([drv.buffer(4, writable=True)])
    assert irq.level
    drv.ack()
    # used_event = 2: notify when used idx moves past 2, i.e. after the third buffer.
    q.set_used_event(2)
    q.add([drv.buffer(4, writable=True)])
    assert not irq.level
    q.add([drv.buffer(4, writable=True)])
    assert irq.level
    drv.ack()
    q.add([drv.buffer(4, writable=True)])
    assert not irq.level
    assert len(q.get_used()) == 4


def test_event_idx_avail_event_tracks_next_avail():
    _mem, _dev, _irq, t, drv, q = setup()
    for i in range(3):
        q.add([drv.buffer(4)])
        assert q.avail_event() == i + 1
    # The NO_NOTIFY flag is not used with EVENT_IDX.
    t.queues[0].set_notification(False)
    assert q.used_flags() == 0


def test_set_notification_without_event_idx():
    _mem, _dev, _irq, t, _drv, q = setup(mask=NO_RING_FEATURES)
    t.queues[0].set_notification(False)
    assert q.used_flags() == VIRTQ_USED_F_NO_NOTIFY
    t.queues[0].set_notification(True)
    assert q.used_flags() == 0


def test_indices_wrap_at_65536():
    _mem, _dev, _irq, t, drv, q = setup(size=4)
    vq = t.queues[0]
    state = vq.save()
    state.next_avail = state.next_used = 0xFFFE
    vq.restore(state)
    q.avail_idx = q.last_used = 0xFFFE
    q.set_avail_idx(0xFFFE)
    heads = [q.add([drv.buffer(4, writable=True)], kick=False) for _ in range(4)]
    q.kick()
    assert q.avail_idx == 2
    assert [u[0] for u in q.get_used()] == heads
    assert vq.next_avail == 2 and vq.next_used == 2 and not t.needs_reset


def test_push_rejects_used_length_beyond_writable():
    _mem, dev, _irq, t, drv, q = setup()
    q.add([drv.buffer(4), drv.buffer(4, writable=True)])
    with pytest.raises(ValueError):
        t.queues[0].push(dev.chains[0], 5)


def test_pop_on_disabled_queue_returns_nothing():
    _mem, _dev, _irq, t, drv, q = setup()
    q.add([drv.buffer(4)], kick=False)
    t.queues[0].disable()
    assert t.queues[0].pop() is None


# -- property: random malformed rings never escape the device-error path ------------------

DESC = struct.Struct("<QIHH")
RAM = 1 << 16
DATA = RAM_BASE + 0x8000      # random buffers point around here
IND_TABLES = (RAM_BASE + 0xE000, RAM_BASE + 0xF000)
IND_ENTRIES = 6


def reference_chain(mem, size, desc_table, head, indirect_ok):
    """An independent statement of 2.7.5 validity: writable length, or None if invalid."""
    if head >= size:
        return None
    table, entries, i = desc_table, size, head
    nested = seen_writable = False
    count = total = writable = 0
    while True:
        if i >= entries:
            return None
        addr, length, flags, nxt = DESC.unpack(mem.read(table + 16 * i, 16))
        if flags & INDIRECT:
            if (not indirect_ok or nested or flags & NEXT or length == 0 or length % 16
                    or not mem.contains(addr, length)):
                return None
            table, entries, i, nested = addr, length // 16, 0, True
            continue
        count += 1
        if count > size:
            return None
        if flags & WRITE:
            seen_writable = True
            writable += length
        elif seen_writable:
            return None
        if length and not mem.contains(addr, length):
            return None
        total += length
        if total > MAX_CHAIN_BYTES:
            return None
        if not flags & NEXT:
            return writable
        i = nxt


good_addr = st.integers(DATA, DATA + 0x100)
good_len = st.integers(0, 64)
# Hostile values for one descriptor field each: addr, len, flags, next.
FIELD_VALUES = (
    st.one_of(good_addr, st.sampled_from(IND_TABLES),
              st.integers(RAM_BASE + RAM - 64, RAM_BASE + RAM + 64),
              st.integers(0, 2**64 - 1), st.just(2**64 - 8)),
    st.one_of(good_len, st.sampled_from([16, 32, 48, 96, 17, RAM, 2**32 - 1])),
    st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF)),
    st.integers(0, 9),
)


@st.composite
def rings(draw):
    """Well-formed chains (direct and indirect), then up to three corruptions."""
    size = draw(st.sampled_from([1, 2, 4, 8]))
    table = [[0, 0, 0, 0] for _ in range(size)]
    ind = [[[0, 0, 0, 0] for _ in range(IND_ENTRIES)] for _ in IND_TABLES]
    free = list(draw(st.permutations(range(size))))
    free_tables = list(range(len(IND_TABLES)))
    heads = []
    for _ in range(draw(st.integers(1, size))):
        n_read = draw(st.integers(0, 2))
        n_write = draw(st.integers(0 if n_read else 1, 2))
        bufs = [(draw(good_addr), draw(good_len), i >= n_read) for i in range(n_read + n_write)]
        if free_tables and free and draw(st.booleans()):
            t = free_tables.pop(0)
            target, links = ind[t], list(range(len(bufs)))
            head = free.pop(0)
            table[head] = [IND_TABLES[t], 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0]
        elif free:
            bufs = bufs[:len(free)]
            target, links = table, [free.pop(0) for _ in bufs]
            head = links[0]
        else:
            break
        for n, (addr, length, writable) in enumerate(bufs):
            more = n < len(bufs) - 1
            target[links[n]] = [addr, length, (WRITE if writable else 0) | (NEXT if more else 0),
                                links[n + 1] if more else 0]
        heads.append(head)
    for _ in range(draw(st.integers(0, 3))):
        tbl = draw(st.sampled_from([table, ind[0], ind[1]]))
        field = draw(st.integers(0, 3))
        tbl[draw(st.integers(0, len(tbl) - 1))][field] = draw(FIELD_VALUES[field])
    if heads and draw(st.integers(0, 7)) == 0:
        heads[draw(st.integers(0, len(heads) - 1))] = draw(st.integers(0, size + 1))
    if draw(st.integers(0, 7)) == 0:
        heads.append(draw(st.integers(0, size - 1)))
    return {
        "size": size,
        "indirect": draw(st.integers(0, 3)) > 0,
        "event_idx": draw(st.booleans()),
        "table": [tuple(d) for d in table],
        "ind": [[tuple(d) for d in t] for t in ind],
        "heads": heads,
        "avail_idx": draw(st.integers(0, 0xFFFF)) if draw(st.integers(0, 9)) == 0 else None,
        "used_event": draw(st.integers(0, 0xFFFF)),
    }


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rings())
def test_random_rings_are_processed_or_refused(ring):
    size = ring["size"]
    mem = make_memory(RAM)
    dev = Sink(8)
    irq = IrqLine()
    t = VirtioMmioTransport(dev, mem, irq)
    drv = VirtioMmioDriver(t, mem)
    mask = ~0
    if not ring["indirect"]:
        mask &= ~(1 << VIRTIO_F_INDIRECT_DESC)
    if not ring["event_idx"]:
        mask &= ~(1 << VIRTIO_F_EVENT_IDX)
    (q,) = drv.init(mask=mask, size=size)
    for i, d in enumerate(ring["table"]):
        q.write_desc(i, *d)
    for table, descs in zip(IND_TABLES, ring["ind"]):
        for i, d in enumerate(descs):
            q.write_desc(i, *d, table=table)
    for head in ring["heads"]:
        q.publish(head)
    if ring["avail_idx"] is not None:
        q.set_avail_idx(ring["avail_idx"])
    q.set_used_event(ring["used_event"])

    # What a correct device must do, computed from guest memory before the kick.
    pending = q.avail_idx
    expect_used, expect_error = [], pending > size
    if not expect_error:
        for n in range(pending):
            head = mem.read_int(q.avail + 4 + 2 * (n % size), 2)
            w = reference_chain(mem, size, q.desc, head, ring["indirect"])
            if w is None:
                expect_error = True
                break
            expect_used.append((head, w))

    q.kick()  # must not raise
    event(("refused: " + t.error.split(":")[1][:30]) if expect_error else f"processed {len(expect_used)}")

    assert mem.violations == []
    assert t.needs_reset == expect_error, t.error
    assert q.get_used() == expect_used
    if expect_error:
        assert drv.interrupt_status() & 2 and irq.level
    # The transport keeps answering, and a reset brings the device back.
    (q,) = drv.init()
    q.add([drv.buffer(4), drv.buffer(4, writable=True)])
    assert not t.needs_reset and q.get_used()[-1][1] == 4
