"""The x86-64 ``microvm`` board on the KVM accelerator.

A PC without firmware or PCI, in the spirit of Firecracker and QEMU's
``microvm``: Linux is entered directly (bzImage through the 64-bit boot
protocol, or an ELF vmlinux through its PVH entry) and finds its CPUs, I/O
APIC, legacy devices and virtio-mmio slots in hardware-reduced ACPI tables
(:mod:`kemu.boot.acpi`; Debian's cloud kernel has neither an MP table
parser nor command-line virtio devices).  An MP table (Intel MP spec 1.4)
is written too, and with ``config.extra["acpi"] = False`` the virtio slots
are announced on the command line instead (``virtio_mmio.device=
512@0xd0000000:5``, CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES), as QEMU's
microvm does with acpi=off.

==================  ===========  ============================================
0x0 - 0xbfffffff    -m           RAM (what exceeds 3 GiB goes above 4 GiB)
0x60, 0x64          ports        i8042 (IRQ 1); command 0xFE resets
0x70, 0x71          ports        CMOS RTC (MC146818, host time)
0x3f8 - 0x3ff       ports        16550A COM1 (IRQ 4), the console (ttyS0)
0x600, 0x601        ports        ACPI sleep control / status (S5: power off)
0x000e0000          64 KiB       ACPI RSDP, XSDT, FADT, MADT, DSDT
0x000f0000          64 KiB       MP floating pointer and configuration table
0xc0000000          256 MiB      PCIe memory window (pcie=on)
0xd0000000          n x 0x200    virtio-mmio slots (IRQ 5, 6, 7, 9, 10, ...)
0xe0000000          256 MiB      PCIe ECAM, buses 0-255 (pcie=on)
0xfec00000                       I/O APIC (KVM in-kernel irqchip)
0xfee00000                       local APICs (KVM in-kernel irqchip)
==================  ===========  ============================================

With ``-M microvm,pcie=on`` (and ACPI, as QEMU's microvm requires) there is
PCI Express too: QEMU's generic ECAM host bridge (:mod:`kemu.devices.pci`)
with the ``-device *-pci`` virtio devices on pcie.0, described to Linux by
an MCFG table and ``\\_SB.PCI0`` (its bus range, memory window and _PRT)
in the DSDT; the ECAM is reserved in the e820 map, as Linux wants before it
uses MMCONFIG.  INTA-D are GSIs 20-23 (the last four virtio-mmio slots' IRQs,
so with PCIe there are 13 slots); MSI-X messages, writes to 0xFEExxxxx,
reach the local APICs through ``KVM_SIGNAL_MSI``.  Linux assigns the BARs
itself (there is no firmware).

KVM provides the PIC, I/O APIC, local APICs and PIT (``setup_x86_vm``); the
board's devices raise GSIs with ``KVM_IRQ_LINE``.  Each vCPU has its own
thread (:class:`~kemu.machines.runtime.VcpuThread`); the application
processors wait in KVM for Linux's INIT/SIPI.  Device accesses from any
vCPU thread run under the board's lock.

Ending the machine: i8042 reset (the FADT's reset register, or Linux's
``reboot=k``) restarts it, or ends it with ``-no-reboot``; ACPI S5 through
the sleep control register powers it off.  Without ACPI Linux has no
power-off driver and ends in ``kernel_halt()``: the board also treats its
``reboot: System halted`` / ``reboot: Power down`` console line as the guest
powering off.  A kernel panic ends the machine with
status 1, as on the virt board.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from kemu.accel.base import Exit
from kemu.accel.kvm.eventfds import (
    IoEventFd,
    ResampleIrqFd,
    supports_ioeventfd,
    supports_resample_irqfd,
)
from kemu.backends.ioloop import IoLoop
from kemu.backends.serial import SerialBackend
from kemu.boot import acpi, linux_x86, mptable
from kemu.bus import Bus
from kemu.devices.acpi_ged import AcpiGed
from kemu.devices.acpi_sleep import AcpiSleep
from kemu.devices.base import IrqLine
from kemu.devices.cmos_rtc import CmosRtc
from kemu.machines.rtc import RtcClock
from kemu.devices.i8042 import I8042
from kemu.devices.serial_16550 import Serial16550
from kemu.errors import BootError, ConfigError
from kemu.machines.board_state import check_slots, restore_slots, save_slots, slots_fingerprint
from kemu.machines.config import MachineConfig, MiB
from kemu.machines.console_watch import (
    HALT_MARK,
    PANIC_MARK,
    POWER_DOWN_MARK,
    ConsoleWatcher,
)
from kemu.machines.runtime import Outcome, RunState, VcpuGroup, VcpuThread
from kemu.memory import GuestMemory
from kemu.options.objects import ram_regions

COM1 = (0x3F8, 8)
COM1_IRQ = 4
RTC_IRQ = 8
I8042_DATA = 0x60
I8042_COMMAND = 0x64
I8042_IRQ = 1
CMOS = (0x70, 2)
ACPI_ADDR = 0xE0000             # RSDP and the tables, in the BIOS area (not RAM in e820)
MPTABLE_ADDR = 0xF0000
ACPI_SLEEP = (0x600, 2)         # hardware-reduced sleep control and status registers
ACPI_GED = (0x608, 4)           # the Generic Event Device's selector (power button)
ACPI_GED_IRQ = 12               # free: the guest has no PS/2 mouse (i8042.noaux)
VIRTIO_MMIO = (0xD0000000, 0x200)
#: IRQs (= I/O APIC pins = GSIs) of the virtio-mmio slots: 5 and up, skipping the
#: RTC's 8 (KVM special-cases GSI 8) and 12 (the PS/2 mouse's; the GED's here).
VIRTIO_IRQS = (5, 6, 7, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23)
PCIE_MMIO = (0xC0000000, 0x10000000)
PCIE_ECAM = (0xE0000000, 0x10000000)
#: INTA-D of the PCIe host bridge (taken from the virtio-mmio slots' IRQs with pcie=on).
PCIE_GSIS = (20, 21, 22, 23)
#: Where a device's MSI write lands (Intel SDM 11.11.1: 0xFEEx_xxxx).
MSI_WINDOW = (0xFEE00000, 0x100000)
RAM_MIN = 16 * MiB
RAM_MAX = 1 << 40
MAX_VCPUS = 64

KVM_CAP_TSC_DEADLINE_TIMER = 72
CPUID_1_ECX_TSC_DEADLINE = 1 << 24


@dataclass(frozen=True)
class VirtioSlot:
    """One virtio-mmio transport instance on the board."""

    index: int
    device: object

    @property
    def base(self) -> int:
        return VIRTIO_MMIO[0] + self.index * VIRTIO_MMIO[1]

    @property
    def irq(self) -> int:
        return VIRTIO_IRQS[self.index]

    @property
    def cmdline(self) -> str:
        """Linux's ``virtio_mmio.device=<size>@<base>:<irq>`` (virtio_mmio.c)."""
        return f"virtio_mmio.device={VIRTIO_MMIO[1]}@{self.base:#x}:{self.irq}"


