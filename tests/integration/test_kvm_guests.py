"""The purpose-built guests of tests/guests run on this host's /dev/kvm.

Each test builds its guest with gcc/ld, loads it with kemu's loaders
(bzImage or PVH), sets the vCPU up with :mod:`kemu.accel.kvm.x86_cpu` and
runs it through :class:`~kemu.accel.kvm.KvmVcpu` with port I/O and MMIO
dispatched to :class:`~kemu.bus.Bus` devices that record what the guest did
and answer its reads.  On PVM hosts (kvm_pvm) guest kernel code is emulated,
so the guests are tiny; a watchdog kicks a vCPU that runs longer than
RUN_TIMEOUT seconds, which fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import time
from pathlib import Path

import pytest

from kemu.accel.base import Halted, InternalError, Kicked, SystemEvent
from kemu.bus import Bus
from kemu.memory import GuestMemory, RamRegion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guests"))
import guestbuild

from kemu.accel.kvm import Kvm, KvmVcpu
from kemu.accel.kvm.ioctls import KVM_CAP_IOEVENTFD, KVM_CAP_IRQCHIP, KVM_CAP_IRQFD
from kemu.accel.kvm.x86_cpu import X86BootSetup, setup_vcpu, setup_x86_vm
from kemu.boot.linux_x86 import (
    E820_RAM,
    E820_RESERVED,
    MMIO_HOLE_END,
    MMIO_HOLE_START,
    BzImage,
    load_bzimage,
    load_pvh,
    parse_pvh_elf,
    ram_layout,
)

_reason = guestbuild.kvm_guest_unavailable()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

COM1 = 0x3F8
EXIT_PORT = 0x501
RUN_TIMEOUT = 30.0


class Recorder:
    """A bus device that logs accesses and answers reads through ``answer``."""

    def __init__(self, name: str, answer=None) -> None:
        self.name = name
        self.answer = answer or (lambda offset, size: 0)
        self.writes: list[tuple[int, int, int]] = []
        self.reads: list[tuple[int, int, int]] = []
        self.lock = threading.Lock()

    def read(self, offset: int, size: int) -> int:
        value = self.answer(offset, size)
        with self.lock:
            self.reads.append((offset, size, value))
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            self.writes.append((offset, size, value))


class ExitPort:
    """Port 0x501: the guest's exit status; the vCPU that writes it stops."""

    name = "exit"

    def __init__(self) -> None:
        self.status: dict[int, int] = {}
        self.cpus: dict[int, KvmVcpu] = {}

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        cpu = self.cpus[threading.get_ident()]
        self.status[cpu.index] = value
        cpu.request_system_event("poweroff")


class Machine:
    """A VM with RAM, an in-kernel irqchip, buses and ``nr_vcpus`` vCPUs."""

    def __init__(self, mem_size: int = 64 << 20, nr_vcpus: int = 1) -> None:
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm()
        self.memory = GuestMemory([RamRegion(b, s) for b, s in ram_layout(mem_size)])
        setup_x86_vm(self.vm, self.memory, irqchip=True, pit=False)
        self.boot = X86BootSetup.prepare(self.kvm, self.memory, nr_vcpus)
        self.pio = Bus("pio", 1 << 16)
        self.mmio = Bus("mmio")
        self.serial = Recorder("com1")
        self.exit = ExitPort()
        self.pio.map(COM1, 8, self.serial)
        self.pio.map(EXIT_PORT, 1, self.exit)
        self.cpus = [KvmVcpu(self.vm, i, self.mmio, self.pio) for i in range(nr_vcpus)]

    @property
    def console(self) -> str:
        return bytes(v for off, _s, v in self.serial.writes if off == 0).decode()

    def lines(self) -> dict[str, str]:
        out = {}
        for line in self.console.splitlines():
            key, _, value = line.partition(" ")
            out.setdefault(key, value)
        return out

    def run_cpu(self, cpu: KvmVcpu, timeout: float = RUN_TIMEOUT) -> str:
        """Run until the guest writes the exit port; the outcome as a word."""
        self.exit.cpus[threading.get_ident()] = cpu
        deadline = time.monotonic() + timeout
        timer = threading.Timer(timeout, cpu.kick)
        timer.start()
        try:
            while True:
                exit = cpu.run()
                if isinstance(exit, SystemEvent):
                    return exit.kind
                if isinstance(exit, Kicked) and time.monotonic() < deadline:
                    continue
                if isinstance(exit, Kicked):
                    return "timeout"
                if isinstance(exit, Halted):
                    return "halted"
                if isinstance(exit, InternalError):
                    return f"error: {exit.message}"
                return f"unexpected exit {exit!r}"
        finally:
            timer.cancel()

    def run_all(self, timeout: float = RUN_TIMEOUT) -> list[str]:
        results: list[str] = [""] * len(self.cpus)

        def body(i: int) -> None:
            results[i] = self.run_cpu(self.cpus[i], timeout)

        threads = [threading.Thread(target=body, args=(i,)) for i in range(1, len(self.cpus))]
        for t in threads:
            t.start()
        body(0)
        for t in threads:
            t.join(timeout + 5)
        return results

    def close(self) -> None:
        for cpu in self.cpus:
            cpu.close()
        self.vm.close()
        self.kvm.close()


