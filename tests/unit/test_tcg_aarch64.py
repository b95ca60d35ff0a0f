"""The Unicorn AArch64 vCPU: exception entry, PSCI, the timer, interrupts, WFI.

Tiny guests are assembled at test time with binutils-aarch64-linux-gnu.
"""

import shutil
import struct
import subprocess
import threading
import time

import pytest
from unicorn import UC_ARCH_ARM64, UC_MODE_ARM, Uc
from unicorn import arm64_const as A

from kemu.accel.base import Halted, InternalError, MmioRead, MmioWrite, SystemEvent
from kemu.accel.tcg.aarch64 import Aarch64Cpu, probe_exception_layout
from kemu.devices import psci
from kemu.devices.arm_timer import GenericTimer
from kemu.devices.base import IrqLine
from kemu.memory import GuestMemory, RamRegion

RAM = 0x40000000


def assemble(tmp_path, source: str) -> bytes:
    gas = shutil.which("aarch64-linux-gnu-as")
    objcopy = shutil.which("aarch64-linux-gnu-objcopy")
    if not gas or not objcopy:
        pytest.skip("binutils-aarch64-linux-gnu is not installed "
                    "(scripts/bootstrap.sh --test installs it)")
    (tmp_path / "g.s").write_text(source + "\n")
    subprocess.run([gas, "-o", str(tmp_path / "g.o"), str(tmp_path / "g.s")], check=True)
    subprocess.run([objcopy, "-O", "binary", str(tmp_path / "g.o"), str(tmp_path / "g.bin")],
                   check=True)
    return (tmp_path / "g.bin").read_bytes()


class Board:
    """Just enough board for the vCPU: RAM, an MMIO log, PSCI, timers on one line."""

    def __init__(self, code: bytes):
        self.memory = GuestMemory([RamRegion(RAM, 1 << 20)])
        self.memory.write(RAM, code)
        self.mmio = []
        self.events = []
        self.irq = IrqLine(name="cpu-irq")
        self.vtimer = GenericTimer(IrqLine(self._timer_level))
        self.ptimer = GenericTimer(IrqLine())
        self.psci = psci.Psci(lambda e: self.cpu.request_system_event(e.value))
        self.cpu = Aarch64Cpu(0, self.memory, [(0x09000000, 0x1000)], self._io,
                              lambda cpu, args: self.psci.call(cpu, *args),
                              self.vtimer, self.ptimer)
        self.irq.connect(self.cpu.set_irq)
        self.cpu.reset_for_linux(RAM, 0x1234)

    def _timer_level(self, level):
        self.irq.set(level)

    def _io(self, exit):
        self.mmio.append(exit)
        if isinstance(exit, MmioRead):
            return 0xAB00 + (exit.addr & 0xFF)
        return None

    def run(self, limit=5.0):
        end = time.monotonic() + limit
        while time.monotonic() < end:
            exit = self.cpu.run()
            if isinstance(exit, (SystemEvent, InternalError)):
                return exit
            if isinstance(exit, Halted):
                d = self.vtimer.deadline_counter()
                timeout = 0.05 if d is None else max(0.0, d * 16e-9 - time.monotonic())
                self.cpu.wait_for_interrupt(min(timeout, 0.05))
        raise AssertionError("guest did not finish")

    def x(self, n):
        return self.cpu.uc.reg_read(A.UC_ARM64_REG_X0 + n)


POWEROFF = """
    ldr x0, =0x84000008
    hvc #0
"""


def test_exception_layout_probe_finds_the_syndrome():
    assert probe_exception_layout().syndrome_offset > 0


def test_boot_registers_and_psci_poweroff(tmp_path):
    b = Board(assemble(tmp_path, f"""
        mov x9, x0          // x0 = device tree address per booting.rst
        mrs x10, CurrentEL
        ldr x0, =0x84000000 // PSCI_VERSION
        hvc #0
        mov x11, x0
        {POWEROFF}
        .ltorg"""))
    assert b.run() == SystemEvent("poweroff")
    assert b.x(9) == 0x1234 and b.x(10) == 1 << 2 and b.x(11) == 0x10000


def test_svc_at_el1_enters_the_current_el_spx_vector(tmp_path):
    b = Board(assemble(tmp_path, f"""
        adr x1, vectors
        msr vbar_el1, x1
        isb
        svc #0x42
        b .
        .balign 2048
    vectors:
        .skip 0x200
        mrs x20, esr_el1     // current EL with SP_ELx, synchronous
        mrs x21, elr_el1
        mrs x22, spsr_el1
        mrs x23, CurrentEL
        {POWEROFF}
        .ltorg"""))
    assert b.run() == SystemEvent("poweroff")
    assert b.x(20) == 0x56000042                 # EC=SVC64, IL, imm16
    assert b.x(21) == RAM + 16                   # the instruction after svc
    assert b.x(22) & 0xF == 0b0101 and b.x(23) == 1 << 2


