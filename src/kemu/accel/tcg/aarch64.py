"""An AArch64 vCPU on Unicorn (QEMU's TCG as a library), set up for Linux at EL1.

What Unicorn leaves to the board, and how this module does it (see
PLATFORM.md):

* Unicorn starts in EL1 with EL2/EL3 present but configured for AArch32 and
  secure state: SCR_EL3 gets NS, HCE and RW, HCR_EL2 gets RW and IMO.
* Synchronous exceptions are reported through ``UC_HOOK_INTR`` instead of
  being taken: this module performs the architectural entry to EL1 (Arm ARM
  D1.10 "Exception entry"): ELR_EL1, SPSR_EL1, ESR_EL1, FAR_EL1, PSTATE and
  the vector offset.  The syndrome and fault address QEMU computed live in
  the CPU state blob at an offset found by :func:`probe_exception_layout`.
* HVC and SMC are the PSCI conduit, answered in Python.
* IRQs are injected through HCR_EL2.VI (with IMO set) and taken natively.
* Unicorn stubs out the generic timer: writes to the timer registers are
  caught with an MSR hook and fed to :class:`GenericTimer` models; the
  counter itself (CNTVCT) is Unicorn's CLOCK_MONOTONIC / 16 ns.
* WFI makes ``emu_start`` return; the vCPU waits on the host until an
  interrupt is signalled.

Safe points.  Unicorn checks its exit request after *every memory access*
inside a translation block and, when set, rewinds the PC to that access's
instruction, which then runs a second time on resume.  So ``emu_stop()``
from another thread at an arbitrary moment corrupts the guest (``ldr x0,
[x0]`` runs twice; tests/unit/test_tcg_aarch64.py shows it).  This vCPU never
stops the CPU asynchronously.  Raising HCR_EL2.VI only sets
``interrupt_request`` (Unicorn's ``cpu_interrupt`` requests no exit), so it
is safe anywhere; the CPU takes the IRQ the next time it returns to its main
loop (after an MSR, an exception, an ERET...).  Work posted by other threads
(an expired timer, an interrupt from an I/O thread, a request to leave
``emu_start``) is picked up at safe points: before ``emu_start``, in the
exception hook (outside translated code), in the MSR hook for registers
after which QEMU ends the translation block, and in MMIO callbacks (which
apply interrupts but never stop the CPU).  A guest that loops with none of
these (a pure computation loop) sees its interrupts when it leaves the loop.
"""

from __future__ import annotations

import ctypes
import struct
import threading
from dataclasses import dataclass
from typing import Callable

import unicorn
from unicorn import Uc, UcError
from unicorn import arm64_const as A
from unicorn.unicorn_py3.arch.arm64 import HOOK_INSN_SYS_CFUNC
from unicorn.unicorn_py3.unicorn import HOOK_INTR_CFUNC, uclib

from kemu.accel.base import Exit, Halted, InternalError, IoExit, Kicked, MmioRead, MmioWrite, \
    SystemEvent
from kemu.devices.arm_timer import GenericTimer
from kemu.errors import AccelError
from kemu.memory import GuestMemory

UNICORN_VERSION = "2.1.4"

# QEMU exception numbers (target/arm/cpu.h) as delivered to UC_HOOK_INTR.
EXCP_UDEF = 1
EXCP_SWI = 2
EXCP_PREFETCH_ABORT = 3
EXCP_DATA_ABORT = 4
EXCP_BKPT = 7
EXCP_HVC = 11
EXCP_SMC = 13