@pytest.fixture(scope="module")
def guests(tmp_path_factory):
    out = tmp_path_factory.mktemp("guests")
    return lambda name: guestbuild.build_bzimage(name, out)


@pytest.fixture
def machine_factory():
    made: list[Machine] = []

    def make(**kw) -> Machine:
        m = Machine(**kw)
        made.append(m)
        return m
    yield make
    for m in made:
        m.close()


def boot_bzimage(m: Machine, image: bytes, cmdline: str = "", initrd: bytes | None = None):
    info = load_bzimage(m.memory, BzImage.parse(image), cmdline, initrd)
    for cpu in m.cpus:
        setup_vcpu(cpu.fd, m.boot, info.entry, info.boot_params)
    return info


def _checksum(data: bytes) -> int:
    s = 0
    for b in data:
        s = (s * 31 + b) & 0xFFFFFFFF
    return s


def test_bzimage_boot_protocol(guests, machine_factory):
    """The loader and the vCPU set-up keep the 64-bit boot protocol's promises."""
    m = machine_factory(mem_size=64 << 20)
    cmdline = "console=ttyS0 root=/dev/vda kemu.test=boot_protocol"
    initrd = bytes((i * 7 + 3) & 0xFF for i in range(5000))
    info = boot_bzimage(m, guests("boot_check"), cmdline, initrd)
    assert m.run_cpu(m.cpus[0]) == "poweroff"
    assert m.exit.status == {0: 0}, m.console
    kv = m.lines()
    assert m.console.endswith("OK\n")
    assert int(kv["rsi"], 16) == info.boot_params == 0x7000
    assert int(kv["boot_flag"], 16) == 0xAA55
    assert int(kv["magic"], 16) == 0x53726448
    assert int(kv["loader"], 16) == 0xFF
    assert int(kv["cmdline_ptr"], 16) == info.cmdline_addr
    assert kv["cmdline"] == cmdline
    assert int(kv["ramdisk_image"], 16) == info.initrd_addr
    assert int(kv["ramdisk_size"], 16) == len(initrd)
    assert int(kv["initrd_sum"], 16) == _checksum(initrd)
    # The initrd sits at the top of RAM, page aligned.
    assert info.initrd_addr == ((64 << 20) - len(initrd)) & ~0xFFF
    e820 = [tuple(int(x, 16) for x in line.split()[1:])
            for line in m.console.splitlines() if line.startswith("e820 ")]
    assert int(kv["e820_entries"], 16) == len(e820) == len(info.e820)
    assert e820 == [(e.addr, e.size, e.type) for e in info.e820]
    assert e820[0] == (0, 0x9FC00, E820_RAM)
    assert (0x100000, (64 << 20) - 0x100000, E820_RAM) in e820
    cr0, cr4, efer = (int(kv[k], 16) for k in ("cr0", "cr4", "efer"))
    assert cr0 & 1 and cr0 & (1 << 31)           # PE, PG
    assert cr4 & (1 << 5)                        # PAE
    assert efer & (1 << 8) and efer & (1 << 10)  # LME, LMA
    assert not int(kv["rflags"], 16) & (1 << 9)  # interrupts disabled
    assert (int(kv["cs"], 16), int(kv["ds"], 16), int(kv["ss"], 16)) == (0x10, 0x18, 0x18)
    assert int(kv["map_ok"], 16) == 1


def test_bzimage_large_memory_e820(guests, machine_factory):
    """Above 3 GiB of RAM the rest goes above 4 GiB and the e820 map says so."""
    size = (3 << 30) + (256 << 20)
    m = machine_factory(mem_size=size)
    boot_bzimage(m, guests("boot_check"), "big")
    assert m.run_cpu(m.cpus[0]) == "poweroff"
    assert m.exit.status == {0: 0}, m.console
    e820 = [tuple(int(x, 16) for x in line.split()[1:])
            for line in m.console.splitlines() if line.startswith("e820 ")]
    assert (0x100000, MMIO_HOLE_START - 0x100000, E820_RAM) in e820
    assert (MMIO_HOLE_END, 256 << 20, E820_RAM) in e820
    assert (0x9FC00, 0x400, E820_RESERVED) in e820


