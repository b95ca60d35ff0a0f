"""kemu's TCG engine: Unicorn 2.1.4 with the patch series in third_party/unicorn.

Stock Unicorn is not enough for a full system (see PLATFORM.md): it checks
its exit request after every guest load and store and rewinds the PC onto
an instruction that already ran, so it cannot be stopped from another
thread, and it runs guests about 2x slower than QEMU.  The patches add
opt-in switches (their defaults keep Unicorn's behaviour), which every vCPU
turns on:

* ``UC_CTL_TCG_EXACT_STOP``: exit requests are checked only at the start of
  a translation block, inline as in QEMU.  ``uc_emu_stop()`` from any thread
  leaves the CPU at a block boundary with its state exact; a stop requested
  while the CPU is not running is kept for the next ``uc_emu_start()``; an
  interrupt raised by the CPU itself is taken at the next block start.
* ``UC_CTL_TCG_TRACK_CODE_PAGES``: stores take the slow path only on pages
  that hold translated code, as in QEMU.
* ``UC_CTL_CPU_NATIVE_EXCEPTIONS``: synchronous exceptions are taken by the
  CPU as the architecture says (QEMU's own exception entry) instead of by a
  Python callback.
* ``UC_CTL_CPU_BUS_ERRORS``: a load, store or instruction fetch with nothing
  behind its physical address (no memory, or an MMIO callback that reports
  a decode error through ``UC_CTL_MMIO_BUS_ERROR``) is a synchronous
  external abort for the guest, as QEMU raises it, not the end of the run.
* ``UC_CTL_CPU_ARCH_CHECKS``: what the architecture says and the engine's
  QEMU 5.0 left out: hardware watchpoints (DBGWVR/DBGWCR) fire, the OS lock
  disables breakpoints, watchpoints and software step, SCTLR_EL1.A checks
  every access's alignment, and unaligned data accesses to Device memory
  (all of them with the MMU off) are Alignment faults.
* ``UC_CTL_ARM_PMU``, ``UC_CTL_ARM_PMU_SYNC``, ``UC_CTL_ARM_PMU_COUNTERS``: the
  PMU as QEMU runs it (:mod:`kemu.accel.tcg.pmu`).
* ``UC_CTL_MMIO_ROMD``, ``UC_CTL_MMIO_ROMD_MODE`` (boards with flash only): an
  MMIO region backed by host memory for reads and instruction fetches while
  the device is in read-array mode, as QEMU's ROM devices; writes always
  reach the device (:mod:`kemu.devices.pflash_cfi01`).
* ``UC_ARM64_INS_SYSREG``: an MSR hook on one system register, so that only
  the generic-timer registers call into Python.
* ``UC_CTL_ARM64_SYSREG_HOOKS_CHECKED``: those hooks see only accesses the
  exception level may make (an EL0 access to an EL1 register is UNDEFINED
  before any hook).
* ``UC_CTL_ARM64_GICV3_CPUIF`` (a board with a GICv3 only): the CPU has the
  ICC_* system registers, given their behaviour by hooks, and
  ID_AA64PFR0_EL1.GIC says so.
* ``UC_CTL_TCG_PARALLEL`` (vCPUs of an SMP machine only): translation as
  QEMU's multi-threaded TCG does it, so exclusives and atomics are host
  atomics and barriers host barriers across vCPU threads; and
  ``UC_CTL_TB_INVALIDATE_PHYS``, which drops the translations of guest
  physical pages another vCPU wrote code into.

kemu supports this engine only: with a stock Unicorn the TCG accelerator
refuses to start and says how to build the engine (one interrupt-delivery
mechanism, the exact asynchronous stop, instead of two).
"""

from __future__ import annotations

import ctypes

from unicorn import Uc
from unicorn.unicorn_py3.unicorn import uclib

from kemu.errors import AccelError

UNICORN_VERSION = "2.1.4"