# System register encodings (op0, op1, CRn, CRm, op2)
SCR_EL3 = (3, 6, 1, 1, 0)
HCR_EL2 = (3, 4, 1, 1, 0)
CNTHCTL_EL2 = (3, 4, 14, 1, 0)
CNTVOFF_EL2 = (3, 4, 14, 0, 3)
SPSR_EL1 = (3, 0, 4, 0, 0)
SCTLR_EL1 = (3, 0, 1, 0, 0)
MPIDR_EL1 = (3, 0, 0, 0, 5)
CNTV_CTL_EL0 = (3, 3, 14, 3, 1)
CNTV_CVAL_EL0 = (3, 3, 14, 3, 2)
CNTV_TVAL_EL0 = (3, 3, 14, 3, 0)
CNTP_CTL_EL0 = (3, 3, 14, 2, 1)
CNTP_CVAL_EL0 = (3, 3, 14, 2, 2)
CNTP_TVAL_EL0 = (3, 3, 14, 2, 0)

SCR_NS = 1 << 0
SCR_HCE = 1 << 8
SCR_RW = 1 << 10
HCR_IMO = 1 << 4
HCR_VI = 1 << 7
HCR_RW = 1 << 31

PSTATE_SP = 1 << 0
PSTATE_EL_SHIFT = 2
PSTATE_DAIF = 0xF << 6
PSTATE_EL1H = 0b0101

# ESR_ELx.EC values (Arm ARM D17.2.37) whose FAR_ELx is valid.
EC_WITH_FAR = {0x20, 0x21, 0x22, 0x24, 0x25, 0x34, 0x35}

WFI = 0xD503207F

#: MSR targets after which QEMU ends the translation block (none of them is
#: ARM_CP_NOP, NZCV or ARM_CP_SUPPRESS_TB_END), so raising an interrupt in
#: the MSR hook cannot rewind a later memory access of the same block.
TB_ENDING_MSR = frozenset({
    (3, 0, 4, 1, 0),    # SP_EL0 (every kernel entry)
    (3, 0, 4, 0, 0),    # SPSR_EL1 (every exception return)
    (3, 0, 4, 0, 1),    # ELR_EL1
    (3, 3, 4, 2, 1),    # DAIF (local_irq_restore)
    (3, 0, 2, 0, 0),    # TTBR0_EL1
    (3, 0, 2, 0, 1),    # TTBR1_EL1
    (3, 0, 13, 0, 1),   # CONTEXTIDR_EL1
    (3, 0, 13, 0, 4),   # TPIDR_EL1
    (3, 3, 13, 0, 2),   # TPIDR_EL0
    (3, 3, 13, 0, 3),   # TPIDRRO_EL0
    (3, 0, 1, 0, 0),    # SCTLR_EL1
    (3, 0, 1, 0, 2),    # CPACR_EL1
    (3, 0, 12, 0, 0),   # VBAR_EL1
})


CPU_MODELS = {
    "cortex-a53": A.UC_CPU_ARM64_A53,
    "cortex-a57": A.UC_CPU_ARM64_A57,
    "cortex-a72": A.UC_CPU_ARM64_A72,
    "max": A.UC_CPU_ARM64_MAX,
}


class _CpReg(ctypes.Structure):
    """uc_arm64_cp_reg, for writing system registers without the binding's wrapper."""

    _fields_ = [("crn", ctypes.c_uint32), ("crm", ctypes.c_uint32), ("op0", ctypes.c_uint32),
                ("op1", ctypes.c_uint32), ("op2", ctypes.c_uint32), ("val", ctypes.c_uint64)]


class _RegBatch:
    """A fixed list of registers read or written in one uc_reg_*_batch call.

    The exception path touches a dozen registers per guest exception; through
    the binding each access costs about 5 us, a batch of them about 3 us.
    """

    def __init__(self, uch: int, regs: list[int]) -> None:
        n = len(regs)
        self._uch = uch
        self._n = n
        self._ids = (ctypes.c_int * n)(*regs)
        self.values = (ctypes.c_uint64 * n)()
        base = ctypes.addressof(self.values)
        self._ptrs = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])

    def read(self) -> "ctypes.Array[ctypes.c_uint64]":
        if uclib.uc_reg_read_batch(self._uch, self._ids, self._ptrs, self._n):
            raise AccelError("Unicorn refused a register batch read")
        return self.values

    def write(self, *values: int) -> None:
        self.values[:] = values
        if uclib.uc_reg_write_batch(self._uch, self._ids, self._ptrs, self._n):
            raise AccelError("Unicorn refused a register batch write")


