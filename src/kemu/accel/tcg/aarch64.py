"""An AArch64 vCPU on kemu's TCG engine (Unicorn with kemu's patches), set up for Linux at EL1.

What Unicorn leaves to the board, and how this module does it (see
PLATFORM.md and :mod:`kemu.accel.tcg.engine`):

* Unicorn starts in EL1 with EL2/EL3 present but configured for AArch32 and
  secure state: SCR_EL3 gets NS, HCE and RW, HCR_EL2 gets RW and IMO; and, as
  QEMU's boot code does below EL3, pointer authentication (SCR_EL3 and
  HCR_EL2 API/APK) and SVE (CPTR_EL3.EZ) are not trapped, which -cpu max
  kernels use.
* Synchronous exceptions (SVC, aborts, undefined instructions, BRK, the
  debug exceptions: breakpoints, watchpoints, software step) are taken by
  the CPU itself, as QEMU takes them (the engine's native exceptions).  An
  access with nothing behind its physical address (outside RAM and the
  MMIO windows, or an MMIO access the board's bus decodes to no device:
  :class:`~kemu.bus.DecodeError`) is a synchronous external abort, as QEMU
  raises it on virt, not the end of the VM.  HVC and SMC still come to ``UC_HOOK_INTR``: they are the
  PSCI conduit, answered in Python.
* IRQs are injected through HCR_EL2.VI (with IMO set) and taken natively.
* Unicorn stubs out the generic timer: writes to the six EL1 timer registers
  are caught by MSR hooks on those registers only and fed to
  :class:`GenericTimer` models, and reads of the two control registers by
  MRS hooks that compute ISTATUS at the time of the read; the counter itself
  (CNTVCT) is Unicorn's CLOCK_MONOTONIC / 16 ns.
* The PMU is QEMU's (:mod:`kemu.accel.tcg.pmu`): its overflow interrupt
  goes to the line the board hands in, its overflow deadline to the board's
  deadline kicker.
* WFI makes ``emu_start`` return; the vCPU waits on the host until an
  interrupt is signalled.
* SMP: every vCPU is its own engine instance on its own thread over the
  same RAM, translating with the engine's parallel switch (host atomics for
  LDXR/STXR and LSE, host barriers for DMB); the broadcast TLB and
  instruction-cache maintenance reaches the other vCPUs through their
  :class:`~kemu.accel.tcg.coherence.CoherenceDomain`.  MPIDR_EL1 as EL1 reads
  it is VMPIDR_EL2 (EL2 is present and non-secure).  A secondary vCPU is off
  until PSCI CPU_ON (:meth:`Aarch64Cpu.power_on`), and CPU_OFF turns it off
  again; its thread waits, with no guest code, while it is off.

Interrupts at any time.  The engine checks its exit request only at the
start of each translation block, so ``emu_stop()`` from any thread stops
the guest at an exact state (nothing runs twice), and a stop requested just
before ``emu_start`` is kept, never lost.  Other threads (the deadline
kicker, I/O threads, pause and quit requests) post their work and stop the
CPU; the vCPU thread applies it (timers, the interrupt level) and resumes.
Inside ``emu_start`` (MMIO and MSR callbacks on the vCPU thread) the
interrupt level is applied directly: the engine takes the IRQ at the next
block start.  A guest spinning with no exits at all is therefore
interrupted within one translation block of the request.
"""

from __future__ import annotations

import ctypes
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
from kemu.accel.tcg import coherence, engine
from kemu.accel.tcg.pmu import Pmu, set_counters
from kemu.bus import DecodeError
from kemu.devices.arm_timer import GenericTimer
from kemu.devices.base import IrqLine
from kemu.errors import AccelError
from kemu.memory import GuestMemory
from kemu.state import StateError, check_version

# QEMU exception numbers (target/arm/cpu.h) as delivered to UC_HOOK_INTR.
EXCP_UDEF = 1
EXCP_SWI = 2
EXCP_PREFETCH_ABORT = 3
EXCP_DATA_ABORT = 4
EXCP_BKPT = 7
EXCP_HVC = 11
EXCP_SMC = 13