# uc_control_type values added by the patch series (unicorn.h).
UC_CTL_TCG_EXACT_STOP = 15
UC_CTL_TCG_TRACK_CODE_PAGES = 16
UC_CTL_CPU_NATIVE_EXCEPTIONS = 17
UC_CTL_TCG_PARALLEL = 18
UC_CTL_TB_INVALIDATE_PHYS = 19
UC_CTL_ARM64_GICV3_CPUIF = 20
UC_CTL_ARM64_SYSREG_HOOKS_CHECKED = 21
UC_CTL_CPU_BUS_ERRORS = 23
UC_CTL_MMIO_BUS_ERROR = 24
UC_CTL_CPU_ARCH_CHECKS = 25
UC_CTL_MMIO_ROMD = 29
UC_CTL_MMIO_ROMD_MODE = 30
#: UC_ARCH_CHECK_WATCHPOINTS | _OS_LOCK | _ALIGNMENT | _DEVICE_ALIGNMENT
ARCH_CHECKS_ALL = 0xF
_UC_CTL_TB_FLUSH = 10
_UC_CTL_TLB_FLUSH = 11
_UC_PROT_READ = 1
_UC_CTL_IO_WRITE = 1
_UC_CTL_IO_READ = 2
_UC_ERR_ARG = 15

#: What a stock engine is told, in one line.
STOCK_ENGINE = ("the tcg accelerator needs kemu's build of Unicorn {version} "
                "(scripts/bootstrap.sh builds it, 1-6 min): the stock engine cannot stop a "
                "running guest without corrupting it, so a guest that spins would never see "
                "its interrupts, and it runs guests about 2x slower")


def _ctl(nr_args: int, rw: int, ctl: int) -> int:
    return ctl | (nr_args << 26) | (rw << 30)


def uc_ctl_write(uc: Uc, ctl: int, value: int, ctype=ctypes.c_int) -> int:
    return uclib.uc_ctl(uc._uch, _ctl(1, _UC_CTL_IO_WRITE, ctl), ctype(value))


def uc_ctl_read(uc: Uc, ctl: int, ctype=ctypes.c_int) -> int:
    out = ctype()
    if uclib.uc_ctl(uc._uch, _ctl(1, _UC_CTL_IO_READ, ctl), ctypes.byref(out)):
        raise AccelError("Unicorn refused a control read")
    return out.value


def set_parallel(uc: Uc) -> None:
    """Translate for several vCPU threads over the same RAM (patch 0007), or refuse."""
    if uc_ctl_write(uc, UC_CTL_TCG_PARALLEL, 1):
        raise AccelError("the engine has no parallel translation (UC_CTL_TCG_PARALLEL): "
                         "-smp needs kemu's current engine; scripts/bootstrap.sh rebuilds it")


def enable_gicv3_cpuif(uc: Uc) -> None:
    """The GICv3 CPU interface registers on this CPU (patch 0010), or refuse."""
    if uc_ctl_write(uc, UC_CTL_ARM64_GICV3_CPUIF, 1):
        raise AccelError("the engine has no GICv3 CPU interface registers "
                         "(UC_CTL_ARM64_GICV3_CPUIF): gic-version=3 needs kemu's current "
                         "engine; scripts/bootstrap.sh rebuilds it")


def make_rom_device(uc: Uc, base: int, host_address: int) -> None:
    """The MMIO region mapped at ``base`` reads and executes from ``host_address``
    (its size) while in ROMD mode; writes still call back (patch 0040), or refuse."""
    if uclib.uc_ctl(uc._uch, _ctl(2, _UC_CTL_IO_WRITE, UC_CTL_MMIO_ROMD),
                    ctypes.c_uint64(base), ctypes.c_void_p(host_address)):
        raise AccelError("the engine has no ROM devices (UC_CTL_MMIO_ROMD): firmware in "
                         "flash needs kemu's current engine; scripts/bootstrap.sh rebuilds it")


def set_romd_mode(uc: Uc, base: int, romd: bool) -> None:
    """ROMD mode of the ROM device at ``base`` (its own thread; also from its callbacks)."""
    if uclib.uc_ctl(uc._uch, _ctl(2, _UC_CTL_IO_WRITE, UC_CTL_MMIO_ROMD_MODE),
                    ctypes.c_uint64(base), ctypes.c_int(int(romd))):
        raise AccelError("Unicorn refused a ROM device mode switch")


def flush_tlb(uc: Uc) -> None:
    """Flush the whole TLB of ``uc`` (its own thread; also from inside its hooks)."""
    if uclib.uc_ctl(uc._uch, _ctl(0, _UC_CTL_IO_WRITE, _UC_CTL_TLB_FLUSH)):
        raise AccelError("Unicorn refused a TLB flush")


