"""The AArch64 ``virt`` board: address map, devices, device tree, boot.

The memory map follows QEMU's ``virt`` machine (hw/arm/virt.c), so guests
and device trees written for it work unchanged:

=============  ============  =================================
0x08000000     64 KiB        GICv2 distributor
0x08010000     64 KiB        GICv2 CPU interface
0x09000000     4 KiB         PL011 UART (SPI 1)
0x0a000000     32 x 0x200    virtio-mmio slots (SPI 16 + n)
0x40000000     -m            RAM
=============  ============  =================================
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from kemu.accel.base import Exit, InternalError, IoExit, SystemEvent, dispatch
from kemu.boot import fdt, linux_arm64
from kemu.boot.fdt import Cells, Node, reg64
from kemu.bus import Bus
from kemu.devices.arm_timer import NS_PER_TICK, GenericTimer, host_counter
from kemu.devices.base import IrqLine
from kemu.devices.gic import GicV2
from kemu.devices.pl011 import Pl011
from kemu.devices.psci import Psci
from kemu.devices.psci import SystemEvent as PsciEvent
from kemu.backends.serial import SerialBackend
from kemu.errors import ConfigError
from kemu.machines.config import MachineConfig, MiB
from kemu.machines.runtime import DeadlineKicker, Outcome, RunState, VcpuThread
from kemu.memory import GuestMemory, RamRegion

GIC_DIST = (0x08000000, 0x10000)
GIC_CPU = (0x08010000, 0x10000)
UART0 = (0x09000000, 0x1000)
VIRTIO_MMIO = (0x0A000000, 0x200)
VIRTIO_MMIO_SLOTS = 32
RAM_BASE = 0x40000000
RAM_MAX = 255 << 30
MMIO_WINDOW = (0x08000000, 0x38000000)  # everything the board maps below RAM

UART0_SPI = 1
VIRTIO_SPI_BASE = 16
NUM_IRQS = 128

# Timer PPIs (INTID - 16): secure phys 13, non-secure phys 14, virtual 11, hyp 10.
PPI_SEC_PHYS, PPI_PHYS, PPI_VIRT, PPI_HYP = 13, 14, 11, 10

PHANDLE_GIC = 1
PHANDLE_CLK = 2

GIC_FDT_SPI, GIC_FDT_PPI = 0, 1
IRQ_TYPE_LEVEL_HIGH = 4

PANIC_MARK = b"Kernel panic - not syncing"


@dataclass(frozen=True)
class VirtioSlot:
    """One virtio-mmio transport instance on the board."""

    index: int
    device: object  # a Device

    @property
    def base(self) -> int:
        return VIRTIO_MMIO[0] + self.index * VIRTIO_MMIO[1]

    @property
    def spi(self) -> int:
        return VIRTIO_SPI_BASE + self.index


class VirtMachine:
    """One ``virt`` machine built from a :class:`MachineConfig`."""

    def __init__(self, config: MachineConfig, console: SerialBackend) -> None:
        if config.smp != 1:
            raise ConfigError("the virt board supports -smp 1 for now")
        if config.memory < 16 * MiB or config.memory > RAM_MAX:
            raise ConfigError(f"-m: RAM must be between 16 MiB and {RAM_MAX >> 30} GiB")
        if config.memory % (2 * MiB):
            raise ConfigError("-m: RAM size must be a multiple of 2 MiB")
        if config.kernel is None:
            raise ConfigError("no kernel given (-kernel)")
        self.config = config
        self.console = console
        #: The big machine lock: device state is touched under it only.
        self.lock = threading.RLock()
        self.memory = GuestMemory([RamRegion(RAM_BASE, config.memory)])
        self.mmio = Bus("mmio")
        self.virtio_slots: list[VirtioSlot] = []

        self.cpu_irq = IrqLine(name="cpu0.irq")
        self.gic = GicV2([self.cpu_irq], NUM_IRQS)
        self.mmio.map(*GIC_DIST, self.gic.distributor())
        self.mmio.map(GIC_CPU[0], 0x2000, self.gic.cpu_interface())

        self.uart = Pl011(self.gic.spi_line(UART0_SPI), console.write,
                          on_rx_space=console.pump)
        console.device = self.uart
        self.mmio.map(*UART0, self.uart)

        self.vtimer = GenericTimer(self.gic.ppi_line(0, PPI_VIRT), name="vtimer")
        self.ptimer = GenericTimer(self.gic.ppi_line(0, PPI_PHYS), name="ptimer")
        self.psci = Psci(self._on_psci)

        from kemu.devices.virtio.input import power_button
        from kemu.machines.virtio_devices import attach_devices, attach_transport
        self.block_backends = attach_devices(self, config)
        # The power button (QMP system_powerdown), as QEMU's virt has one.
        self.power_button = power_button()
        attach_transport(self, self.power_button)

        self.image = linux_arm64.Arm64Image.load_file(config.kernel)
        self.initrd = (linux_arm64.read_boot_file(config.initrd, "initrd")
                       if config.initrd else None)
        self.layout = linux_arm64.plan_layout(self.image, RAM_BASE, config.memory,
                                              len(self.initrd or b""))
        self._panic_tail = b""
        self.panic_message: str | None = None
        console.add_tap(self._watch_console)
        self.outcome: Outcome | None = None
        self._vcpu_thread: VcpuThread | None = None
        self._kicker: DeadlineKicker | None = None
        self.cpu = None
        self.on_state: Callable[[RunState], None] = lambda s: None
        self._paused_at: int | None = None
        #: Called before a guest-initiated reset is carried out (the API's RESET event).
        self.on_reset: Callable[[], None] = lambda: None

    # -- device tree -------------------------------------------------------------------------
    def device_tree(self) -> bytes:
        cfg = self.config
        root = Node("", {
            "#address-cells": 2, "#size-cells": 2,
            "compatible": "linux,dummy-virt", "model": "kemu virt",
            "interrupt-parent": PHANDLE_GIC,
        })
        chosen = {"bootargs": cfg.append, "stdout-path": f"/pl011@{UART0[0]:x}"}
        if self.initrd:
            start = self.layout.initrd_addr
            chosen["linux,initrd-start"] = Cells(*fdt.u64_cells(start))
            chosen["linux,initrd-end"] = Cells(*fdt.u64_cells(start + len(self.initrd)))
        root.add(Node("chosen", chosen))
        root.add(Node(f"memory@{RAM_BASE:x}", {
            "device_type": "memory", "reg": reg64((RAM_BASE, cfg.memory))}))
        cpus = root.add(Node("cpus", {"#address-cells": 1, "#size-cells": 0}))
        for i in range(cfg.smp):
            cpus.add(Node(f"cpu@{i}", {"device_type": "cpu", "compatible": f"arm,{cfg.cpu}",
                                       "reg": i, "enable-method": "psci"}))
        root.add(Node("psci", {"compatible": ["arm,psci-1.0", "arm,psci-0.2", "arm,psci"],
                               "method": "hvc"}))
        root.add(Node(f"intc@{GIC_DIST[0]:x}", {
            "compatible": "arm,cortex-a15-gic", "#interrupt-cells": 3,
            "interrupt-controller": None,
            "reg": reg64((GIC_DIST[0], 0x1000), (GIC_CPU[0], 0x2000)),
            "phandle": PHANDLE_GIC}))
        ppi_flags = (((1 << cfg.smp) - 1) << 8) | IRQ_TYPE_LEVEL_HIGH
        root.add(Node("timer", {
            "compatible": ["arm,armv8-timer", "arm,armv7-timer"],
            "interrupts": Cells(GIC_FDT_PPI, PPI_SEC_PHYS, ppi_flags, GIC_FDT_PPI, PPI_PHYS,
                                ppi_flags, GIC_FDT_PPI, PPI_VIRT, ppi_flags, GIC_FDT_PPI,
                                PPI_HYP, ppi_flags),
            "always-on": None}))
        root.add(Node("apb-pclk", {"compatible": "fixed-clock", "#clock-cells": 0,
                                   "clock-frequency": 24_000_000,
                                   "clock-output-names": "clk24mhz", "phandle": PHANDLE_CLK}))
        root.add(Node(f"pl011@{UART0[0]:x}", {
            "compatible": ["arm,pl011", "arm,primecell"],
            "reg": reg64(UART0),
            "interrupts": Cells(GIC_FDT_SPI, UART0_SPI, IRQ_TYPE_LEVEL_HIGH),
            "clocks": Cells(PHANDLE_CLK, PHANDLE_CLK),
            "clock-names": ["uartclk", "apb_pclk"]}))
        for slot in self.virtio_slots:
            # The transport holds its interrupt high while InterruptStatus is
            # non-zero, so the slot is described as level-triggered.
            root.add(Node(f"virtio_mmio@{slot.base:x}", {
                "compatible": "virtio,mmio", "reg": reg64((slot.base, VIRTIO_MMIO[1])),
                "interrupts": Cells(GIC_FDT_SPI, slot.spi, IRQ_TYPE_LEVEL_HIGH),
                "dma-coherent": None}))
        return fdt.build(root)

    def add_virtio(self, device) -> VirtioSlot:
        """Map a virtio-mmio transport (or any slot-sized device) in the next free slot."""
        if len(self.virtio_slots) >= VIRTIO_MMIO_SLOTS:
            raise ConfigError("too many virtio devices for the virt board")
        slot = VirtioSlot(len(self.virtio_slots), device)
        self.mmio.map(slot.base, VIRTIO_MMIO[1], device)
        self.virtio_slots.append(slot)
        return slot

    def virtio_irq(self, index: int) -> IrqLine:
        return self.gic.spi_line(VIRTIO_SPI_BASE + index)

    # -- I/O dispatch -------------------------------------------------------------------------
    def _io(self, exit: IoExit) -> int | None:
        with self.lock:
            return dispatch(exit, self.mmio)

    def _hypercall(self, cpu: int, args: list[int]) -> int:
        with self.lock:
            return self.psci.call(cpu, *args)

    def _on_psci(self, event: PsciEvent) -> None:
        self.cpu.request_system_event(event.value)

    def _watch_console(self, data: bytes) -> None:
        if self.panic_message is not None:
            tail = self._panic_tail + data
            if b"\n" in tail:
                line = tail.split(b"\n", 1)[0]
                self.panic_message = line.decode(errors="replace").strip()
                self._stop_for_panic()
            else:
                self._panic_tail = tail[-512:]
            return
        tail = self._panic_tail + data
        i = tail.find(PANIC_MARK)
        if i >= 0:
            self.panic_message = ""
            self._panic_tail = tail[i:]
            if b"\n" in self._panic_tail:
                self._watch_console(b"")
        else:
            self._panic_tail = tail[-len(PANIC_MARK):]

    def _stop_for_panic(self) -> None:
        if self._vcpu_thread is not None:
            self._vcpu_thread.request(RunState.STOPPED, Outcome(
                "panic", 1, f"guest kernel panic: {self.panic_message}"))

    # -- lifecycle ---------------------------------------------------------------------------
    def _next_deadline(self) -> float | None:
        best = None
        for timer in (self.vtimer, self.ptimer):
            if timer.irq.level:
                continue
            d = timer.deadline_counter()
            if d is not None and (best is None or d < best):
                best = d
        if best is None:
            return None
        return best * NS_PER_TICK / 1e9

    def _create_cpu(self):
        from kemu.accel.tcg.aarch64 import Aarch64Cpu
        cpu = Aarch64Cpu(0, self.memory, [MMIO_WINDOW], self._io, self._hypercall,
                         self.vtimer, self.ptimer, model=self.config.cpu)
        self.cpu_irq.connect(cpu.set_irq)
        return cpu

    def load(self) -> None:
        dtb = self.device_tree()
        linux_arm64.load(self.memory, self.image, self.layout, self.initrd, dtb)

    def _on_exit(self, exit: Exit) -> Outcome | None:
        if isinstance(exit, SystemEvent):
            if exit.kind == "poweroff":
                return Outcome("poweroff", 0)
            if self.config.no_reboot:
                return Outcome("reset", 0)
            self.on_reset()
            self._reset()
            return None
        if isinstance(exit, InternalError):
            return Outcome("error", 1, f"guest stopped: {exit.message}")
        return None

    def _reset(self) -> None:
        with self.lock:
            self.gic.reset()
            self.uart.reset()
            self.vtimer.ctl = self.ptimer.ctl = 0
        self.load()
        new = self._create_cpu()
        new.on_timer_change = self._kicker.changed
        new.reset_for_linux(self.layout.kernel_addr, self.layout.dtb_addr)
        self.cpu = new
        self._vcpu_thread.cpu = new
        self._kicker.cpu = new

    def start(self) -> None:
        self.load()
        self.cpu = self._create_cpu()
        self.cpu.reset_for_linux(self.layout.kernel_addr, self.layout.dtb_addr)
        self._kicker = DeadlineKicker(self.cpu, self._next_deadline)
        self.cpu.on_timer_change = self._kicker.changed
        self._vcpu_thread = VcpuThread(self.cpu, self._next_deadline, self._on_exit)
        self._vcpu_thread.on_state = self.on_state
        self._kicker.start()
        self._vcpu_thread.start(paused=self.config.start_paused)

    def pause(self, timeout: float | None = 10.0) -> bool:
        """Stop the vCPU at its next safe point; the guest's clock stops too."""
        self._vcpu_thread.request(RunState.PAUSED)
        paused = self._vcpu_thread.wait_state(RunState.PAUSED, timeout)
        if paused and self._paused_at is None:
            self._paused_at = host_counter()
        return paused

    def resume(self) -> None:
        """Run again; the guest does not see the time spent paused (CNTVOFF grows)."""
        if self._paused_at is not None and self.cpu is not None:
            self.cpu.add_virtual_offset(host_counter() - self._paused_at)
            self._paused_at = None
        self._vcpu_thread.request(RunState.RUNNING)

    def powerdown(self) -> bool:
        """Press the power button; False when the guest has no driver for it."""
        with self.lock:
            return self.power_button.push()

    def reset(self) -> None:
        """A hard reset from the host (QMP system_reset): reload and restart."""
        was_running = self.state == RunState.RUNNING
        if not self.pause():
            raise ConfigError("the vCPU did not stop for the reset")
        self._paused_at = None
        self._reset()
        if was_running:
            self.resume()

    def stop(self) -> None:
        if self._vcpu_thread is not None:
            self._vcpu_thread.request(RunState.STOPPED)

    def wait(self, timeout: float | None = None) -> Outcome | None:
        if not self._vcpu_thread.join(timeout):
            return None
        self._kicker.stop()
        self.close()
        self.outcome = self._vcpu_thread.outcome
        return self.outcome

    def close(self) -> None:
        """Flush and close the disks (idempotent)."""
        from kemu.backends.block import flush_and_close
        backends, self.block_backends = self.block_backends, []
        flush_and_close(backends)

    @property
    def state(self) -> RunState:
        return self._vcpu_thread.state if self._vcpu_thread else RunState.CREATED