#: Exceptions the CPU takes itself, as the architecture says.
NATIVE_EXCEPTIONS = sum(1 << e for e in (EXCP_UDEF, EXCP_SWI, EXCP_PREFETCH_ABORT,
                                         EXCP_DATA_ABORT, EXCP_BKPT))

# System register encodings (op0, op1, CRn, CRm, op2)
SCR_EL3 = (3, 6, 1, 1, 0)
HCR_EL2 = (3, 4, 1, 1, 0)
CNTHCTL_EL2 = (3, 4, 14, 1, 0)
CNTVOFF_EL2 = (3, 4, 14, 0, 3)
SCTLR_EL1 = (3, 0, 1, 0, 0)
MPIDR_EL1 = (3, 0, 0, 0, 5)
VMPIDR_EL2 = (3, 4, 0, 0, 5)
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
HCR_APK = 1 << 40
HCR_API = 1 << 41
SCR_APK = 1 << 16
SCR_API = 1 << 17
CPTR_EL3 = (3, 6, 1, 1, 2)
CPTR_EZ = 1 << 8

PSTATE_DAIF = 0xF << 6
PSTATE_EL1H = 0b0101

TARGET_PAGE_SIZE = 4096

# Hook keys of the broadcast maintenance instructions (timer keys are 1-6).
_KEY_TLBI = 0x100
_KEY_IC_IVAU = 0x200
_KEY_IC_IALLUIS = 0x201
_KEY_IC_IALLU = 0x202
_KEY_SYSREG = 0x1000   # + index in Aarch64Cpu's sysregs

#: A device's system registers: (op0, op1, CRn, CRm, op2).
SysregEnc = tuple[int, int, int, int, int]

CPU_MODELS = {
    "cortex-a53": A.UC_CPU_ARM64_A53,
    "cortex-a57": A.UC_CPU_ARM64_A57,
    "cortex-a72": A.UC_CPU_ARM64_A72,
    "max": A.UC_CPU_ARM64_MAX,
}


class SysregDevice:
    """What a device with system registers offers a vCPU (duck-typed):
    ``readable``/``writable`` encodings, ``read(cpu, enc)``, ``write(cpu, enc, value)``."""

    readable: tuple[SysregEnc, ...]
    writable: tuple[SysregEnc, ...]

    def read(self, cpu: int, enc: SysregEnc) -> int:
        raise NotImplementedError

    def write(self, cpu: int, enc: SysregEnc, value: int) -> None:
        raise NotImplementedError


@dataclass
class Aarch64CpuState:
    """One vCPU as plain data.

    ``env`` is the engine's whole CPUARMState up to its breakpoint tables,
    as ``uc_context_save`` copies it (Unicorn's AArch64 has no context
    callbacks: a plain copy of ``env``): general, SIMD/FP and every system
    register QEMU models (MMU, exception, timer, PAuth keys, cached hflags),
    PSTATE and the exclusive monitor.  Its layout is the engine build's, so
    ``engine`` names that build and a state from another build is refused.
    The rest is what kemu keeps in Python: HCR_EL2 as last written (with VI),
    and the PSCI power state.  The named registers are a readable copy (the
    API, tests), checked against ``env`` on restore.
    """

    version: int
    engine: str
    env: bytes
    hcr: int
    powered_off: bool
    on_pending: bool
    on_request: list[int]
    pc: int
    sp: int
    pstate: int


def engine_build() -> str:
    """The engine build's identity (its wheel version, patch-series id included)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("unicorn")
    except PackageNotFoundError:
        return unicorn.__version__


class _RegBatch:
    """A fixed list of registers read or written in one uc_reg_*_batch call.

    Through the binding each register access costs about 5 us, a batch of
    them about 3 us.
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


class _CpReg(ctypes.Structure):
    """uc_arm64_cp_reg: a system register write without the binding's wrapper (~2 us)."""

    _fields_ = [("crn", ctypes.c_uint32), ("crm", ctypes.c_uint32), ("op0", ctypes.c_uint32),
                ("op1", ctypes.c_uint32), ("op2", ctypes.c_uint32), ("val", ctypes.c_uint64)]


def _xreg(n: int) -> int:
    if n < 29:
        return A.UC_ARM64_REG_X0 + n
    return A.UC_ARM64_REG_X29 if n == 29 else A.UC_ARM64_REG_X30