def flush_translations(uc: Uc) -> None:
    """Drop every translated block of ``uc`` (its own thread, outside emu_start)."""
    if uclib.uc_ctl(uc._uch, _ctl(0, _UC_CTL_IO_WRITE, _UC_CTL_TB_FLUSH)):
        raise AccelError("Unicorn refused a translation cache flush")


def invalidate_phys(uc: Uc, start: int, end: int) -> None:
    """Drop the translations of guest physical pages [start, end) (outside emu_start)."""
    if uclib.uc_ctl(uc._uch, _ctl(2, _UC_CTL_IO_WRITE, UC_CTL_TB_INVALIDATE_PHYS),
                    ctypes.c_uint64(start), ctypes.c_uint64(end)):
        raise AccelError("Unicorn refused a translation invalidation")


def mmio_bus_error(uc: Uc) -> None:
    """From an MMIO callback: the access in progress decodes to nothing (a bus error)."""
    if uclib.uc_ctl(uc._uch, _ctl(0, _UC_CTL_IO_WRITE, UC_CTL_MMIO_BUS_ERROR)):
        raise AccelError("Unicorn refused a bus error report")


def translate_read(uc: Uc, va: int) -> int | None:
    """The guest physical address of ``va`` for a read by the current context, or None."""
    out = ctypes.c_uint64()
    if uclib.uc_vmem_translate(uc._uch, ctypes.c_uint64(va), ctypes.c_int(_UC_PROT_READ),
                               ctypes.byref(out)):
        return None
    return out.value


def sysreg_insn(insn: int, enc: tuple[int, int, int, int, int]) -> int:
    """UC_ARM64_INS_SYSREG(insn, op0, op1, crn, crm, op2): a hook on one register."""
    op0, op1, crn, crm, op2 = enc
    packed = (op0 & 3) << 14 | (op1 & 7) << 11 | (crn & 15) << 7 | (crm & 15) << 3 | (op2 & 7)
    return insn | 0x100 | packed << 12


def add_sysreg_hook(uc: Uc, callback: ctypes._CFuncPtr, insn: int,
                    enc: tuple[int, int, int, int, int], key: int) -> None:
    """A UC_HOOK_INSN ``insn`` (MRS/MSR/SYS/SYSL) hook on the register ``enc`` only.

    ``key`` (nonzero) comes back as the callback's user data; the caller
    keeps ``callback`` alive.
    """
    import unicorn

    handle = ctypes.c_size_t()
    if uclib.uc_hook_add(uc._uch, ctypes.byref(handle), unicorn.UC_HOOK_INSN, callback,
                         ctypes.c_void_p(key), ctypes.c_uint64(1), ctypes.c_uint64(0),
                         ctypes.c_int(sysreg_insn(insn, enc))):
        raise AccelError("Unicorn refused a system register hook")


def configure(uc: Uc, native_exceptions: int) -> None:
    """Turn on the patch series' switches for a full-system vCPU, or refuse."""
    import unicorn

    if unicorn.__version__ != UNICORN_VERSION:
        raise AccelError(f"kemu needs unicorn=={UNICORN_VERSION}, found {unicorn.__version__}")
    err = uc_ctl_write(uc, UC_CTL_TCG_EXACT_STOP, 1)
    if err == _UC_ERR_ARG:
        raise AccelError(STOCK_ENGINE.format(version=UNICORN_VERSION))
    if (err or uc_ctl_write(uc, UC_CTL_TCG_TRACK_CODE_PAGES, 1)
            or uc_ctl_write(uc, UC_CTL_CPU_NATIVE_EXCEPTIONS, native_exceptions,
                            ctypes.c_uint64)
            or uc_ctl_write(uc, UC_CTL_ARM64_SYSREG_HOOKS_CHECKED, 1)
            or uc_ctl_write(uc, UC_CTL_CPU_BUS_ERRORS, 1)
            or uc_ctl_write(uc, UC_CTL_CPU_ARCH_CHECKS, ARCH_CHECKS_ALL, ctypes.c_uint32)):
        raise AccelError("Unicorn refused kemu's engine settings (a partial build of the "
                         "patch series? scripts/build-unicorn.sh rebuilds it)")
    # No exit address: emu_start's ``until`` (0) would otherwise stop the CPU
    # when the guest jumps to address 0, as if it had executed WFI, where the
    # guest must take its abort.
    uc.ctl_exits_enabled(True)