def test_port_io_and_mmio_round_trips(guests, machine_factory):
    """Guest writes reach the devices intact and device answers reach the guest."""
    m = machine_factory()
    last: dict[str, int] = {}

    def pio_answer(offset: int, size: int) -> int:
        if offset == 4:         # 0x514: complement of the last write
            return ~last["pio"] & ((1 << (8 * size)) - 1)
        if offset == 9:         # 0x519: rep insb gets 1, 2, 3, 4
            last["sin"] = last.get("sin", 0) + 1
            return last["sin"]
        return 0

    def mmio_answer(offset: int, size: int) -> int:
        return ~last["mmio"] & ((1 << (8 * size)) - 1)

    class Tracking(Recorder):
        def __init__(self, name, key, answer):
            super().__init__(name, answer)
            self.key = key

        def write(self, offset, size, value):
            super().write(offset, size, value)
            if offset == 0:
                last[self.key] = value

    pio_dev = Tracking("pio-test", "pio", pio_answer)
    mmio_dev = Tracking("mmio-test", "mmio", mmio_answer)
    m.pio.map(0x510, 12, pio_dev)
    m.mmio.map(0xD0000000, 0x1000, mmio_dev)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert m.kvm.check_extension(KVM_CAP_IOEVENTFD)
        m.vm.ioeventfd(efd, 0x51C, 4, pio=True)
        boot_bzimage(m, guests("io_mmio"))
        assert m.run_cpu(m.cpus[0]) == "poweroff"
        assert m.exit.status == {0: 0}, m.console
        assert os.eventfd_read(efd) == 1            # the ioeventfd write, not an exit
    finally:
        os.close(efd)
    # Host side: the values the guest computed, in order and size.
    v = 0x12345678
    expected = []
    for _ in range(8):
        expected += [(0, 1, v & 0xFF), (0, 2, v & 0xFFFF), (0, 4, v)]
        v = (v * 1103515245 + 12345) & 0xFFFFFFFF
    expected += [(8, 1, c) for c in b"kemu"]
    assert pio_dev.writes == expected
    assert [r[2] for r in pio_dev.reads if r[0] == 9] == [1, 2, 3, 4]
    assert all(off != 0xC for off, _s, _v in pio_dev.writes)
    w = 0x0123456789ABCDEF
    expected = []
    for _ in range(4):
        expected += [(0, 1, w & 0xFF), (0, 2, w & 0xFFFF), (0, 4, w & 0xFFFFFFFF), (0, 8, w)]
        w = (w * 6364136223846793005 + 1442695040888963407) & (2 ** 64 - 1)
    assert mmio_dev.writes == expected
    assert [(o, s) for o, s, _v in mmio_dev.reads] == [(8, s) for s in (1, 2, 4, 8)] * 4


def test_vcpus_report_their_apic_ids(guests, machine_factory):
    """N vCPUs: CPUID leaf 1, leaf 0xB and the in-kernel LAPIC agree on each id."""
    n = 3
    m = machine_factory(nr_vcpus=n)
    ids = Recorder("ids")
    m.pio.map(0x520, 8, ids)
    boot_bzimage(m, guests("smp"))
    assert m.run_all() == ["poweroff"] * n
    assert m.exit.status == {i: 0 for i in range(n)}
    reports = sorted(v for off, _s, v in ids.writes if off == 0)
    assert reports == [(i << 16) | (i << 8) | i for i in range(n)]
    assert [v for off, _s, v in ids.writes if off == 4] == [n] * n


def test_interrupt_through_in_kernel_irqchip(guests, machine_factory):
    """KVM_IRQ_LINE and an irqfd raise GSI 4; the guest's IDT handler takes it."""
    m = machine_factory()
    assert m.kvm.check_extension(KVM_CAP_IRQCHIP) and m.kvm.check_extension(KVM_CAP_IRQFD)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    m.vm.irqfd(efd, 4)

    class Trigger:
        name = "irq-trigger"

        def read(self, offset, size):
            return 0

        def write(self, offset, size, value):
            if value == 1:
                m.vm.irq_line(4, True)
                m.vm.irq_line(4, False)
            elif value == 2:
                os.eventfd_write(efd, 1)

    m.pio.map(0x530, 1, Trigger())
    try:
        boot_bzimage(m, guests("irq"))
        assert m.run_cpu(m.cpus[0]) == "poweroff"
    finally:
        m.vm.irqfd(efd, 4, deassign=True)
        os.close(efd)
    assert m.exit.status == {0: 0}, m.console
    kv = m.lines()
    assert int(kv["vector"], 16) == 0x24
    assert int(kv["irqs"], 16) == 2