def _cp(enc: tuple[int, int, int, int, int], val: int = 0) -> tuple:
    op0, op1, crn, crm, op2 = enc
    return (crn, crm, op0, op1, op2, val)


class Aarch64Cpu:
    """One AArch64 vCPU.  ``run()`` is called from the vCPU's own thread only."""

    def __init__(self, index: int, memory: GuestMemory, mmio_windows: list[tuple[int, int]],
                 io: Callable[[IoExit], int | None], hypercall: Callable[[int, list[int]], int],
                 vtimer: GenericTimer, ptimer: GenericTimer, model: str = "cortex-a72",
                 mpidr: int | None = None,
                 domain: coherence.CoherenceDomain | None = None,
                 powered_on: bool = True, pmu_irq: IrqLine | None = None,
                 gicv3: "SysregDevice | None" = None,
                 rom_devices: tuple[tuple[int, int, int], ...] = ()) -> None:
        if model not in CPU_MODELS:
            raise AccelError(f"unsupported CPU model {model!r} for the tcg accelerator "
                             f"(have: {', '.join(sorted(CPU_MODELS))})")
        self.index = index
        self._io = io
        self._hypercall = hypercall
        self.vtimer = vtimer
        self.ptimer = ptimer
        uc = Uc(unicorn.UC_ARCH_ARM64, unicorn.UC_MODE_ARM)
        uc.ctl_set_cpu_model(CPU_MODELS[model])   # before any other call
        set_counters(uc)                          # PMCR_EL0.N as QEMU's, before the CPU exists
        # 4 KiB target pages, as QEMU uses for v7+ CPUs (Unicorn defaults to
        # ARMv5's 1 KiB): a quarter of the TLB fills, and a guest's 4 KiB
        # pages are not "large pages" whose flush empties the whole TLB.
        uc.ctl_set_page_size(TARGET_PAGE_SIZE)
        engine.configure(uc, NATIVE_EXCEPTIONS)
        self.uc = uc
        #: The PMU's overflow interrupt (the board wires it to its PPI) and deadline.
        self.pmu = Pmu(uc, pmu_irq or IrqLine(name=f"cpu{index}.pmu"),
                       lambda: self.on_timer_change(), self._fail)
        for region in memory.regions:
            uc.mem_map_ptr(region.base, region.size, unicorn.UC_PROT_ALL, region.host_address)
        for base, size in mmio_windows:
            uc.mmio_map(base, size, self._mmio_read, base, self._mmio_write, base)
        # ROM devices (flash): (base, size, host address of their array).
        for base, size, host in rom_devices:
            uc.mmio_map(base, size, self._mmio_read, base, self._mmio_write, base)
            engine.make_rom_device(uc, base, host)
        #: ROMD mode switches and code invalidations asked by other threads.
        self._rom_pending: list[tuple[int, bool, tuple[int, int] | None]] = []
        uch = uc._uch
        self._uch = uch
        self._cp_reg = _CpReg()
        self._hvc_args = _RegBatch(uch, [A.UC_ARM64_REG_X0, A.UC_ARM64_REG_X1,
                                         A.UC_ARM64_REG_X2, A.UC_ARM64_REG_X3])
        self._x0 = _RegBatch(uch, [A.UC_ARM64_REG_X0])
        self._intr_cb = HOOK_INTR_CFUNC(self._on_exception_raw)
        uc._Uc__do_hook_add(unicorn.UC_HOOK_INTR, self._intr_cb, 1, 0)
        # One MSR hook per timer register: the engine translates every other
        # MSR without a call (Linux executes tens of thousands a second).
        self._msr_cb = HOOK_INSN_SYS_CFUNC(self._on_msr_raw)
        timer_regs = {
            CNTV_CTL_EL0: (vtimer, "ctl"), CNTV_CVAL_EL0: (vtimer, "cval"),
            CNTV_TVAL_EL0: (vtimer, "tval"),
            CNTP_CTL_EL0: (ptimer, "ctl"), CNTP_CVAL_EL0: (ptimer, "cval"),
            CNTP_TVAL_EL0: (ptimer, "tval"),
        }
        self._timer_by_key: dict[int, tuple[GenericTimer, str]] = {}
        for key, (enc, entry) in enumerate(timer_regs.items(), start=1):
            self._timer_by_key[key] = entry
            engine.add_sysreg_hook(uc, self._msr_cb, A.UC_ARM64_INS_MSR, enc, key)
        # Reads of the control registers compute ISTATUS now, as the
        # architecture says, so a guest that polls it sees the timer fire.
        self._mrs_cb = HOOK_INSN_SYS_CFUNC(self._on_mrs_raw)
        self._ctl_by_key = {1: vtimer, 2: ptimer}
        engine.add_sysreg_hook(uc, self._mrs_cb, A.UC_ARM64_INS_MRS, CNTV_CTL_EL0, 1)
        engine.add_sysreg_hook(uc, self._mrs_cb, A.UC_ARM64_INS_MRS, CNTP_CTL_EL0, 2)
        self._mrs_value = ctypes.c_uint64()
        self._timer_cval_reg = {id(vtimer): CNTV_CVAL_EL0, id(ptimer): CNTP_CVAL_EL0}
        self._gicv3 = gicv3
        if gicv3 is not None:
            self._add_sysreg_device(gicv3)
        self._domain = domain
        if domain is not None:
            engine.set_parallel(uc)
            self._maint_cb = HOOK_INSN_SYS_CFUNC(self._on_maintenance_raw)
            for key, enc in enumerate(coherence.TLBI_IS, start=_KEY_TLBI):
                engine.add_sysreg_hook(uc, self._maint_cb, A.UC_ARM64_INS_SYS, enc, key)
            engine.add_sysreg_hook(uc, self._maint_cb, A.UC_ARM64_INS_SYS, coherence.IC_IVAU,
                                   _KEY_IC_IVAU)
            engine.add_sysreg_hook(uc, self._maint_cb, A.UC_ARM64_INS_SYS,
                                   coherence.IC_IALLUIS, _KEY_IC_IALLUIS)
            engine.add_sysreg_hook(uc, self._maint_cb, A.UC_ARM64_INS_SYS, coherence.IC_IALLU,
                                   _KEY_IC_IALLU)
        # Cross-thread state, under _lock: _running (inside emu_start), and
        # _stop_requested (another thread stopped the engine for this run).
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._running = False
        self._stop_requested = False
        self._stale_stop = False
        self._kick_requested = False
        self._irq_level = False
        self._hcr = HCR_RW | HCR_IMO | HCR_API | HCR_APK
        self._system_event: str | None = None
        self._work_pending = True
        self._error: str | None = None
        self._thread_id: int | None = None
        #: Called (on the vCPU thread) when a timer deadline may have changed.
        self.on_timer_change: Callable[[], None] = lambda: None
        self._mpidr = mpidr
        # PSCI power state (DEN0022 5.1.5 AFFINITY_INFO): off until CPU_ON for a
        # secondary; on pending from CPU_ON until this vCPU's thread has reset
        # the core (both flags change under _lock).
        self._off = not powered_on
        self._on_request: tuple[int, int] | None = None
        self._on_pending = False
        if domain is not None:
            domain.join(self)

    # -- setup ----------------------------------------------------------------
    def _add_sysreg_device(self, device: "SysregDevice") -> None:
        """The GICv3 CPU interface: the engine's ICC_* registers, each MRS/MSR
        through one hook to ``device`` (on this vCPU's thread)."""
        engine.enable_gicv3_cpuif(self.uc)
        self._sysreg_cb = HOOK_INSN_SYS_CFUNC(self._on_sysreg_raw)
        self._sysreg_keys: list[tuple[SysregEnc, bool]] = []
        for insn, regs in ((A.UC_ARM64_INS_MRS, device.readable),
                           (A.UC_ARM64_INS_MSR, device.writable)):
            for enc in regs:
                engine.add_sysreg_hook(self.uc, self._sysreg_cb, insn, enc,
                                       _KEY_SYSREG + len(self._sysreg_keys))
                self._sysreg_keys.append((enc, insn == A.UC_ARM64_INS_MSR))

    def _wsys(self, enc: tuple[int, int, int, int, int], value: int) -> None:
        cp = self._cp_reg
        cp.op0, cp.op1, cp.crn, cp.crm, cp.op2 = enc
        cp.val = value
        if uclib.uc_reg_write(self._uch, A.UC_ARM64_REG_CP_REG, ctypes.byref(cp)):
            raise AccelError(f"Unicorn refused a write of system register {enc}")

    def _rsys(self, enc: tuple[int, int, int, int, int]) -> int:
        return self.uc.reg_read(A.UC_ARM64_REG_CP_REG, _cp(enc))

    def set_romd(self, base: int, romd: bool, changed: tuple[int, int] | None = None) -> None:
        """A ROM device at ``base`` enters (True) or leaves read-array mode; ``changed``
        is the physical range whose contents changed since (translations dropped).
        Any thread: applied at once on the vCPU's own thread, else at its next stop."""
        if threading.get_ident() == self._thread_id or self._thread_id is None:
            self._apply_romd(base, romd, changed)
            return
        with self._lock:
            self._rom_pending.append((base, romd, changed))
        self.post_work()

    def _apply_romd(self, base: int, romd: bool, changed: tuple[int, int] | None) -> None:
        if changed is not None:
            engine.invalidate_phys(self.uc, *changed)
        engine.set_romd_mode(self.uc, base, romd)

    def reset_for_firmware(self, entry: int) -> None:
        """QEMU's reset for a firmware boot: EL1h, MMU off, every register 0, at ``entry``."""
        self.reset_for_linux(entry, 0)

    def reset_for_linux(self, entry: int, dtb: int) -> None:
        """Registers as the arm64 boot protocol requires (booting.rst)."""
        uc = self.uc
        self._wsys(SCR_EL3, SCR_NS | SCR_HCE | SCR_RW | SCR_API | SCR_APK)
        self._wsys(CPTR_EL3, self._rsys(CPTR_EL3) | CPTR_EZ)
        self._wsys(HCR_EL2, self._hcr)
        self._wsys(CNTHCTL_EL2, 0x3)   # EL1 may use the physical counter and timer
        self._wsys(CNTVOFF_EL2, self.vtimer.offset)
        if self._mpidr is not None:
            # EL1 reads of MPIDR_EL1 return VMPIDR_EL2 with EL2 enabled.
            self._wsys(VMPIDR_EL2, self._mpidr)
        uc.reg_write(A.UC_ARM64_REG_PSTATE, PSTATE_DAIF | PSTATE_EL1H)
        self._wsys(SCTLR_EL1, self._rsys(SCTLR_EL1) & ~1)  # MMU off; rebuilds hflags
        for i in range(31):
            uc.reg_write(_xreg(i), 0)
        uc.reg_write(A.UC_ARM64_REG_X0, dtb)
        uc.reg_write(A.UC_ARM64_REG_PC, entry)

    def reset_secondary(self, entry: int, context_id: int) -> None:
        """PSCI CPU_ON entry state: EL1h, MMU off, x0 = context_id."""
        self.reset_for_linux(entry, context_id)

    # -- PSCI power state (any thread; the vCPU's thread acts on it) -----------------------
    @property
    def powered_on(self) -> bool:
        return not self._off

    @property
    def on_pending(self) -> bool:
        return self._on_pending

    def power_on(self, entry: int, context_id: int) -> None:
        """CPU_ON (DEN0022 5.6): the vCPU's thread resets it to ``entry`` and runs it."""
        with self._lock:
            self._on_request = (entry, context_id)
            self._on_pending = True
            self._work_pending = True
            self._wake.notify_all()

    def power_off(self) -> None:
        """CPU_OFF (DEN0022 5.5), from the vCPU's own hypercall: it runs no more
        guest code until the next CPU_ON."""
        with self._lock:
            self._off = True
        self.uc.emu_stop()

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

    # -- state (called while the vCPU is paused, or before its thread starts) ---------------
    def _context_blob(self) -> tuple[ctypes.c_void_p, int, int]:
        ctx = self.uc.context_save()
        total = uclib.uc_context_size(self._uch)
        base = ctypes.cast(ctx.context, ctypes.c_void_p).value
        size = ctypes.c_size_t.from_address(base).value   # uc_context.context_size
        return ctx, base + total - size, size

    def save(self) -> Aarch64CpuState:
        ctx, data, size = self._context_blob()
        env = ctypes.string_at(data, size)
        del ctx
        with self._lock:
            off, pending, request = self._off, self._on_pending, self._on_request
        return Aarch64CpuState(1, engine_build(), env, self._hcr, off, pending,
                               list(request or ()), self.pc,
                               self.uc.reg_read(A.UC_ARM64_REG_SP),
                               self.uc.reg_read(A.UC_ARM64_REG_PSTATE))

    def restore(self, state: Aarch64CpuState) -> None:
        """Load a saved vCPU into this fresh one (its thread not yet running guest code)."""
        check_version("aarch64 vCPU", state.version)
        if state.engine != engine_build():
            raise StateError(f"the vCPU state was saved by TCG engine {state.engine}, "
                             f"this kemu runs {engine_build()}")
        ctx, data, size = self._context_blob()
        if len(state.env) != size:
            raise StateError(f"vCPU state of {len(state.env)} bytes, the engine's is {size}")
        ctypes.memmove(data, state.env, size)
        self.uc.context_restore(ctx)
        del ctx
        engine.flush_tlb(self.uc)
        if (self.pc, self.uc.reg_read(A.UC_ARM64_REG_PSTATE)) != (state.pc, state.pstate):
            raise StateError("vCPU state: registers do not match the saved context")
        self._hcr = state.hcr & ~HCR_VI      # VI follows the interrupt controller's output
        self._wsys(HCR_EL2, self._hcr)
        self._wsys(CNTVOFF_EL2, self.vtimer.offset)
        request = tuple(state.on_request[:2]) if len(state.on_request) >= 2 else None
        with self._lock:
            self._off, self._on_pending = state.powered_off, state.on_pending
            self._on_request = request
            self._work_pending = True

    def registers(self) -> dict[str, int]:
        uc = self.uc
        regs = {f"x{i}": uc.reg_read(A.UC_ARM64_REG_X0 + i) for i in range(29)}
        regs.update(x29=uc.reg_read(A.UC_ARM64_REG_X29), x30=uc.reg_read(A.UC_ARM64_REG_X30),
                    sp=uc.reg_read(A.UC_ARM64_REG_SP), pc=uc.reg_read(A.UC_ARM64_REG_PC),
                    pstate=uc.reg_read(A.UC_ARM64_REG_PSTATE))
        return regs

    # -- cross-thread controls ------------------------------------------------------
    def _stop_engine_locked(self) -> None:
        """Stop the running CPU at its next block start (``_lock`` held).

        Exact, and never lost: a stop that lands before ``emu_start`` begins
        makes it return at once.
        """
        if self._running and not self._stop_requested:
            self._stop_requested = True
            self.uc.emu_stop()

    def kick(self, final: bool = False) -> None:
        """Make ``run()`` return promptly (any thread); ``final`` is the same stop."""
        with self._lock:
            self._kick_requested = True
            self._work_pending = True
            self._stop_engine_locked()
            self._wake.notify_all()

    def post_work(self) -> None:
        """Have timers and interrupts looked at now (any thread)."""
        if threading.get_ident() == self._thread_id:
            self._work_pending = True   # looked at before emu_start, or in the callback
            return
        with self._lock:
            self._work_pending = True
            self._stop_engine_locked()
            self._wake.notify_all()

    def set_irq(self, level: bool) -> None:
        """The interrupt controller's output to this CPU (any thread)."""
        self._irq_level = level
        if threading.get_ident() == self._thread_id:
            if self._running:
                self._apply_irq()  # taken at the next block start
            else:
                self._work_pending = True
            return
        with self._lock:
            self._work_pending = True
            if level:
                self._stop_engine_locked()
            self._wake.notify_all()

    def wait_for_interrupt(self, timeout: float | None) -> None:
        """Block (WFI) until the IRQ input is high, a kick, or ``timeout`` seconds;
        while powered off, until CPU_ON or a kick."""
        with self._lock:
            if self._off:
                if self._on_request is None and not self._kick_requested:
                    self._wake.wait()
                return
            if not (self._irq_level or self._kick_requested or self._work_pending):
                self._wake.wait(timeout)
            self._work_pending = True     # a timer deadline may be why it woke

    @property
    def irq_pending(self) -> bool:
        return self._irq_level

    # -- work posted by other threads ---------------------------------------------------
    def _apply_irq(self) -> None:
        hcr = (self._hcr | HCR_VI) if self._irq_level else (self._hcr & ~HCR_VI)
        if hcr != self._hcr:
            self._hcr = hcr
            self._wsys(HCR_EL2, hcr)

    def sync_timers(self) -> None:
        """Drive the timers' interrupt outputs from the counter (reads of
        CNTx_CTL compute ISTATUS themselves)."""
        self.vtimer.update()
        self.ptimer.update()

    def _service(self) -> None:
        """Expired timers and the interrupt level, applied to the CPU."""
        self._work_pending = False
        if self._rom_pending:
            with self._lock:
                pending, self._rom_pending = self._rom_pending, []
            for base, romd, changed in pending:
                self._apply_romd(base, romd, changed)
        self.sync_timers()
        self.pmu.service()
        self._apply_irq()

    # -- the run loop -------------------------------------------------------------------
    def run(self) -> Exit:
        self._thread_id = threading.get_ident()
        with self._lock:
            kicked = self._kick_requested
            self._kick_requested = False
            on_request = self._on_request if self._off else None
            self._on_request = None
        if on_request is not None:
            self._power_up(*on_request)
            with self._lock:
                self._off = self._on_pending = False
        if self._off:
            return Kicked() if kicked else Halted()
        if self._work_pending:
            self._service()
        if kicked:
            return Kicked()
        with self._lock:
            self._running = True
        uc = self.uc
        domain = self._domain
        if domain is not None:
            domain.enter(self)
        try:
            uc.emu_start(uc.reg_read(A.UC_ARM64_REG_PC), 0)
        except UcError as e:
            self._error = f"{e} at pc {uc.reg_read(A.UC_ARM64_REG_PC):#x}"
        if domain is not None:
            domain.leave(self)
        with self._lock:
            self._running = False
            stopped = self._stop_requested
            self._stop_requested = False
        # A stop requested as the CPU ended on its own (WFI) is still pending
        # in the engine and ends the next run at once: that run is not a WFI.
        stale, self._stale_stop = self._stale_stop, stopped
        if self._error is not None:
            error, self._error = self._error, None
            return InternalError(error)
        if self._system_event is not None:
            event, self._system_event = self._system_event, None
            return SystemEvent(event)
        if stopped or stale:
            return Kicked()
        return Halted()   # nothing stopped the CPU: it executed WFI (EXCP_HLT)

    def _power_up(self, entry: int, context_id: int) -> None:
        """CPU_ON on the vCPU's own thread: a reset core (timers off, empty TLB)."""
        self.vtimer.write_ctl(0)
        self.ptimer.write_ctl(0)
        engine.flush_tlb(self.uc)
        self.reset_secondary(entry, context_id)
        self._work_pending = True

    # -- coherence-domain member (see kemu.accel.tcg.coherence) ------------------------------
    def stop_for_maintenance(self) -> None:
        with self._lock:
            self._stop_engine_locked()

    def flush_tlb(self) -> None:
        engine.flush_tlb(self.uc)

    def invalidate_code(self, pages: set[int] | None) -> None:
        if pages is None:
            engine.flush_translations(self.uc)
            return
        for page in pages:
            engine.invalidate_phys(self.uc, page, page + coherence.PAGE)

    def _on_maintenance_raw(self, _handle: int, _reg: int, cp: int, key: int) -> int:
        """uc_cb_insn_sys_t for TLBI ...IS and IC IVAU/IALLUIS/IALLU: broadcast,
        then let the instruction run (returns 0) for its local effect."""
        try:
            if key == _KEY_IC_IVAU:
                va = ctypes.c_uint64.from_address(cp + 24).value
                pa = engine.translate_read(self.uc, va)
                if pa is not None:
                    self._domain.broadcast_code_invalidation(self, pa & ~(coherence.PAGE - 1))
            elif key == _KEY_IC_IALLUIS:
                self._domain.broadcast_code_invalidation(self, coherence.ALL_CODE)
            elif key == _KEY_IC_IALLU:
                self._domain.broadcast_code_invalidation(self, coherence.ALL_CODE, local=True)
            else:
                self._domain.broadcast_tlb_flush(self)
            return 0
        except BaseException as e:  # a bug in kemu: stop the guest, report it
            self._fail(f"internal error in the maintenance hook: {type(e).__name__}: {e}")
            return 0

    # -- hooks (called on the vCPU thread, inside emu_start) ---------------------------------
    def _mmio_done(self) -> None:
        if self._work_pending:
            self._service()

    def _mmio_read(self, uc: Uc, offset: int, size: int, base: int) -> int:
        try:
            value = self._io(MmioRead(base + offset, size))
        except DecodeError:     # nothing there: an external abort for the guest
            engine.mmio_bus_error(uc)
            value = 0
        self._mmio_done()
        return value or 0

    def _mmio_write(self, uc: Uc, offset: int, size: int, value: int, base: int) -> None:
        try:
            self._io(MmioWrite(base + offset, size, value))
        except DecodeError:
            engine.mmio_bus_error(uc)
        self._mmio_done()

    def _on_msr_raw(self, _handle: int, _reg: int, cp: int, key: int) -> int:
        """uc_cb_insn_sys_t for a timer register: ``cp`` points at a uc_arm64_cp_reg."""
        try:
            timer, field = self._timer_by_key[key]
            value = ctypes.c_uint64.from_address(cp + 24).value
            if field == "ctl":
                timer.write_ctl(value)
            elif field == "cval":
                timer.write_cval(value)
            else:
                timer.write_tval(value)
            # CVAL as the CPU's TVAL and CVAL reads see it (CTL reads are hooked).
            self._wsys(self._timer_cval_reg[id(timer)], timer.cval)
            self.on_timer_change()
            if self._work_pending:
                self._service()
            return 1
        except BaseException as e:  # a bug in kemu: stop the guest, report it
            self._fail(f"internal error in the MSR hook: {type(e).__name__}: {e}")
            return 0

    def _mrs_result(self, reg: int, value: int) -> None:
        """``value`` into the destination register of a hooked MRS."""
        if reg != A.UC_ARM64_REG_XZR:
            self._mrs_value.value = value
            if uclib.uc_reg_write(self._uch, reg, ctypes.byref(self._mrs_value)):
                raise AccelError("Unicorn refused a register write")

    def _on_mrs_raw(self, _handle: int, reg: int, _cp: int, key: int) -> int:
        """uc_cb_insn_sys_t for CNTx_CTL_EL0 reads: the value with ISTATUS as of now."""
        try:
            self._mrs_result(reg, self._ctl_by_key[key].ctl_value())
            if self._work_pending:
                self._service()
            return 1
        except BaseException as e:  # a bug in kemu: stop the guest, report it
            self._fail(f"internal error in the MRS hook: {type(e).__name__}: {e}")
            return 0

    def _on_sysreg_raw(self, _handle: int, reg: int, cp: int, key: int) -> int:
        """uc_cb_insn_sys_t for a device's system register (the GICv3 ICC_* registers)."""
        try:
            enc, is_write = self._sysreg_keys[key - _KEY_SYSREG]
            if is_write:
                self._gicv3.write(self.index, enc, ctypes.c_uint64.from_address(cp + 24).value)
            else:
                self._mrs_result(reg, self._gicv3.read(self.index, enc))
            if self._work_pending:
                self._service()
            return 1
        except BaseException as e:  # a bug in kemu: stop the guest, report it
            self._fail(f"internal error in the system register hook: {type(e).__name__}: {e}")
            return 0

    def _on_exception_raw(self, _handle: int, intno: int, _key: int) -> None:
        """uc_cb_hookintr_t: HVC or SMC (outside translated code)."""
        try:
            if intno not in (EXCP_HVC, EXCP_SMC):
                raise AccelError(f"unexpected exception {intno} for the board")
            args = list(self._hvc_args.read())
            self._x0.write(self._hypercall(self.index, args))
            if self._work_pending:
                self._service()
        except BaseException as e:  # a bug in kemu: stop the guest, report it
            self._fail(f"internal error in the exception hook: {type(e).__name__}: {e}")

    def _fail(self, message: str) -> None:
        self._error = message
        self.uc.emu_stop()

    # -- called by the board's hooks to end the run ------------------------------------------
    def request_system_event(self, kind: str) -> None:
        self._system_event = kind
        self.uc.emu_stop()