class _LockedBus:
    """A bus whose accesses hold the board's lock (vCPU threads dispatch directly)."""

    def __init__(self, bus: Bus, lock: threading.RLock) -> None:
        self.bus = bus
        self.lock = lock
        self.name = bus.name

    def read(self, addr: int, size: int) -> int:
        with self.lock:
            return self.bus.read(addr, size)

    def write(self, addr: int, size: int, value: int) -> None:
        with self.lock:
            self.bus.write(addr, size, value)


class _MsiWindow:
    """0xFEE00000-0xFEEFFFFF as devices see it: a 32-bit write there is an MSI."""

    name = "msi"

    def __init__(self, board: MicroVm) -> None:
        self.board = board

    def read(self, offset: int, size: int) -> int:
        return 0xFFFFFFFF

    def write(self, offset: int, size: int, value: int) -> None:
        self.board.signal_msi(MSI_WINDOW[0] + offset, value)


class _Cpu:
    """A :class:`~kemu.accel.kvm.KvmVcpu` as :class:`VcpuThread` drives it."""

    def __init__(self, vcpu) -> None:
        self.vcpu = vcpu
        self.index = vcpu.index
        self.closed = False

    def run(self) -> Exit:
        return self.vcpu.run()

    def kick(self, final: bool = False) -> None:
        # A reboot may have closed this vCPU (its thread is paused, or is the one
        # rebooting): the thread gets the request with its new vCPU.
        if self.closed:
            return
        try:
            self.vcpu.kick()
        except (ValueError, OSError):
            if not self.closed:
                raise

    def wait_for_interrupt(self, timeout: float | None) -> None:
        self.vcpu.wait_for_interrupt(timeout)

    def request_system_event(self, kind: str) -> None:
        self.vcpu.request_system_event(kind)

    def registers(self) -> dict[str, int]:
        regs = self.vcpu.fd.get_regs()
        return {name: getattr(regs, name) for name, _t in regs._fields_}

    def close(self) -> None:
        self.closed = True
        self.vcpu.close()


