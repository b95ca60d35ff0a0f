"""The AArch64 ``virt`` board: address map, devices, device tree, boot.

The memory map follows QEMU's ``virt`` machine (hw/arm/virt.c), so guests
and device trees written for it work unchanged:

=============  ============  =================================
0x00000000     2 x 64 MiB    CFI flash: firmware code, variables
0x08000000     64 KiB        GIC distributor (GICv2 or GICv3)
0x08010000     64 KiB        GICv2 CPU interface
0x08020000     4 KiB         GICv2m MSI frame (SPI 48-111; GICv2 only)
0x080a0000     123 x 128 KiB GICv3 redistributors (gic-version=3)
0x09000000     4 KiB         PL011 UART (SPI 1)
0x09010000     4 KiB         PL031 RTC (SPI 2)
0x09020000     0x18          fw_cfg (MMIO with DMA; -fw_cfg files)
0x0a000000     32 x 0x200    virtio-mmio slots (SPI 16 + n)
0x10000000     0x2eff0000    PCIe 32-bit MMIO window
0x3eff0000     64 KiB        PCIe I/O window
0x40000000     -m            RAM
0x4010000000   256 MiB       PCIe ECAM (buses 0-255; INTx on SPI 3-6)
0x8000000000   512 GiB       PCIe 64-bit MMIO window
=============  ============  =================================

PCI Express is QEMU's generic ECAM host bridge (:mod:`kemu.devices.pci`)
with the ``-device *-pci`` virtio devices on bus pcie.0 (virtio-pci modern;
MSI-X through the GICv2m frame, INTx on SPI 3-6 otherwise).

``-smp N`` (up to 8 with GICv2, 123 with GICv3: QEMU's first redistributor
region) gives N vCPUs, each on its own host thread running in parallel (see
:mod:`kemu.accel.tcg.coherence`).  As on QEMU's virt: MPIDR Aff0 is the CPU
index within a cluster of 8 (GICv2) or 16 (GICv3); CPU 0 starts at the
kernel, the others are off until the guest's PSCI CPU_ON; each CPU has its
own generic timers on its banked PPIs.  GICv2 (the default): each CPU sees
its own bank of the GIC's registers, SGIs go through GICD_SGIR.  GICv3
(``-M virt,gic-version=3``): a redistributor per CPU, the CPU interface as
the ICC_* system registers, SGIs through ICC_SGI1R_EL1, SPIs routed by
GICD_IROUTER; no ITS (PCI functions use INTx with GICv3).  Kernels (Image,
ELF, raw) and the device tree are placed as QEMU places them (:mod:`kemu.boot.arm64_boot`); ``-dtb FILE``
replaces the generated tree (:mod:`kemu.boot.dtb_file`).

Firmware (``-bios``, ``-drive if=pflash``: :mod:`kemu.machines.flash`) boots
as on QEMU's virt: CPU 0 starts at the flash's base at EL1 (the board offers
no EL2 or EL3 to the guest), every register 0; the device tree is at the
start of RAM; a ``-kernel``, ``-initrd`` and ``-append`` go to the firmware
through fw_cfg (the kernel gunzipped), as QEMU's arm_setup_firmware_boot.  The virtio-mmio
slots speak version 1 (legacy) by default, as QEMU 7.2's do.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable

from kemu.accel.base import Exit, IoExit, dispatch
from kemu.boot import arm64_boot, dtb_file, fdt, linux_arm64
from kemu.boot.fdt import Cells, Node, reg64
from kemu.bus import Bus
from kemu.devices.arm_timer import NS_PER_TICK, GenericTimer, host_counter
from kemu.devices.base import IrqLine
from kemu.devices.fw_cfg import REGISTERS_SIZE, FwCfg
from kemu.devices.gic import GicCpuInterface, GicDistributor, GicV2
from kemu.devices.gic import v3 as gicv3
from kemu.devices.gic.cpuif import GicV3CpuInterface
from kemu.devices.gic.redistributor import STRIDE as GICR_STRIDE, GicV3Redistributor
from kemu.devices.pl011 import Pl011
from kemu.devices.pl031 import Pl031
from kemu.devices.psci import Psci
from kemu.devices.psci import SystemEvent as PsciEvent
from kemu.backends.serial import SerialBackend
from kemu.errors import ConfigError
from kemu.machines import flash
from kemu.machines.board_state import check_slots, restore_slots, save_slots, slots_fingerprint
from kemu.machines.config import MachineConfig, MiB
from kemu.machines.rtc import AlarmTimer, RtcClock
from kemu.devices import psci as psci_fn
from kemu.machines.runtime import DeadlineKicker, Outcome, RunState, VcpuGroup, VcpuThread
from kemu.memory import GuestMemory
from kemu.options.objects import ram_regions

FDT_MAGIC = b"\xd0\x0d\xfe\xed"
GIC_DIST = (0x08000000, 0x10000)
GIC_CPU = (0x08010000, 0x10000)
GIC_V2M = (0x08020000, 0x1000)
#: As QEMU's virt: the GICv2m frame owns SPIs 48-111 (NUM_GICV2M_SPIS 64).
V2M_SPI_BASE, V2M_SPIS = 48, 64
GIC_REDIST = (0x080A0000, 0x00F60000)
UART0 = (0x09000000, 0x1000)
RTC = (0x09010000, 0x1000)
FW_CFG = (0x09020000, REGISTERS_SIZE)
VIRTIO_MMIO = (0x0A000000, 0x200)
VIRTIO_MMIO_SLOTS = 32
RAM_BASE = 0x40000000
RAM_MAX = 255 << 30
MMIO_WINDOW = (0x08000000, 0x38000000)  # everything the board maps below RAM
# PCIe as QEMU's virt with highmem (hw/arm/virt.c: VIRT_PCIE_*, VIRT_HIGH_PCIE_*).
PCIE_MMIO = (0x10000000, 0x2EFF0000)
PCIE_PIO = (0x3EFF0000, 0x10000)
PCIE_ECAM = (0x4010000000, 0x10000000)
PCIE_MMIO_HIGH = (0x8000000000, 0x8000000000)
PCIE_SPI_BASE = 3

UART0_SPI = 1
RTC_SPI = 2
VIRTIO_SPI_BASE = 16
#: INTIDs of the GIC: 32 internal and 256 SPIs, as QEMU's virt (GICD_TYPER.ITLinesNumber 8).
NUM_IRQS = 32 + 256

# Timer PPIs (INTID - 16): secure phys 13, non-secure phys 14, virtual 11, hyp 10.
PPI_SEC_PHYS, PPI_PHYS, PPI_VIRT, PPI_HYP = 13, 14, 11, 10
#: The PMU's overflow interrupt: PPI 7 (INTID 23), QEMU's VIRTUAL_PMU_IRQ.
PPI_PMU = 7

PHANDLE_GIC = 1
PHANDLE_CLK = 2
PHANDLE_V2M = 3
PHANDLE_CPU0 = 0x10

#: GICv2 has 8 CPU interfaces (IHI 0048B 1.3.1).
MAX_CPUS = 8
#: GICv3: as many redistributors as QEMU's first region holds.
MAX_CPUS_GICV3 = GIC_REDIST[1] // GICR_STRIDE

GIC_FDT_SPI, GIC_FDT_PPI = 0, 1
IRQ_TYPE_LEVEL_HIGH = 4

#: /chosen/kaslr-seed (a u64) and /chosen/rng-seed sizes, as QEMU's virt writes them.
KASLR_SEED_BYTES = 8
RNG_SEED_BYTES = 32

PANIC_MARK = b"Kernel panic - not syncing"


#: MPIDR_EL1 bit 31 is RES1 (Arm ARM D17.2.101); U (bit 30) is 0: a multiprocessor.
MPIDR_U_RES1 = 1 << 31


def psci_node() -> Node:
    """The psci node QEMU's virt writes (and adds to a -dtb file)."""
    return Node("psci", {"compatible": ["arm,psci-1.0", "arm,psci-0.2", "arm,psci"],
                         "method": "hvc", "cpu_suspend": psci_fn.CPU_SUSPEND_64,
                         "cpu_off": psci_fn.CPU_OFF, "cpu_on": psci_fn.CPU_ON_64,
                         "migrate": 0xC4000005})