def test_el0_svc_and_data_abort_take_the_lower_el_vector_and_switch_stacks(tmp_path):
    b = Board(assemble(tmp_path, f"""
        adr x1, vectors
        msr vbar_el1, x1
        ldr x1, =0x40080000
        mov sp, x1            // SP_EL1
        ldr x1, =0x40070000
        msr sp_el0, x1
        adr x1, user
        msr elr_el1, x1
        msr spsr_el1, xzr     // EL0t, interrupts unmasked
        eret
    user:
        mov x5, sp            // user stack
        svc #7
        ldr x1, =0x0123456789abcde0
        ldr x0, [x1]          // address size fault
        b .
        .ltorg
        .balign 2048
    vectors:
        .skip 0x400
        mrs x20, esr_el1      // lower EL, AArch64, synchronous
        mov x24, sp
        lsr x25, x20, #26
        cmp x25, #0x15
        b.ne 1f
        mrs x1, elr_el1       // after svc: return to user
        msr elr_el1, x1
        eret
    1:  mrs x21, far_el1
        mrs x22, spsr_el1
        {POWEROFF}
        .ltorg"""))
    assert b.run() == SystemEvent("poweroff")
    assert b.x(5) == 0x40070000 and b.x(24) == 0x40080000
    assert b.x(20) >> 26 == 0x24                 # data abort from a lower EL
    assert b.x(21) == 0x0123456789ABCDE0 and b.x(22) & 0xF == 0


def test_mmio_reads_and_writes_reach_the_board(tmp_path):
    b = Board(assemble(tmp_path, f"""
        ldr x1, =0x09000010
        mov w2, #0x55
        str w2, [x1]
        ldr w3, [x1, #4]
        {POWEROFF}
        .ltorg"""))
    b.run()
    assert b.mmio == [MmioWrite(0x09000010, 4, 0x55), MmioRead(0x09000014, 4)]
    assert b.x(3) == 0xAB14


def test_virtual_timer_interrupt_wakes_wfi(tmp_path):
    b = Board(assemble(tmp_path, f"""
        adr x1, vectors
        msr vbar_el1, x1
        mrs x7, cntvct_el0
        ldr x1, =3125000      // 50 ms at 62.5 MHz
        msr cntv_tval_el0, x1
        mov x1, #1
        msr cntv_ctl_el0, x1  // enable, unmasked
        msr daifclr, #2
    1:  wfi
        b 1b
        .ltorg
        .balign 2048
    vectors:
        .skip 0x280           // current EL with SP_ELx, IRQ
        mrs x8, cntvct_el0
        mrs x9, cntv_ctl_el0
        {POWEROFF}
        .ltorg"""))
    t0 = time.monotonic()
    assert b.run() == SystemEvent("poweroff")
    elapsed = time.monotonic() - t0
    assert b.x(9) == 0b101                       # ENABLE | ISTATUS
    ticks = b.x(8) - b.x(7)
    assert 3125000 <= ticks < 3125000 * 20       # at least 50 ms of guest time passed
    assert elapsed >= 0.05


def test_unicorn_async_stop_rewinds_an_executed_load():
    """Why the vCPU never calls emu_stop() from another thread (pinned Unicorn).

    A pointer chase ``ldr x0, [x0]`` counts its steps in x1; stopping it
    from another thread lands after the load with the PC rewound onto it, so
    x0 and x1 disagree after resuming.  If this ever stops failing, Unicorn
    fixed the exit check and the safe-point design could be revisited.
    """
    uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
    uc.mem_map(RAM, 0x100000)
    nodes = RAM + 0x10000
    for i in range(256):
        uc.mem_write(nodes + 16 * i, struct.pack("<Q", nodes + 16 * ((i + 1) % 256)))
    # 1: ldr x0, [x0]; add x1, x1, #1; b 1b
    uc.mem_write(RAM, struct.pack("<III", 0xF9400000, 0x91000421, 0x17FFFFFE))
    uc.reg_write(A.UC_ARM64_REG_X0, nodes)
    pc, inconsistent = RAM, 0
    for _ in range(20):
        threading.Timer(0.002, uc.emu_stop).start()
        # A stop that lands before emu_start begins is lost (a loaded host can delay
        # this thread past the timer); Unicorn's own timeout (a stop from its
        # timer thread, the same mechanism) ends the run then.
        uc.emu_start(pc, 0, timeout=200_000)
        pc = uc.reg_read(A.UC_ARM64_REG_PC)
        x0, x1 = uc.reg_read(A.UC_ARM64_REG_X0), uc.reg_read(A.UC_ARM64_REG_X1)
        inconsistent += x0 != nodes + 16 * (x1 % 256)
    assert inconsistent > 0