def load_kernel_file(path) -> object:
    """A :class:`BzImage` or, for an ELF vmlinux, a :class:`PvhKernel`."""
    data = linux_x86.read_boot_file(path, "kernel")
    if linux_x86.is_bzimage(data):
        return linux_x86.BzImage.parse(data, f"kernel {path}")
    if data[:4] == b"\x7fELF":
        return linux_x86.parse_pvh_elf(data, f"kernel {path}")
    raise BootError(f"kernel {path}: neither a bzImage nor an ELF vmlinux")


class MicroVm:
    """One x86-64 microvm machine built from a :class:`MachineConfig`."""

    #: virtio-mmio.force-legacy's default here: off (kemu's microvm has spoken the
    #: modern interface from the start; QEMU's microvm documentation asks for it).
    virtio_legacy_default = False

    def __init__(self, config: MachineConfig, console: SerialBackend,
                 ram_fd: int | None = None) -> None:
        from kemu.accel.kvm import Kvm, install_kick_signal

        if not 1 <= config.smp <= MAX_VCPUS:
            raise ConfigError(f"-smp: the microvm board takes 1 to {MAX_VCPUS} CPUs")
        if not RAM_MIN <= config.memory <= RAM_MAX:
            raise ConfigError(f"-m: RAM must be between {RAM_MIN >> 20} MiB and "
                              f"{RAM_MAX >> 30} GiB")
        if config.memory % 4096:
            raise ConfigError("-m: RAM size must be a multiple of 4 KiB")
        if config.kernel is None:
            raise ConfigError("no kernel given (-kernel)")
        self.config = config
        self.console = console
        self.kernel = load_kernel_file(config.kernel)
        self.initrd = (linux_x86.read_boot_file(config.initrd, "initrd")
                       if config.initrd else None)
        #: The big machine lock: device state is touched under it only.
        self.lock = threading.RLock()
        # ram_fd: a snapshot's memory file, mapped private (a restored machine)
        self.memory = GuestMemory(ram_regions(config, linux_x86.ram_layout(config.memory),
                                              backing=ram_fd))
        self.mmio = Bus("mmio")
        self.pio = Bus("pio", 1 << 16)
        self.virtio_slots: list[VirtioSlot] = []
        self.vm = None
        self.cpus: list[_Cpu] = []
        # /dev/kvm problems surface here, as one AccelError line.
        self.kvm = Kvm()
        install_kick_signal()

        self.uart = Serial16550(self.irq_line(COM1_IRQ, "com1"), console.write, name="com1",
                                on_rx_space=console.pump, on_rx_discard=console.unreceive)
        console.device = self.uart
        self.pio.map(*COM1, self.uart)
        self.i8042 = I8042(self._guest_reset, self.irq_line(I8042_IRQ, "i8042"))
        self.pio.map(I8042_DATA, 1, self.i8042.data_port())
        self.pio.map(I8042_COMMAND, 1, self.i8042.command_port())
        #: -rtc: the CMOS RTC shows this clock's time (clock=vm stops while paused).
        self.rtc_clock = RtcClock(config.rtc)
        self.rtc = CmosRtc(now=self.rtc_clock.time)
        self.pio.map(*CMOS, self.rtc)
        self.acpi_sleep = AcpiSleep(self._guest_poweroff)
        self.pio.map(*ACPI_SLEEP, self.acpi_sleep)
        self.ged = AcpiGed(self.irq_line(ACPI_GED_IRQ, "ged"))
        self.pio.map(*ACPI_GED, self.ged)
        #: ACPI tables (the default); without them Linux needs CONFIG_X86_MPPARSE for the
        #: MP table and CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES for the virtio slots.
        self.acpi = bool(config.extra.get("acpi", True))
        #: pcie=on: PCI Express (QEMU's microvm: only with ACPI, else none).
        self.pci = None
        if config.extra.get("pcie") and self.acpi:
            self._add_pcie()

        #: The I/O thread: network and vsock backends, and the virtio doorbells.
        self.io_loop = IoLoop(self.lock, name="microvm-io")
        #: ioeventfd doorbells and resampling irqfds of the virtio slots (when KVM offers
        #: them and config.extra["eventfds"] is not False), attached to every new VM.
        self.ioeventfds: list[IoEventFd] = []
        self.irqfds: dict[int, ResampleIrqFd] = {}

        from kemu.machines.virtio_devices import attach_devices
        try:
            self.block_backends = attach_devices(self, config)
        except BaseException:
            self.io_loop.close()
            raise
        if config.extra.get("eventfds", True) is not False:
            self._make_eventfds()

        self.panic_message: str | None = None
        self._watcher = ConsoleWatcher({PANIC_MARK: self._on_panic, HALT_MARK: self._on_halt,
                                        POWER_DOWN_MARK: self._on_halt})
        console.add_tap(self._watcher.feed)
        self.outcome: Outcome | None = None
        self.vcpus = VcpuGroup()
        self._close_lock = threading.Lock()
        #: close() runs in two threads at once (the API's watcher and its caller's wait()).
        self._teardown_lock = threading.Lock()
        self.on_state: Callable[[RunState], None] = lambda s: None
        #: Called before a guest-initiated reset is carried out (the API's RESET event).
        self.on_reset: Callable[[], None] = lambda: None
        self._create_vm()

    # -- wiring --------------------------------------------------------------------------------
    def irq_line(self, gsi: int, name: str = "") -> IrqLine:
        """An interrupt line into the in-kernel irqchip's GSI ``gsi`` (of the current VM)."""
        def sink(level: bool) -> None:
            irqfd = self.irqfds.get(gsi)
            if irqfd is not None:
                irqfd.set_level(level)
                return
            vm = self.vm
            if vm is not None:
                vm.irq_line(gsi, level)
        return IrqLine(sink, name=name or f"gsi{gsi}")

    def _make_eventfds(self) -> None:
        """Doorbells (QueueNotify) through ioeventfd and slot interrupts through
        resampling irqfds, so virtio requests run on the I/O thread, not in vCPU exits."""
        from kemu.devices.virtio.mmio import QUEUE_NOTIFY, VirtioMmioTransport
        transports = [s for s in self.virtio_slots
                      if isinstance(s.device, VirtioMmioTransport) and s.device.device]
        if supports_ioeventfd(self.kvm):
            for slot in transports:
                t = slot.device
                self.ioeventfds += [
                    IoEventFd(self.io_loop, self.lock, slot.base + QUEUE_NOTIFY, i,
                              lambda t=t, i=i: t.notify(i))
                    for i in range(len(t.queues))]
        if supports_resample_irqfd(self.kvm):
            for slot in transports:
                line = slot.device.irq
                self.irqfds[slot.irq] = ResampleIrqFd(self.io_loop, self.lock, slot.irq,
                                                      lambda line=line: line.level)

    def _add_pcie(self) -> None:
        from kemu.devices.pci.host import Window
        from kemu.machines.pcie import PcieRootBus
        self.pci = PcieRootBus(self.mmio, PCIE_ECAM, [Window(False, PCIE_MMIO[0], *PCIE_MMIO)],
                               [self.irq_line(gsi, f"pcie-int{'abcd'[i]}")
                                for i, gsi in enumerate(PCIE_GSIS)])
        # Only devices' writes get here: the vCPUs' own APIC accesses stay in KVM.
        self.mmio.map(*MSI_WINDOW, _MsiWindow(self))

    def signal_msi(self, address: int, data: int) -> None:
        vm = self.vm
        if vm is not None:
            vm.signal_msi(address, data)

    @property
    def virtio_slot_count(self) -> int:
        return len(VIRTIO_IRQS) - (len(PCIE_GSIS) if self.pci is not None else 0)

    def add_virtio(self, device) -> VirtioSlot:
        """Map a virtio-mmio transport (or any slot-sized device) in the next free slot."""
        if len(self.virtio_slots) >= self.virtio_slot_count:
            raise ConfigError(f"too many virtio devices for the microvm board "
                              f"(at most {self.virtio_slot_count})")
        slot = VirtioSlot(len(self.virtio_slots), device)
        self.mmio.map(slot.base, VIRTIO_MMIO[1], device)
        self.virtio_slots.append(slot)
        return slot

    def virtio_irq(self, index: int) -> IrqLine:
        if index >= self.virtio_slot_count:
            raise ConfigError("too many virtio devices for the microvm board")
        return self.irq_line(VIRTIO_IRQS[index], f"virtio{index}")

    def kernel_cmdline(self) -> str:
        """The -append line; without ACPI plus the virtio slots, as QEMU's microvm."""
        slots = [] if self.acpi else [s.cmdline for s in self.virtio_slots]
        return " ".join([self.config.append, *slots]).strip()

    def acpi_tables(self) -> tuple[int, bytes]:
        """(RSDP address, the tables as written at :data:`ACPI_ADDR`)."""
        return acpi.build_tables(ACPI_ADDR, acpi.AcpiConfig(
            nr_cpus=self.config.smp, sleep_control_port=ACPI_SLEEP[0],
            sleep_status_port=ACPI_SLEEP[0] + 1,
            serial=(COM1[0], COM1_IRQ), i8042=(I8042_DATA, I8042_COMMAND, I8042_IRQ),
            rtc=(CMOS[0], RTC_IRQ), ged=(ACPI_GED[0], ACPI_GED_IRQ),
            virtio=[acpi.MmioDevice(s.base, VIRTIO_MMIO[1], s.irq)
                    for s in self.virtio_slots],
            pcie=acpi.PcieHost(PCIE_ECAM[0], PCIE_ECAM[1] // (1 << 20) - 1, *PCIE_MMIO,
                               PCIE_GSIS) if self.pci is not None else None))

    def mp_table(self) -> bytes:
        return mptable.build_mp_table(MPTABLE_ADDR, self.config.smp,
                                      mptable.level_triggered(s.irq for s in self.virtio_slots))

    # -- the VM ----------------------------------------------------------------------------------
    def _create_vm(self) -> None:
        """A fresh KVM VM with its irqchip, PIT, RAM and vCPUs (also on reboot)."""
        from kemu.accel.kvm import KvmVcpu
        from kemu.accel.kvm.x86_cpu import X86BootSetup, setup_x86_vm

        vm = self.kvm.create_vm()
        try:
            setup_x86_vm(vm, self.memory, irqchip=True, pit=True)
            for fd in [*self.ioeventfds, *self.irqfds.values()]:
                fd.attach(vm)
            # The boot tables go into RAM at load(): a restored machine's RAM is the guest's.
            self.boot = X86BootSetup.prepare(self.kvm, None, self.config.smp)
            if vm.check_extension(KVM_CAP_TSC_DEADLINE_TIMER):
                # The in-kernel LAPIC has the TSC-deadline timer; KVM leaves announcing
                # it to the VMM (Linux then skips calibrating the LAPIC timer).
                for e in self.boot.supported_cpuid:
                    if e.function == 1:
                        e.ecx |= CPUID_1_ECX_TSC_DEADLINE
            mmio = _LockedBus(self.mmio, self.lock)
            pio = _LockedBus(self.pio, self.lock)
            cpus = [_Cpu(KvmVcpu(vm, i, mmio, pio)) for i in range(self.config.smp)]
        except BaseException:
            vm.close()
            raise
        self.vm = vm
        self.cpus = cpus
        self._state_caps = None
        if self.memory.written is not None:
            # A reboot during a live migration: the old VM's log is gone, so every
            # page counts as written, and the new VM logs from here on.
            self.start_dirty_log()
            for region in self.memory.regions:
                self.memory.written.update(range(region.base // 4096, region.end // 4096))

    def _close_vm(self) -> None:
        with self._close_lock:          # wait() may run in two threads at once
            cpus, self.cpus = self.cpus, []
            vm, self.vm = self.vm, None
        for cpu in cpus:
            cpu.close()
        if vm is not None:
            vm.close()

    def load(self) -> None:
        """Kernel, initrd, command line, boot structures and vCPU entry state."""
        from kemu.accel.kvm.x86_cpu import setup_vcpu, write_gdt, write_identity_map

        write_gdt(self.memory)
        write_identity_map(self.memory)
        cmdline = self.kernel_cmdline()
        self.memory.write(MPTABLE_ADDR, self.mp_table())
        rsdp = 0
        if self.acpi:
            rsdp, tables = self.acpi_tables()
            if len(tables) > MPTABLE_ADDR - ACPI_ADDR:
                raise ConfigError("the ACPI tables do not fit below the MP table")
            self.memory.write(ACPI_ADDR, tables)
        e820 = linux_x86.e820_map(self.memory,
                                  reserved=[PCIE_ECAM] if self.pci is not None else [])
        if isinstance(self.kernel, linux_x86.BzImage):
            linux = linux_x86.load_bzimage(self.memory, self.kernel, cmdline, self.initrd, e820,
                                           acpi_rsdp=rsdp)
            setup_vcpu(self.cpus[0].vcpu.fd, self.boot, linux.entry, linux.boot_params)
        else:
            linux = linux_x86.load_pvh(self.memory, self.kernel, cmdline, self.initrd, e820,
                                       acpi_rsdp=rsdp)
            setup_vcpu(self.cpus[0].vcpu.fd, self.boot, linux.entry,
                       pvh_start_info=linux.boot_params)
        for cpu in self.cpus[1:]:
            setup_vcpu(cpu.vcpu.fd, self.boot, None)     # wait for INIT/SIPI
        self.linux = linux

    @property
    def cpu(self) -> _Cpu:
        """The boot CPU (the API reads its registers)."""
        return self.cpus[0]

    # -- events from devices and the console ----------------------------------------------------
    def _guest_reset(self) -> None:
        """The i8042 pulsed the reset line (from a vCPU thread, under the lock)."""
        self.cpus[0].request_system_event("reset")

    def _guest_poweroff(self) -> None:
        """ACPI S5 through the sleep control register (from a vCPU thread, under the lock)."""
        self.cpus[0].request_system_event("poweroff")

    def _on_panic(self, line: str) -> None:
        if self.panic_message is None:
            self.panic_message = line
            self.vcpus.end(Outcome("panic", 1, f"guest kernel panic: {line}"))

    def _on_halt(self, line: str) -> None:
        # Linux prints the line before its ACPI S5 write: -no-shutdown must apply here too.
        self.vcpus.guest_ended(Outcome("poweroff", 0))

    def _on_exit(self, exit: Exit) -> Outcome | None:
        """A vCPU thread's system event or error (on that thread)."""
        return self.vcpus.handle_exit(exit, self.config.no_reboot, self.on_reset,
                                      self._rebuild_vm)

    # -- reset -------------------------------------------------------------------------------
    def _rebuild_vm(self) -> None:
        """With every vCPU stopped: reset the devices, build a fresh VM, reload the
        kernel and hand the new vCPUs to the threads (reboot and host reset alike)."""
        self._reset_devices()
        self._replace_vm()
        self.load()
        for t, cpu in zip(self.vcpus.threads, self.cpus):
            t.cpu = cpu

    def _replace_vm(self) -> None:
        """A fresh VM for the stopped vCPUs, under the machine lock: a live migration's
        dirty log (:meth:`dirty_pages`) never finds the machine between two VMs."""
        with self.lock:
            self._close_vm()
            self._create_vm()

    def _reset_devices(self) -> None:
        with self.lock:
            self.uart.reset()
            self.i8042.reset()
            self.ged.reset()
            if self.pci is not None:
                self.pci.reset()

    def reset(self) -> None:
        """A hard reset from the host (QMP system_reset): reload and restart."""
        was_running = self.state == RunState.RUNNING
        if not self.pause():
            raise ConfigError("the vCPUs did not stop for the reset")
        self.vcpus.host_reset(self._rebuild_vm)
        if was_running:
            self.resume()

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self.load()
        self._start_threads()

    def _start_threads(self) -> None:
        self.vcpus.on_state = lambda state: self.on_state(state)
        for i, cpu in enumerate(self.cpus):
            self.vcpus.add(VcpuThread(cpu, lambda: None, self._on_exit, name=f"vcpu{i}"))
        self.vcpus.start(paused=self.config.start_paused)

    # -- snapshots (kemu.state's convention; kemu.snapshot writes and reads the files) ------------
    def state_fingerprint(self) -> dict:
        """What a saved state must have been made on: board, CPUs, RAM, devices in their slots."""
        return {"board": "microvm", "cpu": self.config.cpu, "smp": self.config.smp,
                "memory": self.config.memory, "acpi": self.acpi,
                "slots": slots_fingerprint(self.virtio_slots),
                **({"pci": self.pci.fingerprint()} if self.pci is not None else {})}

    def _caps(self):
        from kemu.accel.kvm.x86_state import Capabilities
        if self._state_caps is None:
            self._state_caps = Capabilities.probe(self.vm, self.cpus[0].vcpu.fd)
        return self._state_caps

    def _devices(self) -> dict:
        """The board's own devices by their name in the saved state."""
        return {"uart": self.uart, "i8042": self.i8042, "rtc": self.rtc,
                "acpi_sleep": self.acpi_sleep, "ged": self.ged}

    def save_state(self) -> dict:
        """The whole machine but RAM as plain data (paused, under the machine lock)."""
        from kemu.accel.kvm.x86_state import save_vcpu, save_vm
        from kemu.state import save_plain, to_plain
        if self.state != RunState.PAUSED or self.vm is None:
            raise ConfigError("save: the machine must be paused")
        caps = self._caps()
        cpus = []
        for cpu in self.cpus:
            cpu.vcpu.fd.complete_pending_io()
            cpus.append(to_plain(save_vcpu(cpu.vcpu.fd, caps)))
        return {
            "version": 1,
            "cpus": cpus,
            "vm": to_plain(save_vm(self.vm, pit=True)),
            "devices": {name: save_plain(dev) for name, dev in self._devices().items()},
            "virtio": save_slots(self.virtio_slots),
            **({"pci": self.pci.save()} if self.pci is not None else {}),
        }

    def vm_clock_ns(self, state: dict) -> int:
        """The guest's running time in :meth:`save_state`'s data (QEMU's VM CLOCK, in
        savevm's snapshot table): kvmclock, which counts from the VM's creation."""
        return int(state["vm"]["clock"])

    def start_restored(self, state: dict, paused: bool = False) -> None:
        """Start from :meth:`save_state`'s data with RAM already in place (no kernel load)."""
        self._restore(*self._parse_state(state))
        self.config.start_paused = paused
        self._start_threads()

    def load_state(self, state: dict) -> None:
        """Replace the paused machine's state with :meth:`save_state`'s data (RAM already
        in place): loadvm into a machine that has run.  As on a reset, the devices are
        reset and a fresh VM takes the saved vCPU and irqchip state (its kvmclock
        included: the guest's clock goes back to the snapshot's, as under QEMU)."""
        if self.state != RunState.PAUSED:
            raise ConfigError("loadvm: the machine must be paused")
        parsed = self._parse_state(state)       # a bad state changes nothing

        def rebuild() -> None:
            self._reset_devices()
            self._replace_vm()
            self._restore(*parsed)
            for t, cpu in zip(self.vcpus.threads, self.cpus):
                t.cpu = cpu
        self.vcpus.host_reset(rebuild)

    def _parse_state(self, state: dict) -> tuple[list, object, dict]:
        """:meth:`save_state`'s data checked against this machine: the vCPU and VM
        states, and the plain data (one :class:`StateError` line when it does not fit)."""
        from kemu.accel.kvm.x86_state import X86VcpuState, X86VmState
        from kemu.state import StateError, check_version, from_plain
        check_version("microvm board", state.get("version", 0))
        try:
            cpus = [from_plain(X86VcpuState, saved) for saved in state["cpus"]]
            vm_state = from_plain(X86VmState, state["vm"])
            matches = (len(cpus) == self.config.smp and set(state["devices"]) == set(self._devices())
                       and ("pci" in state) == (self.pci is not None))
            check_slots(self.virtio_slots, state["virtio"])
        except (KeyError, TypeError):
            raise StateError("saved state: corrupted (not a microvm machine state)") from None
        if not matches:
            raise StateError("saved state does not match the machine's CPUs and devices")
        return cpus, vm_state, state

    def _restore(self, cpus: list, vm_state, state: dict) -> None:
        """:meth:`_parse_state`'s result into the current (fresh) VM and the devices."""
        from kemu.accel.kvm.x86_state import restore_vcpu, restore_vm
        from kemu.state import restore_plain
        caps = self._caps()
        for cpu, saved in zip(self.cpus, cpus):
            restore_vcpu(cpu.vcpu.fd, saved, caps)
        with self.lock:
            # The interrupt controllers first; then the devices, which drive their
            # lines (fresh, low) to the levels they have now.
            restore_vm(self.vm, vm_state)
            for name, dev in self._devices().items():
                restore_plain(dev, state["devices"][name])
            restore_slots(self.virtio_slots, state["virtio"])
            if self.pci is not None:
                self.pci.restore(state["pci"])
            self.console.pump()        # input typed while the machine was being restored

    def start_dirty_log(self) -> None:
        """Live migration: KVM logs the pages the vCPUs write, kemu those its devices write."""
        for slot in self.vm.slots:
            self.vm.set_dirty_logging(slot, True)
        self.memory.track_writes(True)

    def dirty_pages(self) -> set[int]:
        """Guest-physical page numbers written since the last call (or the start)."""
        pages: set[int] = set()
        with self.lock:
            # No VM: the machine has ended (a reboot replaces the VM under this lock,
            # and the new VM counts every page as written).
            vm = self.vm
            for slot, region in (vm.slots.items() if vm is not None else ()):
                bitmap = vm.get_dirty_log(slot)
                first = region.guest_phys_addr // 4096
                words = memoryview(bitmap).cast("Q")
                for w, word in enumerate(words):
                    while word:
                        low = word & -word
                        pages.add(first + w * 64 + low.bit_length() - 1)
                        word ^= low
            pages |= self.memory.take_written()
        return pages

    def stop_dirty_log(self) -> None:
        self.memory.track_writes(False)
        vm = self.vm
        if vm is not None:
            for slot in vm.slots:
                vm.set_dirty_logging(slot, False)

    def pause(self, timeout: float | None = 10.0) -> bool:
        """Stop every vCPU at its next exit (a kick makes KVM_RUN return at once)."""
        paused = self.vcpus.pause(timeout)
        if paused:
            self.rtc_clock.pause()
        return paused

    def resume(self) -> None:
        """As QEMU's cont: the vCPUs run when it returns (query-status says so)."""
        self.rtc_clock.resume()
        self.vcpus.resume(wait=True)

    def powerdown(self) -> bool:
        """Press the ACPI power button (the GED); False without ACPI tables."""
        if not self.acpi:
            return False
        with self.lock:
            self.ged.press_power_button()
        return True

    def stop(self) -> None:
        self.vcpus.stop()

    def wait(self, timeout: float | None = None) -> Outcome | None:
        outcome = self.vcpus.wait(timeout)
        if outcome is None:
            return None
        self.close()
        self.outcome = outcome
        return outcome

    def close(self) -> None:
        """Flush and close the disks, release the VM (idempotent, from any thread)."""
        from kemu.backends.block import flush_and_close
        with self._teardown_lock:
            backends, self.block_backends = self.block_backends, []
            try:
                flush_and_close(backends)
            finally:
                if all(t.state == RunState.STOPPED for t in self.vcpus.threads):
                    self._close_vm()
                    for fd in [*self.ioeventfds, *self.irqfds.values()]:
                        fd.close()
                    self.ioeventfds, self.irqfds = [], {}
                    self.io_loop.close()
                    with self._close_lock:
                        if self.kvm.fd >= 0:
                            self.kvm.close()

    @property
    def state(self) -> RunState:
        return self.vcpus.state

    @property
    def _vcpu_thread(self) -> VcpuThread | None:
        """The boot CPU's thread (the API reports its host thread id)."""
        return self.vcpus.boot_thread

    def vcpu_thread_ids(self) -> list[int]:
        return self.vcpus.thread_ids()


def apic_ids_from_mp_table(data: bytes) -> list[int]:
    """The local APIC ids a guest would find in :meth:`MicroVm.mp_table`."""
    return [apic for apic, _flags in mptable.parse_mp_table(data)["cpus"]]