def mpidr(index: int, gic_version: int = 2) -> int:
    """The affinity of CPU ``index`` as on QEMU's virt (virt_cpu_mp_affinity):
    clusters of 8 CPUs with GICv2 (its target lists), 16 with GICv3."""
    cluster = 16 if gic_version == 3 else 8
    return (index // cluster) << 8 | index % cluster


class _LockedSysregs:
    """The GICv3 CPU interface as a vCPU reaches it: under the machine lock."""

    def __init__(self, cpuif: GicV3CpuInterface, lock: threading.RLock) -> None:
        self.readable, self.writable = cpuif.readable, cpuif.writable
        self._cpuif = cpuif
        self._lock = lock

    def read(self, cpu: int, enc: tuple) -> int:
        with self._lock:
            return self._cpuif.read(cpu, enc)

    def write(self, cpu: int, enc: tuple, value: int) -> None:
        with self._lock:
            self._cpuif.write(cpu, enc, value)


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

    #: virtio-mmio.force-legacy's default here: on, as QEMU 7.2's virt (Version reads 1).
    virtio_legacy_default = True

    def __init__(self, config: MachineConfig, console: SerialBackend,
                 ram_fd: int | None = None) -> None:
        max_cpus = MAX_CPUS_GICV3 if config.gic_version == 3 else MAX_CPUS
        if not 1 <= config.smp <= max_cpus:
            raise ConfigError(f"-smp: the virt board takes 1 to {max_cpus} CPUs with "
                              f"gic-version={config.gic_version}"
                              + (" (gic-version=3 takes up to 123)" if max_cpus == MAX_CPUS
                                 else ""))
        if config.memory < 16 * MiB or config.memory > RAM_MAX:
            raise ConfigError(f"-m: RAM must be between 16 MiB and {RAM_MAX >> 30} GiB")
        if config.memory % (2 * MiB):
            raise ConfigError("-m: RAM size must be a multiple of 2 MiB")
        #: Firmware in flash0 (-bios, -drive if=pflash,unit=0): it boots, not -kernel.
        self.firmware = flash.has_firmware(config)
        if config.kernel is None and config.dumpdtb is None and not self.firmware:
            raise ConfigError("no kernel given (-kernel) and no firmware (-bios or "
                              "-drive if=pflash)")
        self.config = config
        self.console = console
        #: The host's random source (the device tree's seeds).
        self.random: Callable[[int], bytes] = os.urandom
        #: The big machine lock: device state is touched under it only.
        self.lock = threading.RLock()
        # ram_fd: a snapshot's memory file, mapped private (a restored machine)
        self.memory = GuestMemory(ram_regions(config, [(RAM_BASE, config.memory)],
                                              backing=ram_fd))
        # Nothing at an address is a bus error for the CPU (an external abort), as on QEMU's virt.
        self.mmio = Bus("mmio", decode_errors=True)
        self.virtio_slots: list[VirtioSlot] = []

        n = config.smp
        self.cpu_irqs = [IrqLine(name=f"cpu{i}.irq") for i in range(n)]
        self.gic_cpuif: _LockedSysregs | None = None
        if config.gic_version == 3:
            self.gic = gicv3.GicV3(self.cpu_irqs, [mpidr(i, 3) for i in range(n)])
            self._gic_views = [self.mmio] * n
            self.mmio.map(*GIC_DIST, self.gic.distributor())
            for i in range(n):
                self.mmio.map(GIC_REDIST[0] + i * GICR_STRIDE, GICR_STRIDE,
                              GicV3Redistributor(self.gic, i))
            self.gic_cpuif = _LockedSysregs(GicV3CpuInterface(self.gic), self.lock)
        else:
            self.gic = GicV2(self.cpu_irqs, NUM_IRQS)
            # Each CPU reaches its own bank of the GIC's registers at the same
            # addresses; the shared bus holds CPU 0's.
            self._gic_views = [self.mmio] + [Bus(f"cpu{i}-gic", decode_errors=True)
                                              for i in range(1, n)]
            for i, bus in enumerate(self._gic_views):
                bus.map(GIC_DIST[0], 0x1000, GicDistributor(self.gic, i))  # as QEMU's
                bus.map(GIC_CPU[0], 0x2000, GicCpuInterface(self.gic, i))

        self.uart = Pl011(self.gic.spi_line(UART0_SPI), console.write,
                          on_rx_space=console.pump)
        console.device = self.uart
        self.uart.polled_input = self.firmware     # EDK2 polls the UART, no RX interrupt
        self.mmio.map(*UART0, self.uart)

        # The PL031 RTC, counting from the host's clock as -rtc says; its
        # match alarm fires on a host timer under the machine lock.
        self.rtc_clock = RtcClock(config.rtc)
        self._rtc_alarm = AlarmTimer(lambda: self.rtc.alarm(), self.lock, name="pl031-alarm")
        self.rtc = Pl031(self.gic.spi_line(RTC_SPI), self.rtc_clock.now,
                         self.rtc_clock.start_time, set_alarm=self._rtc_alarm.set)
        self.mmio.map(*RTC, self.rtc)

        # QEMU's fw_cfg with the -fw_cfg files (QEMU's virt gives it no kernel
        # items without firmware: the kernel is loaded directly).
        self.fw_cfg = FwCfg(self.memory, nb_cpus=config.smp)
        for item in config.fw_cfg:
            self.fw_cfg.add_file(item.name, item.data())
        self._add_boot_options()
        self.mmio.map(*FW_CFG, self.fw_cfg)

        # The two CFI flash banks, as QEMU's virt always has them.
        self.flash = flash.build_banks(config, self._on_flash_romd)
        for bank in self.flash:
            self.mmio.map(bank.base, bank.size, bank.device)

        # Per-CPU timers on the CPU's banked PPIs; a vCPU thread drives them
        # from its MSR hooks, so their lines take the machine lock.
        self.timers = [(GenericTimer(self._locked(self.gic.ppi_line(i, PPI_VIRT)),
                                     name=f"cpu{i}.vtimer"),
                        GenericTimer(self._locked(self.gic.ppi_line(i, PPI_PHYS)),
                                     name=f"cpu{i}.ptimer")) for i in range(n)]
        self.psci = Psci(self._on_psci, cpus=psci_fn.CpuPowerControl(
            lambda: self.cpus, [mpidr(i, config.gic_version) for i in range(n)]))
        self._psci_caller = 0

        from kemu.devices.gicv2m import GicV2m
        from kemu.devices.pci.host import Window
        from kemu.machines.pcie import PcieRootBus
        if config.gic_version == 2:     # GICv3: no ITS yet, so INTx only
            self.v2m = GicV2m(self._pulse_spi, V2M_SPI_BASE, V2M_SPIS)
            self.mmio.map(*GIC_V2M, self.v2m)
        self.pci = PcieRootBus(self.mmio, PCIE_ECAM,
                               [Window(True, 0, PCIE_PIO[0], PCIE_PIO[1]),
                                Window(False, PCIE_MMIO[0], *PCIE_MMIO),
                                Window(False, PCIE_MMIO_HIGH[0], *PCIE_MMIO_HIGH)],
                               [self.gic.spi_line(PCIE_SPI_BASE + i) for i in range(4)])

        from kemu.devices.virtio.input import power_button
        from kemu.machines.virtio_devices import attach_devices, attach_transport
        #: close() runs in two threads at once (the API's watcher and its caller's wait()).
        self._teardown_lock = threading.Lock()
        #: (bootindex, Open Firmware path) of the -device ...,bootindex=N devices.
        self.boot_devices: list[tuple[int, str]] = []
        self.block_backends = attach_devices(self, config)
        self._add_boot_order()
        # The power button (QMP system_powerdown), as QEMU's virt has one.
        self.power_button = power_button()
        attach_transport(self, self.power_button)

        self.dtb_file = (linux_arm64.read_boot_file(config.dtb, "dtb", linux_arm64.DTB_MAX)
                         if config.dtb else None)
        if self.dtb_file is not None and self.dtb_file[:4] != FDT_MAGIC:
            raise ConfigError(f"-dtb {config.dtb}: not a flattened device tree (no d00dfeed magic)")
        self.initrd = None
        self.layout: arm64_boot.BootLayout | None = None
        if config.kernel is not None and self.firmware:
            # As QEMU's arm_setup_firmware_boot: the files to the firmware, untouched
            # but for the kernel's gzip layer.
            kernel_data = linux_arm64.inflate(
                linux_arm64.read_boot_file(config.kernel, "kernel"), f"kernel {config.kernel}")
            initrd = (linux_arm64.read_boot_file(config.initrd, "initrd")
                      if config.initrd else None)
            self.fw_cfg.add_kernel(kernel_data, initrd, config.append)
        elif config.kernel is not None:
            kernel = arm64_boot.load_kernel_file(config.kernel, RAM_BASE)
            if config.initrd and kernel.is_linux:   # QEMU passes an initrd to Linux only
                self.initrd = linux_arm64.read_boot_file(config.initrd, "initrd")
            self.layout = arm64_boot.plan_layout(kernel, RAM_BASE, config.memory,
                                                 len(self.initrd or b""))
        self._panic_tail = b""
        self.panic_message: str | None = None
        console.add_tap(self._watch_console)
        self.outcome: Outcome | None = None
        self.vcpus = VcpuGroup()
        self._kickers: list[DeadlineKicker] = []
        self.cpus: list = []
        self.on_state: Callable[[RunState], None] = lambda s: None
        self._paused_at: int | None = None
        #: Called before a guest-initiated reset is carried out (the API's RESET event).
        self.on_reset: Callable[[], None] = lambda: None

    # -- device tree -------------------------------------------------------------------------
    def device_tree(self) -> bytes:
        """The device tree the guest gets: -dtb FILE as given, else the board's own."""
        if self.dtb_file is None:
            return self.generated_device_tree()
        initrd = None
        if self.initrd and self.layout is not None:
            initrd = (self.layout.initrd_addr, self.layout.initrd_addr + len(self.initrd))
        return dtb_file.apply_boot_fixups(self.dtb_file, f"-dtb {self.config.dtb}", RAM_BASE,
                                          self.config.memory, self.config.append, initrd,
                                          [psci_node()])

    def generated_device_tree(self) -> bytes:
        cfg = self.config
        root = Node("", {
            "#address-cells": 2, "#size-cells": 2,
            "compatible": "linux,dummy-virt", "model": "linux,dummy-virt",
            "interrupt-parent": PHANDLE_GIC,
        })
        chosen = {"bootargs": cfg.append, "stdout-path": f"/pl011@{UART0[0]:x}"}
        # As QEMU's virt (create_randomness): a 64-bit KASLR seed and 32 bytes
        # for the guest's RNG, fresh from the host's random source at each load.
        seed = self.random(KASLR_SEED_BYTES + RNG_SEED_BYTES)
        chosen["kaslr-seed"] = seed[:KASLR_SEED_BYTES]
        chosen["rng-seed"] = seed[KASLR_SEED_BYTES:]
        if self.initrd and self.layout is not None:
            start = self.layout.initrd_addr
            chosen["linux,initrd-start"] = Cells(*fdt.u64_cells(start))
            chosen["linux,initrd-end"] = Cells(*fdt.u64_cells(start + len(self.initrd)))
        root.add(Node("chosen", chosen))
        root.add(Node(f"memory@{RAM_BASE:x}", {
            "device_type": "memory", "reg": reg64((RAM_BASE, cfg.memory))}))
        cpus = root.add(Node("cpus", {"#address-cells": 1, "#size-cells": 0}))
        if cfg.smp > 1:
            # As QEMU's virt: one socket, one cluster, a core per CPU.
            cluster = Node("cluster0", {})
            for i in range(cfg.smp):
                cluster.add(Node(f"core{i}", {"cpu": PHANDLE_CPU0 + i}))
            cpus.add(Node("cpu-map", {})).add(Node("socket0", {})).add(cluster)
        for i in range(cfg.smp):
            props = {"device_type": "cpu", "compatible": f"arm,{cfg.cpu}",
                     "reg": mpidr(i, cfg.gic_version),
                     "phandle": PHANDLE_CPU0 + i}
            if cfg.smp > 1:
                props["enable-method"] = "psci"
            cpus.add(Node(f"cpu@{i}", props))
        root.add(psci_node())
        root.add(self._gic_node())
        ppi_flags = IRQ_TYPE_LEVEL_HIGH
        if cfg.gic_version == 2:   # GICv2 only: the PPI's CPU mask
            ppi_flags |= ((1 << cfg.smp) - 1) << 8
        root.add(Node("timer", {
            "compatible": ["arm,armv8-timer", "arm,armv7-timer"],
            "interrupts": Cells(GIC_FDT_PPI, PPI_SEC_PHYS, ppi_flags, GIC_FDT_PPI, PPI_PHYS,
                                ppi_flags, GIC_FDT_PPI, PPI_VIRT, ppi_flags, GIC_FDT_PPI,
                                PPI_HYP, ppi_flags),
            "always-on": None}))
        # As QEMU's virt (fdt_add_pmu_nodes) for a CPU with a PMU.
        root.add(Node("pmu", {"compatible": "arm,armv8-pmuv3",
                              "interrupts": Cells(GIC_FDT_PPI, PPI_PMU, ppi_flags)}))
        root.add(Node("apb-pclk", {"compatible": "fixed-clock", "#clock-cells": 0,
                                   "clock-frequency": 24_000_000,
                                   "clock-output-names": "clk24mhz", "phandle": PHANDLE_CLK}))
        root.add(Node(f"pl011@{UART0[0]:x}", {
            "compatible": ["arm,pl011", "arm,primecell"],
            "reg": reg64(UART0),
            "interrupts": Cells(GIC_FDT_SPI, UART0_SPI, IRQ_TYPE_LEVEL_HIGH),
            "clocks": Cells(PHANDLE_CLK, PHANDLE_CLK),
            "clock-names": ["uartclk", "apb_pclk"]}))
        root.add(Node(f"pl031@{RTC[0]:x}", {
            "compatible": ["arm,pl031", "arm,primecell"],
            "reg": reg64(RTC),
            "interrupts": Cells(GIC_FDT_SPI, RTC_SPI, IRQ_TYPE_LEVEL_HIGH),
            "clocks": PHANDLE_CLK, "clock-names": "apb_pclk"}))
        root.add(Node(f"flash@{flash.FLASH_BASE:x}", {
            "compatible": "cfi-flash", "bank-width": 4,
            "reg": reg64(*((bank.base, bank.size) for bank in self.flash))}))
        root.add(Node(f"fw-cfg@{FW_CFG[0]:x}", {
            "compatible": "qemu,fw-cfg-mmio", "reg": reg64(FW_CFG), "dma-coherent": None}))
        root.add(self._pcie_node())
        for slot in self.virtio_slots:
            # The transport holds its interrupt high while InterruptStatus is
            # non-zero, so the slot is described as level-triggered.
            root.add(Node(f"virtio_mmio@{slot.base:x}", {
                "compatible": "virtio,mmio", "reg": reg64((slot.base, VIRTIO_MMIO[1])),
                "interrupts": Cells(GIC_FDT_SPI, slot.spi, IRQ_TYPE_LEVEL_HIGH),
                "dma-coherent": None}))
        return fdt.build(root)

    def _pcie_node(self) -> Node:
        """The host bridge as QEMU's virt describes it (create_pcie)."""
        irq_map = []
        for slot in range(4):
            for pin in range(1, 5):
                spi = PCIE_SPI_BASE + (slot + pin - 1) % 4
                irq_map += [slot << 11, 0, 0, pin, PHANDLE_GIC, 0, 0,
                            GIC_FDT_SPI, spi, IRQ_TYPE_LEVEL_HIGH]
        return Node(f"pcie@{PCIE_MMIO[0]:x}", {
            "interrupt-map-mask": Cells(0x1800, 0, 0, 7),
            "interrupt-map": Cells(*irq_map),
            "#interrupt-cells": 1,
            "ranges": Cells(0x1000000, 0, 0, *fdt.u64_cells(PCIE_PIO[0]),
                            *fdt.u64_cells(PCIE_PIO[1]),
                            0x2000000, *fdt.u64_cells(PCIE_MMIO[0]), *fdt.u64_cells(PCIE_MMIO[0]),
                            *fdt.u64_cells(PCIE_MMIO[1]),
                            0x3000000, *fdt.u64_cells(PCIE_MMIO_HIGH[0]),
                            *fdt.u64_cells(PCIE_MMIO_HIGH[0]), *fdt.u64_cells(PCIE_MMIO_HIGH[1])),
            "reg": reg64(PCIE_ECAM),
            **({"msi-map": Cells(0, PHANDLE_V2M, 0, 0x10000)}
               if self.config.gic_version == 2 else {}),
            "dma-coherent": None,
            "bus-range": Cells(0, PCIE_ECAM[1] // (1 << 20) - 1),
            "linux,pci-domain": 0,
            "#size-cells": 2, "#address-cells": 3,
            "device_type": "pci", "compatible": "pci-host-ecam-generic"})

    def _pulse_spi(self, spi: int) -> None:
        """An MSI through the GICv2m frame: an edge on ``spi``."""
        self.gic.set_spi(spi, True)
        self.gic.set_spi(spi, False)

    def _on_flash_romd(self, bank: "flash.FlashBank", romd: bool) -> None:
        """A bank enters or leaves read-array mode: every vCPU maps its array for
        reads again, or sends reads to the device; code from changed pages is dropped."""
        changed = None
        if romd and bank.dirty:
            changed = (bank.base + bank.dirty[0], bank.base + bank.dirty[1])
        for cpu in self.cpus:
            cpu.set_romd(bank.base, romd, changed)

    def _add_boot_options(self) -> None:
        """-boot as QEMU's fw_cfg gives it to the firmware: the boot menu, its wait
        and the reboot timeout (the boot order comes with the devices)."""
        import struct
        from kemu.devices.fw_cfg import FW_CFG_BOOT_MENU
        boot = self.config.extra.get("boot", {})
        self.fw_cfg.add_item(FW_CFG_BOOT_MENU, struct.pack("<H", int(boot.get("menu", False))))
        if "splash-time" in boot:
            self.fw_cfg.add_file("etc/boot-menu-wait",
                                 struct.pack("<H", max(0, boot["splash-time"])))
        self.fw_cfg.add_file("etc/boot-fail-wait",
                             struct.pack("<i", boot.get("reboot-timeout", -1)))

    def _add_boot_order(self) -> None:
        """QEMU's "bootorder" file: the bootindex devices' paths by index, one a line,
        NUL-terminated; with -boot strict=on a last line HALT (when there are any)."""
        paths = [path for _, path in sorted(self.boot_devices)]
        if not paths:
            self.fw_cfg.add_file("bootorder", b"")
            return
        if self.config.extra.get("boot", {}).get("strict"):
            paths.append("HALT")
        self.fw_cfg.add_file("bootorder", "\n".join(paths).encode() + b"\0")

    def _gic_node(self) -> Node:
        """The interrupt controller as QEMU's virt describes it (create_gic)."""
        props = {"#interrupt-cells": 3, "interrupt-controller": None, "phandle": PHANDLE_GIC}
        if self.config.gic_version == 3:
            # One redistributor region; no maintenance interrupt (no EL2 for
            # the guest, as QEMU without virtualization=on); no ITS.
            props.update({"compatible": "arm,gic-v3", "#redistributor-regions": 1,
                          "reg": reg64(GIC_DIST, GIC_REDIST),
                          "#address-cells": 2, "#size-cells": 2, "ranges": None})
        else:
            # As QEMU's: the GICv2m MSI frame is a child (two address cells, which the
            # PCIe interrupt-map's parent unit addresses have too).
            props.update({"compatible": "arm,cortex-a15-gic",
                          "reg": reg64((GIC_DIST[0], 0x1000), (GIC_CPU[0], 0x2000)),
                          "#address-cells": 2, "#size-cells": 2, "ranges": None})
        node = Node(f"intc@{GIC_DIST[0]:x}", props)
        if self.config.gic_version == 2:
            node.add(Node(f"v2m@{GIC_V2M[0]:x}", {
                "compatible": "arm,gic-v2m-frame", "msi-controller": None,
                "reg": reg64(GIC_V2M), "phandle": PHANDLE_V2M}))
        return node

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
    def _locked(self, line: IrqLine) -> IrqLine:
        """``line`` driven under the machine lock (for sources outside MMIO dispatch)."""
        def sink(level: bool) -> None:
            with self.lock:
                line.set(level)
        return IrqLine(sink, name=line.name)

    def _io_for(self, cpu: int) -> Callable[[IoExit], int | None]:
        """The MMIO dispatch of one CPU: its own GIC bank, the shared bus otherwise."""
        bus = self._gic_views[cpu]

        def io(exit: IoExit) -> int | None:
            with self.lock:
                if GIC_DIST[0] <= exit.addr < GIC_CPU[0] + GIC_CPU[1]:
                    return dispatch(exit, bus)
                return dispatch(exit, self.mmio)
        return io

    def _hypercall(self, cpu: int, args: list[int]) -> int:
        with self.lock:
            self._psci_caller = cpu
            return self.psci.call(cpu, *args)

    def _on_psci(self, event: PsciEvent) -> None:
        self.cpus[self._psci_caller].request_system_event(event.value)

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
        self.vcpus.end(Outcome("panic", 1, f"guest kernel panic: {self.panic_message}"))

    # -- lifecycle ---------------------------------------------------------------------------
    def _deadline_of(self, index: int) -> Callable[[], float | None]:
        """The next timer deadline (monotonic seconds) of CPU ``index``, or None."""
        timers = self.timers[index]

        def next_deadline() -> float | None:
            best = None
            for timer in timers:
                if timer.irq.level:
                    continue
                d = timer.deadline_counter()
                if d is not None and (best is None or d < best):
                    best = d
            best_s = None if best is None else best * NS_PER_TICK / 1e9
            pmu = self.cpus[index].pmu.deadline() if index < len(self.cpus) else None
            if pmu is not None and (best_s is None or pmu < best_s):
                best_s = pmu
            return best_s
        return next_deadline

    def _create_cpus(self) -> list:
        """Fresh vCPUs: CPU 0 at the kernel entry, the others off until CPU_ON."""
        from kemu.accel.tcg.aarch64 import Aarch64Cpu
        from kemu.accel.tcg.coherence import CoherenceDomain
        assert self.layout is not None or self.firmware, \
            "a machine made for dumpdtb does not run"
        n = self.config.smp
        domain = CoherenceDomain() if n > 1 else None
        cpus = []
        for i in range(n):
            vtimer, ptimer = self.timers[i]
            cpu = Aarch64Cpu(i, self.memory, [MMIO_WINDOW, PCIE_ECAM, PCIE_MMIO_HIGH],
                             self._io_for(i), self._hypercall,
                             vtimer, ptimer, model=self.config.cpu,
                             mpidr=(MPIDR_U_RES1 | mpidr(i, self.config.gic_version)
                                    if n > 1 else None),
                             domain=domain, powered_on=i == 0,
                             pmu_irq=self._locked(self.gic.ppi_line(i, PPI_PMU)),
                             gicv3=self.gic_cpuif,
                             rom_devices=tuple((b.base, b.size, b.host_address)
                                               for b in self.flash))
            self.cpu_irqs[i].connect(cpu.set_irq)
            if self.layout is None:
                cpu.reset_for_firmware(flash.FLASH_BASE)
            else:
                cpu.reset_for_linux(self.layout.entry, self.layout.x0)
            cpus.append(cpu)
        return cpus

    def load(self) -> None:
        dtb = self.device_tree()
        if self.layout is None:
            assert self.firmware, "a machine made for dumpdtb does not run"
            # As QEMU's virt for firmware: the device tree at the start of RAM.
            if len(dtb) > self.config.memory:
                raise ConfigError("the device tree does not fit in RAM")
            self.memory.write(RAM_BASE, dtb)
            return
        arm64_boot.load(self.memory, self.layout, self.initrd, dtb)

    def _on_exit(self, exit: Exit) -> Outcome | None:
        return self.vcpus.handle_exit(exit, self.config.no_reboot, self.on_reset, self._reset)

    def _reset(self) -> None:
        """With every other vCPU stopped (guest or host reset): reset devices,
        reload, fresh vCPUs."""
        with self.lock:
            self.gic.reset()
            self.uart.reset()
            self.rtc.reset()
            self.fw_cfg.reset()
            for bank in self.flash:
                bank.device.reset()
            self.pci.reset()
            for vtimer, ptimer in self.timers:
                vtimer.ctl = ptimer.ctl = 0
        self.load()
        self.cpus = self._create_cpus()
        for t, k, cpu in zip(self.vcpus.threads, self._kickers, self.cpus):
            cpu.on_timer_change = k.changed
            t.cpu = k.cpu = cpu

    def start(self) -> None:
        self.load()
        self.cpus = self._create_cpus()
        # the guest's virtual counter at boot: VM CLOCK (the guest's running time) from here
        self._boot_vcount = host_counter() - self.timers[0][0].offset
        self._start_threads()

    # -- snapshots (kemu.state's convention; kemu.snapshot writes and reads the files) ------------
    def state_fingerprint(self) -> dict:
        """What a saved state must have been made on: board, CPUs, RAM, devices in their slots."""
        out = {"board": "virt", "cpu": self.config.cpu, "smp": self.config.smp,
               "memory": self.config.memory, "slots": slots_fingerprint(self.virtio_slots)}
        if self.pci.transports:
            # PCI functions by devfn and vendor/device ID (only then: older states match)
            out["pci"] = self.pci.fingerprint()
        return out

    def vm_clock_ns(self, state: dict) -> int:
        """The guest's running time in :meth:`save_state`'s data (QEMU's VM CLOCK,
        in savevm's snapshot table): the boot vCPU's virtual counter since boot."""
        from kemu.devices.arm_timer import CNTFRQ
        ticks = int(state["vcount"][0]) - int(state.get("boot_vcount", 0))
        return ticks * 1_000_000_000 // CNTFRQ

    def engine_id(self) -> str:
        """The TCG engine build the saved vCPU blobs belong to."""
        from kemu.accel.tcg.aarch64 import engine_build
        return engine_build()

    def save_state(self) -> dict:
        """The whole machine but RAM as plain data (paused, under the machine lock)."""
        from kemu.state import save_plain
        if self.firmware:
            raise ConfigError("save: the firmware's flash has no saved state yet")
        if self.state not in (RunState.PAUSED, RunState.CREATED) or self._paused_at is None:
            raise ConfigError("save: the machine must be paused")
        return {
            "version": 1,
            # the guest's virtual counter when it stopped: it goes on from there
            "vcount": [self._paused_at - cpu.vtimer.offset for cpu in self.cpus],
            "boot_vcount": getattr(self, "_boot_vcount", 0),
            "cpus": [save_plain(cpu) for cpu in self.cpus],
            "timers": [[save_plain(v), save_plain(p)] for v, p in self.timers],
            "uart": save_plain(self.uart), "rtc": save_plain(self.rtc),
            "fw_cfg": save_plain(self.fw_cfg),
            "virtio": save_slots(self.virtio_slots),
            "gic": save_plain(self.gic),
            "pci": self.pci.save(),
        }

    def start_restored(self, state: dict, paused: bool = False) -> None:
        """Start from :meth:`save_state`'s data with RAM already in place (no kernel load)."""
        self._restore(state)
        self.config.start_paused = paused
        self._start_threads()

    def load_state(self, state: dict) -> None:
        """Replace the paused machine's state with :meth:`save_state`'s data (RAM
        already in place): loadvm into a machine that has run.  Fresh vCPUs (and so
        an empty translation cache) take the saved context; the guest's clock goes
        on from the saved one when the machine resumes."""
        if self.state != RunState.PAUSED:
            raise ConfigError("loadvm: the machine must be paused")

        def rebuild() -> None:
            now = self._restore(state)
            for t, k, cpu in zip(self.vcpus.threads, self._kickers, self.cpus):
                cpu.on_timer_change = k.changed
                t.cpu = k.cpu = cpu
            self._paused_at = now          # resume() hides the time from here on
        self.vcpus.host_reset(rebuild)

    def _restore(self, state: dict) -> int:
        """Fresh vCPUs and every device from saved state; returns the host counter
        the guest's virtual counters were set against."""
        from kemu.state import StateError, check_version, restore_plain
        check_version("virt board", state.get("version", 0))
        n = self.config.smp
        if len(state["cpus"]) != n or len(state["timers"]) != n:
            raise StateError("saved state does not match the machine's CPUs and devices")
        check_slots(self.virtio_slots, state["virtio"])
        cpus = self._create_cpus()
        now = host_counter()
        with self.lock:
            # The interrupt controller first, its inputs low; then the devices, which
            # drive their lines (fresh, low) to the levels they have now.
            restore_plain(self.gic, state["gic"])
            self.gic.forget_input_levels()
            for i, cpu in enumerate(cpus):
                vtimer, ptimer = self.timers[i]
                # CNTVOFF such that the guest's virtual counter resumes where it stopped
                vtimer.offset = now - int(state["vcount"][i])
                restore_plain(vtimer, state["timers"][i][0])
                restore_plain(ptimer, state["timers"][i][1])
                restore_plain(cpu, state["cpus"][i])
            self.cpus = cpus
            self._boot_vcount = int(state.get("boot_vcount", state["vcount"][0]))
            restore_plain(self.uart, state["uart"])
            restore_plain(self.rtc, state["rtc"])
            if "fw_cfg" in state:
                restore_plain(self.fw_cfg, state["fw_cfg"])
            restore_slots(self.virtio_slots, state["virtio"])
            pci = state.get("pci")
            if pci is not None or self.pci.transports:
                self.pci.restore(pci)
            self.console.pump()        # input typed while the machine was being restored
        return now

    def _start_threads(self) -> None:
        self.vcpus.on_state = lambda state: self.on_state(state)
        for i, cpu in enumerate(self.cpus):
            deadline = self._deadline_of(i)
            kicker = DeadlineKicker(cpu, deadline, name=f"vcpu{i}-timer")
            cpu.on_timer_change = kicker.changed
            self._kickers.append(kicker)
            self.vcpus.add(VcpuThread(cpu, deadline, self._on_exit, name=f"vcpu{i}"))
        for k in self._kickers:
            k.start()
        self.vcpus.start(paused=self.config.start_paused)

    @property
    def cpu(self):
        """The boot CPU (the API reads its registers)."""
        return self.cpus[0] if self.cpus else None

    @property
    def _vcpu_thread(self) -> VcpuThread | None:
        return self.vcpus.boot_thread

    def vcpu_thread_ids(self) -> list[int]:
        return self.vcpus.thread_ids()

    def pause(self, timeout: float | None = 10.0) -> bool:
        """Stop every vCPU at its next block start; the guest's clock stops too."""
        paused = self.vcpus.pause(timeout)
        if paused and self._paused_at is None:
            self._paused_at = host_counter()
            self.rtc_clock.pause()
        return paused

    def resume(self) -> None:
        """Run again; the guest does not see the time spent paused (CNTVOFF grows).
        As QEMU's cont, the vCPUs run when it returns (query-status says so)."""
        if self._paused_at is not None:
            hidden = host_counter() - self._paused_at
            for cpu in self.cpus:
                cpu.add_virtual_offset(hidden)
            self._paused_at = None
        self.rtc_clock.resume()
        self.vcpus.resume(wait=True)

    def powerdown(self) -> bool:
        """Press the power button; False when the guest has no driver for it."""
        with self.lock:
            return self.power_button.push()

    def reset(self) -> None:
        """A hard reset from the host (QMP system_reset): reload and restart."""
        was_running = self.state == RunState.RUNNING
        if not self.pause():
            raise ConfigError("the vCPUs did not stop for the reset")
        self._paused_at = None
        self.vcpus.host_reset(self._reset)
        if was_running:
            self.resume()

    def stop(self) -> None:
        self.vcpus.stop()

    def wait(self, timeout: float | None = None) -> Outcome | None:
        outcome = self.vcpus.wait(timeout)
        if outcome is None:
            return None
        for k in self._kickers:
            k.stop()
        self._rtc_alarm.cancel()
        self.close()
        self.outcome = outcome
        return outcome

    def close(self) -> None:
        """Flush and close the disks (idempotent, from any thread)."""
        from kemu.backends.block import flush_and_close
        with self._teardown_lock:
            backends, self.block_backends = self.block_backends, []
            flush_and_close(backends)
            for bank in self.flash:
                bank.close()

    @property
    def state(self) -> RunState:
        return self.vcpus.state


def dump_device_tree(config: MachineConfig) -> None:
    """QEMU's ``-machine dumpdtb=FILE``: the device tree the guest would get, to a file."""
    from kemu.backends.serial import SerialBackend
    if config.machine != "virt":
        raise ConfigError(f"dumpdtb: the {config.machine} board has no device tree")
    machine = VirtMachine(config, SerialBackend(lambda data: None))
    try:
        dtb = machine.device_tree()
    finally:
        machine.close()
    try:
        config.dumpdtb.write_bytes(dtb)
    except OSError as e:
        raise ConfigError(f"dumpdtb: cannot write {config.dumpdtb}: {e.strerror}") from None
