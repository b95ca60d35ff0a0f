"""The virtio-pci modern transport (VIRTIO 1.2 4.1) through ECAM and its BAR, driven as Linux does."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pci_driver import EcamDriver, VirtioPciDriver
from test_virtio_blk import MemBackend, submit
from virtio_driver import make_memory

from kemu.bus import Bus
from kemu.devices.base import IrqLine
from kemu.devices.pci import config as c
from kemu.devices.pci.host import PciHost, Window
from kemu.devices.virtio import (
    STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
)
from kemu.devices.virtio import blk as b
from kemu.devices.virtio import pci as vp
from kemu.devices.virtio.blk import VirtioBlk
from kemu.devices.virtio.pci import VirtioPciTransport
from kemu.devices.virtio.rng import VirtioRng

WINDOWS = [Window(False, 0x1000_0000, 0x1000_0000, 0x2EFF_0000),
           Window(False, 0x80_0000_0000, 0x80_0000_0000, 0x80_0000_0000)]


def make(device, slot=None, bar=0x1000_0000):
    mem = make_memory(1 << 20)
    bus = Bus("mmio")
    lines = [IrqLine(name=f"intx{i}") for i in range(4)]
    host = PciHost(bus, WINDOWS, lines)
    t = VirtioPciTransport(device, mem)
    dev = host.add(t.function, slot)
    ecam = EcamDriver(host, bus)
    drv = VirtioPciDriver(ecam, dev, mem, bar_address=bar)
    return mem, host, lines, t, ecam, dev, drv


def test_identity_and_header_as_qemu():
    _, _, _, _, ecam, dev, _ = make(VirtioBlk(MemBackend()))
    assert ecam.read(dev, c.VENDOR_ID, 2) == 0x1AF4
    assert ecam.read(dev, c.DEVICE_ID, 2) == 0x1042                 # 0x1040 + block (2)
    assert ecam.read(dev, c.REVISION_ID, 1) == 1                    # non-transitional
    assert ecam.read(dev, c.REVISION_ID) >> 8 == 0x010000
    assert ecam.read(dev, c.SUBSYSTEM_VENDOR_ID) == 0x1100_1AF4                # as QEMU's
    assert ecam.read(dev, c.INTERRUPT_PIN, 1) == 1
    _, _, _, _, ecam, dev, _ = make(VirtioRng())
    assert ecam.read(dev, c.DEVICE_ID, 2) == 0x1044
    assert ecam.read(dev, c.REVISION_ID) >> 8 == 0x00FF00


def test_memory_bar_and_capabilities():
    _, host, _, _, ecam, dev, drv = make(VirtioRng(), bar=0)
    # BAR 4: 64-bit prefetchable memory of 16 KiB; BAR 1: the MSI-X table; no other BAR.
    assert ecam.size_bar(dev, 4) == (0x4000, c.BAR_MEM_TYPE_64 | c.BAR_MEM_PREFETCH)
    assert ecam.size_bar(dev, 1) == (0x1000, 0)
    assert [ecam.size_bar(dev, i)[0] for i in (0, 2, 3)] == [0, 0, 0]
    assert set(drv.caps) == {1, 2, 3, 4, 5}
    layout = {t: (bar, off, length) for t, (_, bar, off, length) in drv.caps.items()}
    assert layout[vp.VIRTIO_PCI_CAP_COMMON_CFG] == (4, 0x0000, 0x1000)
    assert layout[vp.VIRTIO_PCI_CAP_ISR_CFG] == (4, 0x1000, 0x1000)
    assert layout[vp.VIRTIO_PCI_CAP_DEVICE_CFG] == (4, 0x2000, 0x1000)
    assert layout[vp.VIRTIO_PCI_CAP_NOTIFY_CFG] == (4, 0x3000, 0x1000)
    assert drv.notify_multiplier == 4
    notify_cap = drv.caps[vp.VIRTIO_PCI_CAP_NOTIFY_CFG][0]
    assert ecam.read(dev, notify_cap + 2, 1) == 20                   # cap_len with multiplier
    # Placed in the 64-bit window above 4 GiB.
    ecam.set_bar(dev, 4, 0x80_0000_0000)
    assert host.bar_base(dev << 3, 4) == 0x80_0000_0000
    drv.bar = 0x80_0000_0000
    assert drv.rc(vp.NUM_QUEUES, 2) == 1


def test_rng_request_through_queue_with_intx_and_isr():
    mem, _, lines, t, ecam, dev, drv = make(VirtioRng(lambda n: bytes(range(n))), slot=2)
    assert drv.device_features() >> VIRTIO_F_VERSION_1 & 1
    assert drv.rc(vp.CONFIG_MSIX_VECTOR, 2) == vp.VIRTIO_MSI_NO_VECTOR
    (q,) = drv.init()
    buf = drv.buffer(16, writable=True)
    head = q.add([buf])
    assert q.get_used() == [(head, 16)]
    assert mem.read(buf.addr, 16) == bytes(range(16))
    assert lines[2].level                                            # slot 2, INTA -> line 2
    assert ecam.read(dev, c.STATUS, 2) & c.STATUS_INTERRUPT
    assert drv.isr() == 1                                            # used buffer; read clears
    assert not lines[2].level and drv.isr() == 0
    assert not ecam.read(dev, c.STATUS, 2) & c.STATUS_INTERRUPT


def test_blk_write_and_read_back():
    backend = MemBackend()
    mem, _, lines, t, ecam, dev, drv = make(VirtioBlk(backend))
    capacity = drv.config(0, 4) | drv.config(4, 4) << 32
    assert capacity == backend.size // 512
    (q,) = drv.init()
    data = bytes(range(256)) * 2
    status, _, _ = submit(drv, q, b.VIRTIO_BLK_T_OUT, sector=3, out=data)
    assert status == b.VIRTIO_BLK_S_OK
    assert backend.read(3 * 512, 512) == data
    status, got, _ = submit(drv, q, b.VIRTIO_BLK_T_IN, sector=3, in_len=512)
    assert status == b.VIRTIO_BLK_S_OK and got == data


def test_queue_registers_as_linux_uses_them():
    _, _, _, t, _, _, drv = make(VirtioRng())
    assert drv.negotiate()
    drv.wc(vp.QUEUE_SELECT, 2, 0)
    assert drv.rc(vp.QUEUE_SIZE, 2) == t.queues[0].max_size
    drv.wc(vp.QUEUE_SIZE, 2, 64)
    drv.wc(vp.QUEUE_DESC, 4, 0x4000_1000)
    drv.wc(vp.QUEUE_DESC + 4, 4, 0)
    assert drv.rc(vp.QUEUE_DESC, 4) == 0x4000_1000 and drv.rc(vp.QUEUE_DESC + 4, 4) == 0
    assert drv.rc(vp.QUEUE_NOTIFY_OFF, 2) == 0
    drv.wc(vp.QUEUE_SELECT, 2, 7)                                    # no such queue
    assert drv.rc(vp.QUEUE_SIZE, 2) == 0
    drv.wc(vp.QUEUE_SIZE, 2, 8)                                      # ignored
    assert drv.rc(vp.NUM_QUEUES, 2) == 1
    # Wrong widths are ignored and counted.
    drv.wc(vp.DEVICE_STATUS, 4, 0xFF)
    assert drv.rc(vp.DEVICE_STATUS, 1) == 0xB and t.bad_accesses == 1


def test_legacy_driver_and_bad_rings_are_device_errors():
    _, _, _, t, _, _, drv = make(VirtioRng())
    assert not drv.negotiate(features=0)                            # no VERSION_1: refused
    assert drv.negotiate()
    drv.wc(vp.QUEUE_SELECT, 2, 0)
    drv.wc(vp.QUEUE_SIZE, 2, 3)                                      # not a power of two
    drv.wc(vp.QUEUE_ENABLE, 2, 1)
    assert drv.status & STATUS_DEVICE_NEEDS_RESET
    drv.wc(vp.DEVICE_STATUS, 1, 0)                                   # reset clears it
    assert drv.status == 0 and t.error is None


def test_reset_disables_queues_and_interrupt():
    _, _, lines, t, _, _, drv = make(VirtioRng(lambda n: b"x" * n), slot=1)
    (q,) = drv.init()
    q.add([drv.buffer(4, writable=True)])
    assert lines[1].level
    drv.wc(vp.DEVICE_STATUS, 1, 0)
    assert not lines[1].level and drv.status == 0
    drv.wc(vp.QUEUE_SELECT, 2, 0)
    assert drv.rc(vp.QUEUE_ENABLE, 2) == 0


def test_pci_cfg_capability_reaches_the_bar():
    _, _, _, _, ecam, dev, drv = make(VirtioBlk(MemBackend()))
    cap = drv.caps[vp.VIRTIO_PCI_CAP_PCI_CFG][0]
    ecam.write(dev, cap + 4, 1, 4)                                   # bar
    ecam.write(dev, cap + 8, 4, vp.NUM_QUEUES)                       # offset
    ecam.write(dev, cap + 12, 4, 2)                                  # length
    assert ecam.read(dev, cap + 16, 4) == 1
    ecam.write(dev, cap + 8, 4, vp.DEVICE_STATUS)
    ecam.write(dev, cap + 12, 4, 1)
    ecam.write(dev, cap + 16, 4, 1)                                  # ACKNOWLEDGE via config
    assert drv.status == 1
    ecam.write(dev, cap + 4, 1, 2)                                   # a BAR it does not have
    assert ecam.read(dev, cap + 16, 4) == 0


def test_notify_of_unknown_queue_and_odd_offsets_is_harmless():
    _, _, _, t, _, _, drv = make(VirtioRng())
    drv.init()
    bus = drv.ecam.bus
    bus.write(drv.bar + vp.NOTIFY_OFFSET + 4 * 900, 2, 900)
    bus.write(drv.bar + vp.NOTIFY_OFFSET + 3, 1, 0)
    bus.write(drv.bar + vp.ISR_OFFSET + 8, 4, 0xFFFFFFFF)
    assert bus.read(drv.bar + vp.DEVICE_OFFSET + 0x800, 4) == 0
    assert not drv.status & STATUS_DEVICE_NEEDS_RESET


def test_one_device_model_two_transports():
    """The same VirtioBlk class runs behind virtio-mmio and virtio-pci."""
    from virtio_driver import VirtioMmioDriver

    from kemu.devices.virtio.mmio import VirtioMmioTransport
    results = []
    for pci in (False, True):
        backend = MemBackend()
        if pci:
            _, _, _, _, _, _, drv = make(VirtioBlk(backend))
        else:
            mem = make_memory(1 << 20)
            drv = VirtioMmioDriver(VirtioMmioTransport(VirtioBlk(backend), mem, IrqLine()), mem)
        (q,) = drv.init()
        submit(drv, q, b.VIRTIO_BLK_T_OUT, sector=1, out=struct.pack("<I", 0xC0FFEE) * 128)
        results.append(backend.read(512, 4))
    assert results == [struct.pack("<I", 0xC0FFEE)] * 2


class V2m:
    """Records MSI writes (as the GICv2m frame would take them)."""

    name = "v2m"

    def __init__(self):
        self.messages = []

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        self.messages.append((offset, size, value))


def enable_msix(ecam, dev, drv, v2m_base=0x0802_0000, table_bar=0x1100_0000):
    from kemu.devices.pci import msix as mx
    cap = next(a for a in ecam.capabilities(dev) if ecam.read(dev, a, 1) == mx.CAP_ID_MSIX)
    control = ecam.read(dev, cap + 2, 2)
    table = ecam.read(dev, cap + 4)
    assert table & 7 == 1                                              # BIR 1
    ecam.set_bar(dev, 1, table_bar)
    ecam.enable(dev, c.COMMAND_MEMORY | c.COMMAND_MASTER)
    bus = ecam.bus
    for v in range((control & 0x7FF) + 1):
        entry = table_bar + (table & ~7) + 16 * v
        bus.write(entry, 4, v2m_base + 0x40)
        bus.write(entry + 4, 4, 0)
        bus.write(entry + 8, 4, 80 + v)                                # INTIDs 80, 81, ...
        bus.write(entry + 12, 4, 0)                                    # unmasked
    ecam.write(dev, cap + 2, 2, 0x8000)                                # MSI-X Enable
    return cap, (control & 0x7FF) + 1


def test_msix_vectors_deliver_messages_instead_of_intx():
    mem, host, lines, t, ecam, dev, drv = make(VirtioRng(lambda n: b"r" * n), slot=1)
    v2m = V2m()
    ecam.bus.map(0x0802_0000, 0x1000, v2m)
    cap, vectors = enable_msix(ecam, dev, drv)
    assert vectors == 2                                                # one queue + config
    assert drv.negotiate(mask=~(1 << VIRTIO_F_EVENT_IDX))              # every buffer notifies
    drv.wc(vp.CONFIG_MSIX_VECTOR, 2, 1)
    assert drv.rc(vp.CONFIG_MSIX_VECTOR, 2) == 1
    drv.wc(vp.QUEUE_SELECT, 2, 0)
    drv.wc(vp.QUEUE_MSIX_VECTOR, 2, 5)                                 # beyond the table
    assert drv.rc(vp.QUEUE_MSIX_VECTOR, 2) == vp.VIRTIO_MSI_NO_VECTOR
    drv.wc(vp.QUEUE_MSIX_VECTOR, 2, 0)
    assert drv.rc(vp.QUEUE_MSIX_VECTOR, 2) == 0
    q = drv.setup_queue(0)
    drv.driver_ok()
    q.add([drv.buffer(8, writable=True)])
    assert v2m.messages == [(0x40, 4, 80)] and not any(l.level for l in lines)
    t.config_changed()
    assert v2m.messages[-1] == (0x40, 4, 81)
    # Function mask: the message waits in the PBA until unmasked.
    ecam.write(dev, cap + 2, 2, 0xC000)
    q.add([drv.buffer(8, writable=True)])
    assert len(v2m.messages) == 2
    pba = ecam.read(dev, cap + 8)
    assert ecam.bus.read(0x1100_0000 + (pba & ~7), 4) == 1
    ecam.write(dev, cap + 2, 2, 0x8000)
    assert v2m.messages[-1] == (0x40, 4, 80)
    assert ecam.bus.read(0x1100_0000 + (pba & ~7), 4) == 0
    # Without Bus Master Enable nothing is sent.
    ecam.write(dev, c.COMMAND, 2, c.COMMAND_MEMORY)
    q.add([drv.buffer(8, writable=True)])
    assert len(v2m.messages) == 3
    # MSI-X off again: back to INTx through ISR.
    ecam.write(dev, cap + 2, 2, 0)
    q.add([drv.buffer(8, writable=True)])
    assert lines[1].level


def test_gicv2m_frame_raises_its_spis_only():
    from kemu.devices.gicv2m import MSI_SETSPI_NS, MSI_TYPER, GicV2m
    raised = []
    frame = GicV2m(raised.append, spi_base=48, count=64)
    assert frame.read(MSI_TYPER, 4) == (80 << 16) | 64
    frame.write(MSI_SETSPI_NS, 4, 80)
    frame.write(MSI_SETSPI_NS, 4, 143)
    frame.write(MSI_SETSPI_NS, 4, 79)                                  # not the frame's
    frame.write(MSI_SETSPI_NS, 4, 144)
    frame.write(0x44, 4, 90)
    assert raised == [48, 111] and frame.bad_messages == 2


def test_function_reset_masks_msix_and_clears_bars():
    mem, host, lines, t, ecam, dev, drv = make(VirtioRng())
    v2m = V2m()
    ecam.bus.map(0x0802_0000, 0x1000, v2m)
    cap, _ = enable_msix(ecam, dev, drv)
    host.reset()
    assert ecam.read(dev, cap + 2, 2) & 0xC000 == 0
    assert ecam.read(dev, c.BAR0 + 4) == 0 and host.bar_base(dev << 3, 1) is None
    assert t.msix.read(12, 4) == 1                                     # vector 0 masked
    assert t.msix.read(0, 4) == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["cfg", "bar", "msix"]),
                          st.integers(0, 0x1FFF), st.sampled_from([1, 2, 3, 4, 8]),
                          st.integers(0, 2**64 - 1)), max_size=60))
def test_arbitrary_guest_accesses_never_break_the_vmm(accesses):
    """Config space, the virtio BAR and the MSI-X table take any access: no exception,
    no access to memory outside guest RAM, the bus stays consistent."""
    mem, host, _, t, ecam, dev, drv = make(VirtioBlk(MemBackend()))
    v2m = V2m()
    ecam.bus.map(0x0802_0000, 0x1000, v2m)
    enable_msix(ecam, dev, drv)
    for where, offset, size, value in accesses:
        value &= (1 << (8 * size)) - 1
        if where == "cfg":
            ecam.write(dev, offset & 0xFFF, size, value)
            ecam.read(dev, offset & 0xFFF, size)
        elif where == "bar":
            ecam.bus.write(drv.bar + (offset & 0x3FFF), size, value)
            ecam.bus.read(drv.bar + (offset & 0x3FFF), size)
        else:
            t.msix.write(offset & 0xFFF, size, value)
            t.msix.read(offset & 0xFFF, size)
    assert mem.violations == []
    mapped = sorted((m.base, m.end) for m in ecam.bus.mappings)
    assert all(a[1] <= b[0] for a, b in zip(mapped, mapped[1:]))


def test_state_survives_a_save_and_restore_into_a_new_bus():
    """Configuration space (BARs, Command, MSI-X control), MSI-X table and pending bits,
    the common registers and the queue go through plain data into a fresh host and
    transport: the driver carries on there, messages and all."""
    from kemu.state import restore_plain, save_plain
    mem, host, lines, t, ecam, dev, drv = make(VirtioRng(lambda n: b"r" * n), slot=1)
    v2m = V2m()
    ecam.bus.map(0x0802_0000, 0x1000, v2m)
    cap, _ = enable_msix(ecam, dev, drv)
    assert drv.negotiate(mask=~(1 << VIRTIO_F_EVENT_IDX))
    drv.wc(vp.CONFIG_MSIX_VECTOR, 2, 1)
    drv.wc(vp.QUEUE_SELECT, 2, 0)
    drv.wc(vp.QUEUE_MSIX_VECTOR, 2, 0)
    q = drv.setup_queue(0)
    drv.driver_ok()
    q.add([drv.buffer(8, writable=True)])
    assert v2m.messages == [(0x40, 4, 80)]
    ecam.write(dev, cap + 2, 2, 0xC000)                     # function masked: a pending bit
    q.add([drv.buffer(8, writable=True)])
    assert len(v2m.messages) == 1
    saved = (save_plain(host), save_plain(t), save_plain(t.device))

    bus2 = Bus("mmio")
    host2 = PciHost(bus2, WINDOWS, [IrqLine(name=f"intx{i}") for i in range(4)])
    t2 = VirtioPciTransport(VirtioRng(lambda n: b"s" * n), mem)
    assert host2.add(t2.function, 1) == dev
    v2m2 = V2m()
    bus2.map(0x0802_0000, 0x1000, v2m2)
    restore_plain(host2, saved[0])
    restore_plain(t2, saved[1])
    restore_plain(t2.device, saved[2])
    assert host2.bar_base(dev << 3, 4) == host.bar_base(dev << 3, 4)     # mapped again
    assert host2.bar_base(dev << 3, 1) == 0x1100_0000
    ecam2 = EcamDriver(host2, bus2)
    assert ecam2.read(dev, c.COMMAND, 2) == ecam.read(dev, c.COMMAND, 2)
    drv.ecam = ecam2                                        # the same driver, the new bus
    assert drv.rc(vp.CONFIG_MSIX_VECTOR, 2) == 1
    assert drv.status == t.status and t2.status & vp.STATUS_DRIVER_OK
    ecam2.write(dev, cap + 2, 2, 0x8000)                    # unmasked: the pending message
    assert v2m2.messages == [(0x40, 4, 80)]
    q.add([drv.buffer(8, writable=True)])                   # and the queue goes on
    assert v2m2.messages[-1] == (0x40, 4, 80) and len(v2m2.messages) == 2
    assert not any(line.level for line in lines)


def test_a_state_from_another_function_is_refused():
    from kemu.state import StateError, restore_plain, save_plain
    _, _, _, t, _, _, _ = make(VirtioRng())
    _, _, _, t2, _, _, _ = make(VirtioBlk(MemBackend()))
    state = save_plain(t2)
    state["queue_vectors"] = state["queue_vectors"] * 2
    import pytest
    with pytest.raises(StateError, match="incompatible virtio-pci state"):
        restore_plain(t, state)
    bad = save_plain(t.function)
    bad["space"] = bad["space"][:100]
    with pytest.raises(StateError, match="incompatible PCI function state"):
        restore_plain(t.function, bad)
