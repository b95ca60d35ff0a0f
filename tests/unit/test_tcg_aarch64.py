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

from kemu.accel.base import Halted, InternalError, Kicked, MmioRead, MmioWrite, SystemEvent
from kemu.accel.tcg.aarch64 import Aarch64Cpu
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


def timer_guest(ticks: int, wait: str) -> str:
    """Arm the virtual timer ``ticks`` ahead (62.5 MHz), unmask IRQs, then ``wait``
    in a loop; the IRQ handler records CNTVCT (x8) and CNTV_CTL (x9) and powers off."""
    return f"""
        adr x1, vectors
        msr vbar_el1, x1
        mrs x7, cntvct_el0
        ldr x1, ={ticks}
        msr cntv_tval_el0, x1
        mov x1, #1
        msr cntv_ctl_el0, x1  // enable, unmasked
        msr daifclr, #2
    1:  {wait}
        b 1b
        .ltorg
        .balign 2048
    vectors:
        .skip 0x280           // current EL with SP_ELx, IRQ
        mrs x8, cntvct_el0
        mrs x9, cntv_ctl_el0
        {POWEROFF}
        .ltorg"""


def test_virtual_timer_interrupt_wakes_wfi(tmp_path):
    b = Board(assemble(tmp_path, timer_guest(3125000, "wfi")))   # 50 ms
    t0 = time.monotonic()
    assert b.run() == SystemEvent("poweroff")
    elapsed = time.monotonic() - t0
    assert b.x(9) == 0b101                       # ENABLE | ISTATUS
    ticks = b.x(8) - b.x(7)
    assert 3125000 <= ticks < 3125000 * 20       # at least 50 ms of guest time passed
    assert elapsed >= 0.05


#: 10 ms ahead, then a loop with no exception, no MSR, no MMIO: only the interrupt ends it.
SPIN_UNTIL_IRQ = timer_guest(625000, "add x3, x3, #1")


def run_with_kicker(b, limit=20.0):
    """Run ``b`` with the board's deadline kicker, as arm64_virt does."""
    from kemu.machines.runtime import DeadlineKicker

    def deadline():
        d = b.vtimer.deadline_counter()
        return None if d is None else d * 16e-9
    kicker = DeadlineKicker(b.cpu, deadline)
    b.cpu.on_timer_change = kicker.changed
    kicker.start()
    try:
        return b.run(limit)
    finally:
        kicker.stop()


def test_a_spinning_guest_gets_its_timer_interrupt(tmp_path):
    b = Board(assemble(tmp_path, SPIN_UNTIL_IRQ))
    assert run_with_kicker(b) == SystemEvent("poweroff")
    assert b.x(9) == 0b101                         # ENABLE | ISTATUS when the IRQ came
    assert b.x(8) - b.x(7) >= 625000               # not before the deadline
    assert b.x(3) > 1000                           # it really spun meanwhile


def test_polling_istatus_with_interrupts_masked_sees_the_timer_fire(tmp_path):
    b = Board(assemble(tmp_path, """
        ldr x1, =625000       // 10 ms
        msr cntv_tval_el0, x1
        mov x1, #3
        msr cntv_ctl_el0, x1  // enable, masked
    1:  mrs x2, cntv_ctl_el0
        tbz x2, #2, 1b        // until ISTATUS
        ldr x0, =0x84000008
        hvc #0
        .ltorg"""))
    assert run_with_kicker(b) == SystemEvent("poweroff")
    assert b.x(2) == 0b111


CONTROL = 0x40070000     # [0]: round limit, [8]: stop flag (both set by the host)
BUFFER = 0x40080000
RING = 0x40060000        # 256 nodes of a pointer ring, for a load whose base is its target


def checksum_board(code: bytes, limit: int) -> "Board":
    b = Board(code)
    b.memory.write(CONTROL, struct.pack("<QQ", limit, 0))
    for i in range(256):
        b.memory.write(RING + 16 * i, struct.pack("<Q", RING + 16 * ((i * 7 + 1) % 256)))
    return b

CHECKSUM = f"""
        // Rounds of: fill 16 KiB with an LCG (stores), then fold it back with
        // loads and a pointer chase (ldr x16, [x16]), so that a replayed or
        // skipped instruction changes the result.  Counts rounds in x10 until
        // the limit at CONTROL or the host's stop flag.
        mov x10, #0
        mov x20, #0
        ldr x11, ={BUFFER:#x}
        ldr x15, ={CONTROL:#x}
        ldr x12, =6364136223846793005
        ldr x13, =1442695040888963407
        mov x14, #1
        ldr x16, ={RING:#x}
    round:
        mov x1, x11
        mov x2, #2048
    fill:
        madd x14, x14, x12, x13
        str x14, [x1], #8
        subs x2, x2, #1
        b.ne fill
        mov x1, x11
        mov x2, #2048
    sum:
        ldr x3, [x1], #8
        ldr x16, [x16]
        eor x20, x3, x20, ror #7
        add x20, x20, x16
        subs x2, x2, #1
        b.ne sum
        add x10, x10, #1
        ldr x0, [x15]
        cmp x10, x0
        b.hs done
        ldr x0, [x15, #8]
        cbz x0, round
    done:
        ldr x0, =0x84000008
        hvc #0
        .ltorg"""


def test_thousands_of_asynchronous_stops_leave_the_guest_exact(tmp_path):
    """Stopped from another thread thousands of times, the guest computes what an
    uninterrupted run of the same number of rounds computes."""
    code = assemble(tmp_path, CHECKSUM)
    b = checksum_board(code, 1 << 62)
    done = threading.Event()
    stops = 0
    run = b.cpu.run

    def counted_run():
        nonlocal stops
        exit = run()
        stops += isinstance(exit, Kicked)
        if stops >= 2000:
            b.memory.write(CONTROL + 8, struct.pack("<Q", 1))   # enough: finish the round
        return exit
    b.cpu.run = counted_run

    def kick():
        while not done.is_set():
            b.cpu.kick()
            time.sleep(0)
    kicker = threading.Thread(target=kick, daemon=True)
    kicker.start()
    try:
        assert b.run(600) == SystemEvent("poweroff")
    finally:
        done.set()
        kicker.join()
    rounds = b.x(10)
    assert stops >= 2000 and rounds >= 1

    quiet = checksum_board(code, rounds)
    assert quiet.run(600) == SystemEvent("poweroff")
    assert quiet.x(10) == rounds
    assert (b.x(20), b.memory.read(BUFFER, 16384)) == (quiet.x(20), quiet.memory.read(BUFFER, 16384))