def _raw_key(enc: tuple[int, int, int, int, int]) -> bytes:
    """The first 20 bytes of a uc_arm64_cp_reg: crn, crm, op0, op1, op2 (u32 each)."""
    op0, op1, crn, crm, op2 = enc
    return struct.pack("<5I", crn, crm, op0, op1, op2)


def _xreg(n: int) -> int:
    if n < 29:
        return A.UC_ARM64_REG_X0 + n
    return A.UC_ARM64_REG_X29 if n == 29 else A.UC_ARM64_REG_X30


def _cp(enc: tuple[int, int, int, int, int], val: int = 0) -> tuple:
    op0, op1, crn, crm, op2 = enc
    return (crn, crm, op0, op1, op2, val)


@dataclass(frozen=True)
class ExceptionLayout:
    """Where QEMU's ``env->exception`` {syndrome, fsr, vaddress, target_el} lies."""

    syndrome_offset: int

    def decode(self, blob: bytes) -> tuple[int, int, int]:
        syndrome, _fsr, vaddress, target_el = struct.unpack_from("<IIQI", blob,
                                                                 self.syndrome_offset)
        return syndrome, vaddress, target_el


_layout_cache: ExceptionLayout | None = None


def probe_exception_layout() -> ExceptionLayout:
    """Find the syndrome's offset in the context blob by raising a known fault.

    A tiny program at EL1 executes ``svc #0x1234`` (syndrome 0x56001234) and
    then loads from an address beyond the 48-bit physical range (an address
    size fault, FAR = that address).  The offset must show both, or the
    pinned Unicorn version has changed its layout.
    """
    global _layout_cache
    if _layout_cache is not None:
        return _layout_cache
    if unicorn.__version__ != UNICORN_VERSION:
        raise AccelError(f"kemu needs unicorn=={UNICORN_VERSION}, found {unicorn.__version__}")
    uc = Uc(unicorn.UC_ARCH_ARM64, unicorn.UC_MODE_ARM)
    base = 0x10000
    uc.mem_map(base, 0x1000)
    fault_addr = 0x0123456789ABCDE0
    code = struct.pack("<IIIIQ",
                       0xD4024681,  # svc #0x1234
                       0x58000061,  # ldr x1, <literal 12 bytes ahead>
                       0xF9400020,  # ldr x0, [x1]
                       0xD503201F,  # nop
                       fault_addr)
    uc.mem_write(base, code)
    uc.reg_write(A.UC_ARM64_REG_CP_REG, _cp(SCR_EL3, SCR_NS | SCR_HCE | SCR_RW))
    uc.reg_write(A.UC_ARM64_REG_CP_REG, _cp(HCR_EL2, HCR_RW | HCR_IMO))
    blobs: list[tuple[int, bytes]] = []
    ctx = uc.context_save()

    def on_intr(uc: Uc, intno: int, _ud: object) -> None:
        uc.context_update(ctx)
        blobs.append((intno, bytes(ctx)))
        if intno == EXCP_DATA_ABORT:
            uc.emu_stop()

    uc.hook_add(unicorn.UC_HOOK_INTR, on_intr)
    uc.emu_start(base, base + 12, count=10)
    if [b[0] for b in blobs] != [EXCP_SWI, EXCP_DATA_ABORT]:
        raise AccelError("Unicorn exception probe: unexpected exception sequence")
    svc_blob, abort_blob = blobs[0][1], blobs[1][1]
    offset = svc_blob.find(struct.pack("<I", 0x56001234))
    while offset >= 0:
        layout = ExceptionLayout(offset)
        syn, far, _el = layout.decode(abort_blob)
        if far == fault_addr and (syn >> 26) == 0x25:
            _layout_cache = layout
            return layout
        offset = svc_blob.find(struct.pack("<I", 0x56001234), offset + 1)
    raise AccelError("Unicorn exception probe: syndrome not found in the CPU state")