def test_pvh_entry(tmp_path, machine_factory):
    """An ELF with a XEN_ELFNOTE_PHYS32_ENTRY note, entered in 32-bit mode."""
    kernel = parse_pvh_elf(guestbuild.build_pvh(tmp_path))
    m = machine_factory()
    reports = Recorder("pvh")
    m.pio.map(0x540, 4, reports)
    cmdline = "pvh says hello"
    initrd = b"\x5a" * 777
    info = load_pvh(m.memory, kernel, cmdline, initrd)
    setup_vcpu(m.cpus[0].fd, m.boot, info.entry, pvh_start_info=info.boot_params)
    assert m.run_cpu(m.cpus[0]) == "poweroff"
    assert m.console == cmdline
    values = [v for _o, _s, v in reports.writes]
    ebx, magic, version, nr_modules, _modlist, cmdline_addr, memmap, entries, \
        mod_addr, mod_size, cr0 = values
    assert ebx == info.boot_params
    assert magic == 0x336EC578 and version == 1 and nr_modules == 1
    assert cmdline_addr == info.cmdline_addr
    assert entries == len(info.e820)
    assert (mod_addr, mod_size) == (info.initrd_addr, len(initrd))
    assert cr0 & 1 and not cr0 & (1 << 31)      # protected mode, paging off
    raw = m.memory.read(memmap, 24 * entries)
    table = [struct.unpack_from("<QQII", raw, 24 * i)[:3] for i in range(entries)]
    assert table == [(e.addr, e.size, e.type) for e in info.e820]


def _real_mode(cpu: KvmVcpu, code: bytes, memory: GuestMemory) -> None:
    memory.write(0x1000, code)
    sregs = cpu.fd.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0, 0
    cpu.fd.set_sregs(sregs)
    regs = cpu.fd.get_regs()
    regs.rip, regs.rflags = 0x1000, 2
    cpu.fd.set_regs(regs)


@pytest.mark.parametrize("code", [b"\xeb\xfe", b"\xfa\xf4\xeb\xfc"],
                         ids=["spinning", "halted-in-kernel"])
def test_kick_interrupts_a_running_vcpu(machine_factory, code):
    """kick() from another thread ends a KVM_RUN that would never exit on its own:
    a guest spinning (jmp .) or halted with interrupts off (cli; hlt, which the
    in-kernel irqchip handles without an exit), running on its own thread."""
    m = machine_factory()
    cpu = m.cpus[0]
    _real_mode(cpu, code, m.memory)
    result: list = []
    t = threading.Thread(target=lambda: result.append(cpu.run()))
    t.start()
    time.sleep(0.3)
    assert t.is_alive()                         # still inside KVM_RUN
    t0 = time.monotonic()
    cpu.kick()
    t.join(10)
    assert not t.is_alive() and result == [Kicked()]
    assert time.monotonic() - t0 < 5
    # A kick while not running makes the next run() return at once.
    cpu.kick()
    assert cpu.run() == Kicked()
    # A system event requested from another thread ends run() with that event.
    cpu.request_system_event("reset")
    assert cpu.run() == SystemEvent("reset")


def test_kvm_vcpu_under_the_machine_runtime(guests, machine_factory):
    """KvmVcpu fits kemu.machines.runtime.VcpuThread, the loop boards use."""
    from kemu.machines.runtime import Outcome, RunState, VcpuThread

    m = machine_factory()
    boot_bzimage(m, guests("boot_check"), "runtime")
    cpu = m.cpus[0]
    m.exit.cpus = _AnyThread(cpu)

    def on_exit(exit):
        if isinstance(exit, SystemEvent):
            return Outcome(exit.kind, 0)
        return Outcome("error", 1, getattr(exit, "message", ""))

    thread = VcpuThread(cpu, next_deadline=lambda: None, on_exit=on_exit)
    thread.start()
    assert thread.join(RUN_TIMEOUT), "the guest did not finish"
    assert thread.outcome == Outcome("poweroff", 0)
    assert thread.state == RunState.STOPPED
    assert m.exit.status == {0: 0} and m.console.endswith("OK\n")


class _AnyThread(dict):
    """ExitPort's thread -> vCPU map for a vCPU run by a thread the test did not make."""

    def __init__(self, cpu: KvmVcpu) -> None:
        super().__init__()
        self.cpu = cpu

    def __getitem__(self, key):
        return self.cpu


def test_in_kernel_pit(machine_factory):
    """KVM_CREATE_PIT2 works after KVM_CREATE_IRQCHIP (a board's i8254)."""
    m = machine_factory()
    m.vm.create_pit2()