class Aarch64Cpu:
    """One AArch64 vCPU.  ``run()`` is called from the vCPU's own thread only."""

    def __init__(self, index: int, memory: GuestMemory, mmio_windows: list[tuple[int, int]],
                 io: Callable[[IoExit], int | None], hypercall: Callable[[int, list[int]], int],
                 vtimer: GenericTimer, ptimer: GenericTimer, model: str = "cortex-a72",
                 mpidr: int | None = None) -> None:
        if model not in CPU_MODELS:
            raise AccelError(f"unsupported CPU model {model!r} for the tcg accelerator "
                             f"(have: {', '.join(sorted(CPU_MODELS))})")
        self.index = index
        self._layout = probe_exception_layout()
        self._io = io
        self._hypercall = hypercall
        self.vtimer = vtimer
        self.ptimer = ptimer
        uc = Uc(unicorn.UC_ARCH_ARM64, unicorn.UC_MODE_ARM)
        uc.ctl_set_cpu_model(CPU_MODELS[model])
        self.uc = uc
        for region in memory.regions:
            uc.mem_map_ptr(region.base, region.size, unicorn.UC_PROT_ALL, region.host_address)
        for base, size in mmio_windows:
            uc.mmio_map(base, size, self._mmio_read, base, self._mmio_write, base)
        self._ctx = uc.context_save()
        uch = uc._uch
        self._uch = uch
        self._ctx_ptr = ctypes.cast(self._ctx.context, ctypes.c_void_p).value
        self._entry_in = _RegBatch(uch, [A.UC_ARM64_REG_PC, A.UC_ARM64_REG_PSTATE,
                                         A.UC_ARM64_REG_VBAR_EL1, A.UC_ARM64_REG_SP,
                                         A.UC_ARM64_REG_SP_EL1])
        self._entry_out = _RegBatch(uch, [A.UC_ARM64_REG_ELR_EL1, A.UC_ARM64_REG_ESR_EL1,
                                          A.UC_ARM64_REG_SP_EL0, A.UC_ARM64_REG_SP,
                                          A.UC_ARM64_REG_PSTATE])
        self._far = _RegBatch(uch, [A.UC_ARM64_REG_FAR_EL1])
        self._pc = _RegBatch(uch, [A.UC_ARM64_REG_PC])
        self._hvc_args = _RegBatch(uch, [A.UC_ARM64_REG_X0, A.UC_ARM64_REG_X1,
                                         A.UC_ARM64_REG_X2, A.UC_ARM64_REG_X3])
        self._x0 = _RegBatch(uch, [A.UC_ARM64_REG_X0])
        self._spsr = _CpReg(4, 0, 3, 0, 0, 0)   # SPSR_EL1: crn, crm, op0, op1, op2
        self._intr_cb = HOOK_INTR_CFUNC(self._on_exception_raw)
        uc._Uc__do_hook_add(unicorn.UC_HOOK_INTR, self._intr_cb, 1, 0)
        # The MSR hook runs for every MSR the guest executes (about 30 000 a
        # second while Linux boots, mostly DAIF writes), so it bypasses the
        # binding's generic wrapper: a raw ctypes callback that reads the
        # register encoding as 20 bytes and returns at once for most of them.
        self._msr_cb = HOOK_INSN_SYS_CFUNC(self._on_msr_raw)
        uc._Uc__do_hook_add(unicorn.UC_HOOK_INSN, self._msr_cb, 1, 0,
                            ctypes.c_int(A.UC_ARM64_INS_MSR))
        self._timer_regs = {
            CNTV_CTL_EL0: (vtimer, "ctl"), CNTV_CVAL_EL0: (vtimer, "cval"),
            CNTV_TVAL_EL0: (vtimer, "tval"),
            CNTP_CTL_EL0: (ptimer, "ctl"), CNTP_CVAL_EL0: (ptimer, "cval"),
            CNTP_TVAL_EL0: (ptimer, "tval"),
        }
        self._timer_regs_raw = {_raw_key(k): v for k, v in self._timer_regs.items()}
        self._tb_ending_raw = frozenset(_raw_key(k) for k in TB_ENDING_MSR)
        self._timer_ctl_reg = {id(vtimer): CNTV_CTL_EL0, id(ptimer): CNTP_CTL_EL0}
        self._timer_cval_reg = {id(vtimer): CNTV_CVAL_EL0, id(ptimer): CNTP_CVAL_EL0}
        # Cross-thread state
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._running = False
        self._kick_requested = False
        self._irq_level = False
        self._hcr = HCR_RW | HCR_IMO
        self._system_event: str | None = None
        self._work_pending = False
        self._stop_requested = False
        self._where = "loop"
        #: Called on the vCPU thread at each safe point with work pending.
        self.on_safe_point: Callable[[], None] = lambda: None
        self._error: str | None = None
        self._thread_id: int | None = None
        #: Called (on the vCPU thread) when a timer deadline may have changed.
        self.on_timer_change: Callable[[], None] = lambda: None
        self._mpidr = mpidr

    # -- setup ----------------------------------------------------------------
    def _wsys(self, enc: tuple[int, int, int, int, int], value: int) -> None:
        self.uc.reg_write(A.UC_ARM64_REG_CP_REG, _cp(enc, value))

    def _rsys(self, enc: tuple[int, int, int, int, int]) -> int:
        return self.uc.reg_read(A.UC_ARM64_REG_CP_REG, _cp(enc))

    def reset_for_linux(self, entry: int, dtb: int) -> None:
        """Registers as the arm64 boot protocol requires (booting.rst)."""
        uc = self.uc
        self._wsys(SCR_EL3, SCR_NS | SCR_HCE | SCR_RW)
        self._wsys(HCR_EL2, self._hcr)
        self._wsys(CNTHCTL_EL2, 0x3)   # EL1 may use the physical counter and timer
        self._wsys(CNTVOFF_EL2, self.vtimer.offset)
        if self._mpidr is not None:
            self._wsys(MPIDR_EL1, self._mpidr)
        uc.reg_write(A.UC_ARM64_REG_PSTATE, PSTATE_DAIF | PSTATE_EL1H)
        self._wsys(SCTLR_EL1, self._rsys(SCTLR_EL1) & ~1)  # MMU off; rebuilds hflags
        for i in range(31):
            uc.reg_write(_xreg(i), 0)
        uc.reg_write(A.UC_ARM64_REG_X0, dtb)
        uc.reg_write(A.UC_ARM64_REG_PC, entry)

    def reset_secondary(self, entry: int, context_id: int) -> None:
        """PSCI CPU_ON entry state: EL1h, MMU off, x0 = context_id."""
        self.reset_for_linux(entry, context_id)

    def add_virtual_offset(self, ticks: int) -> None:
        """Hide ``ticks`` of host time from the guest's virtual counter (CNTVOFF_EL2).

        Called while the vCPU is paused, so the guest's clock does not jump
        by the time it spent stopped.  The virtual timer compares against the
        same offset view of the counter.
        """
        self.vtimer.offset += ticks
        self._wsys(CNTVOFF_EL2, self.vtimer.offset)
        self._work_pending = True

    @property
    def pc(self) -> int:
        return self.uc.reg_read(A.UC_ARM64_REG_PC)

    def registers(self) -> dict[str, int]:
        uc = self.uc
        regs = {f"x{i}": uc.reg_read(A.UC_ARM64_REG_X0 + i) for i in range(29)}
        regs.update(x29=uc.reg_read(A.UC_ARM64_REG_X29), x30=uc.reg_read(A.UC_ARM64_REG_X30),
                    sp=uc.reg_read(A.UC_ARM64_REG_SP), pc=uc.reg_read(A.UC_ARM64_REG_PC),
                    pstate=uc.reg_read(A.UC_ARM64_REG_PSTATE))
        return regs

    # -- cross-thread controls ------------------------------------------------------
    def kick(self, final: bool = False) -> None:
        """Make ``run()`` return at the next safe point (any thread).

        ``final``: the guest will never run again (the machine is stopping),
        so stop it at once even inside a loop with no safe point: the
        instruction Unicorn may replay no longer matters.
        """
        with self._lock:
            self._kick_requested = True
            self._work_pending = True
            if final and self._running:
                self._stop_requested = True
                self.uc.emu_stop()
            self._wake.notify_all()

    def post_work(self) -> None:
        """Have timers and interrupts looked at, at the next safe point (any thread)."""
        with self._lock:
            self._work_pending = True
            self._wake.notify_all()

    def set_irq(self, level: bool) -> None:
        """The interrupt controller's output to this CPU (any thread)."""
        self._irq_level = level
        if threading.get_ident() == self._thread_id and self._running:
            self._apply_irq()  # only sets interrupt_request: safe inside emu_start
            return
        with self._lock:
            self._work_pending = True
            self._wake.notify_all()

    def wait_for_interrupt(self, timeout: float | None) -> None:
        """Block (WFI) until the IRQ input is high, a kick, or ``timeout`` seconds."""
        with self._lock:
            if self._irq_level or self._kick_requested:
                return
            self._wake.wait(timeout)

    @property
    def irq_pending(self) -> bool:
        return self._irq_level

    # -- safe-point work ----------------------------------------------------------------
    def _apply_irq(self) -> None:
        hcr = (self._hcr | HCR_VI) if self._irq_level else (self._hcr & ~HCR_VI)
        if hcr != self._hcr:
            self._hcr = hcr
            self._wsys(HCR_EL2, hcr)

    def sync_timers(self) -> None:
        """Refresh ISTATUS in the CPU's timer control registers and the outputs."""
        for timer in (self.vtimer, self.ptimer):
            timer.update()
            self._wsys(self._timer_ctl_reg[id(timer)], timer.ctl_value())

    def _service(self) -> None:
        """Work posted by other threads: timers that expired, the interrupt
        level, and (outside MMIO callbacks) a request to leave ``emu_start``."""
        self._work_pending = False
        self.on_safe_point()
        self.sync_timers()
        self._apply_irq()
        if self._kick_requested and self._running and self._where != "mmio":
            self._stop_requested = True
            self.uc.emu_stop()

    # -- the run loop -------------------------------------------------------------------
    def run(self) -> Exit:
        self._thread_id = threading.get_ident()
        self._where = "loop"
        with self._lock:
            kicked = self._kick_requested
            self._kick_requested = False
        self._service()
        if kicked:
            return Kicked()
        self._running = True
        uc = self.uc
        pc = uc.reg_read(A.UC_ARM64_REG_PC)
        try:
            uc.emu_start(pc, 0)
        except UcError as e:
            self._error = f"{e} at pc {uc.reg_read(A.UC_ARM64_REG_PC):#x}"
        finally:
            self._running = False
            self._where = "loop"
        stopped_by_us = self._stop_requested
        self._stop_requested = False
        if self._error is not None:
            error, self._error = self._error, None
            return InternalError(error)
        if self._system_event is not None:
            event, self._system_event = self._system_event, None
            return SystemEvent(event)
        if not stopped_by_us:
            # Nothing of ours stopped the CPU: it executed WFI (EXCP_HLT).
            return Halted()
        return Kicked()

    # -- hooks (called on the vCPU thread, inside emu_start) ---------------------------------
    def _mmio_done(self) -> None:
        if self._work_pending:
            self._service()

    def _mmio_read(self, uc: Uc, offset: int, size: int, base: int) -> int:
        self._where = "mmio"
        value = self._io(MmioRead(base + offset, size))
        self._mmio_done()
        return value or 0

    def _mmio_write(self, uc: Uc, offset: int, size: int, value: int, base: int) -> None:
        self._where = "mmio"
        self._io(MmioWrite(base + offset, size, value))
        self._mmio_done()

    def _on_msr_raw(self, _handle: int, _reg: int, cp: int, _key: int) -> int:
        """uc_cb_insn_sys_t: ``cp`` points at a uc_arm64_cp_reg; nonzero = skip."""
        try:
            key = ctypes.string_at(cp, 20)
            entry = self._timer_regs_raw.get(key)
            if entry is None:
                if self._work_pending and key in self._tb_ending_raw:
                    self._where = "msr"
                    self._service()
                return 0
            return self._timer_write(entry, ctypes.c_uint64.from_address(cp + 24).value)
        except BaseException as e:  # a bug in kemu: stop the guest, report it
            self._error = f"internal error in the MSR hook: {type(e).__name__}: {e}"
            self._stop_requested = True
            self.uc.emu_stop()
            return 0

    def _timer_write(self, entry: tuple[GenericTimer, str], value: int) -> int:
        self._where = "msr"
        timer, field = entry
        if field == "ctl":
            timer.write_ctl(value)
        elif field == "cval":
            timer.write_cval(value)
        else:
            timer.write_tval(value)
        self._wsys(self._timer_ctl_reg[id(timer)], timer.ctl_value())
        self._wsys(self._timer_cval_reg[id(timer)], timer.cval)
        self.on_timer_change()
        if self._work_pending:
            self._service()
        return 1

    def _on_exception_raw(self, _handle: int, intno: int, _key: int) -> None:
        """uc_cb_hookintr_t: a synchronous exception, HVC or SMC (outside translated code)."""
        try:
            self._where = "exception"
            if intno in (EXCP_HVC, EXCP_SMC):
                args = list(self._hvc_args.read())
                self._x0.write(self._hypercall(self.index, args))
            else:
                if uclib.uc_context_save(self._uch, self._ctx.context):
                    raise AccelError("Unicorn could not save the CPU state")
                syndrome, _fsr, vaddress = struct.unpack(
                    "<IIQ", ctypes.string_at(self._ctx_ptr + self._layout.syndrome_offset, 16))
                self._take_exception(syndrome, vaddress)
            if self._work_pending:
                self._service()
        except BaseException as e:  # a bug in kemu: stop the guest, report it
            self._error = f"internal error in the exception hook: {type(e).__name__}: {e}"
            self._stop_requested = True
            self.uc.emu_stop()

    def _take_exception(self, syndrome: int, vaddress: int) -> None:
        """Synchronous exception entry to EL1 (Arm ARM D1.10.2)."""
        pc, pstate, vbar, sp, sp_el1 = self._entry_in.read()
        el = (pstate >> PSTATE_EL_SHIFT) & 3
        if el == 0:
            vector = 0x400
        elif pstate & PSTATE_SP:
            vector = 0x200
        else:
            vector = 0x000
        if el == 0 or not pstate & PSTATE_SP:
            sp_el0, sp = sp, sp_el1          # bank the stack: SP_EL0 saved, SP_EL1 live
        else:
            sp_el0 = self.uc.reg_read(A.UC_ARM64_REG_SP_EL0)
        self._entry_out.write(pc, syndrome, sp_el0, sp, PSTATE_DAIF | PSTATE_EL1H)
        if (syndrome >> 26) in EC_WITH_FAR:
            self._far.write(vaddress)
        # SPSR_EL1 through the CP interface, which also rebuilds QEMU's hflags
        # for the new exception level.
        self._spsr.val = pstate
        if uclib.uc_reg_write(self._uch, A.UC_ARM64_REG_CP_REG, ctypes.byref(self._spsr)):
            raise AccelError("Unicorn refused the SPSR_EL1 write")
        self._pc.write(vbar + vector)

    # -- called by the board's hooks to end the run ------------------------------------------
    def request_system_event(self, kind: str) -> None:
        self._system_event = kind
        self._stop_requested = True
        self.uc.emu_stop()
