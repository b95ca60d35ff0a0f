"""The vCPU's performance monitors (PMUv3) as QEMU's TCG runs them.

The PMU itself is QEMU's (target/arm/helper.c in the engine); engine patch
0030 (third_party/unicorn) gives it what Unicorn had cut out:

* ``UC_CTL_ARM_PMU_COUNTERS``: PMCR_EL0.N = 6 event counters, as QEMU 7.2's
  Cortex-A53/A57/A72 and ``max`` (Unicorn had 4), and MDCR_EL2.HPMN reset to
  it (with HPMN 0, EL2 being present, no event counter would count);
* ``UC_CTL_ARM_PMU``: counters that keep their value between accesses
  (PMCCNTR_EL0 counts the host's CLOCK_MONOTONIC at 1 GHz, as QEMU counts
  its virtual clock), and a callback with the overflow interrupt request
  (PMCR.E && PMINTEN & PMOVS) and the time of the next counter overflow;
* ``UC_CTL_ARM_PMU_SYNC``: QEMU's PMU timer callback, run when that time has
  come (the board's deadline kicker wakes the vCPU for it).

Events QEMU does not count (INST_RETIRED without icount) stay uncounted,
as in QEMU; SW_INCR and CPU_CYCLES count.
"""

from __future__ import annotations

import ctypes
import time
from typing import Callable

from unicorn import Uc
from unicorn.unicorn_py3.unicorn import uclib

from kemu.accel.tcg import engine
from kemu.devices.base import IrqLine
from kemu.errors import AccelError

UC_CTL_ARM_PMU = 26
UC_CTL_ARM_PMU_SYNC = 27
UC_CTL_ARM_PMU_COUNTERS = 28

#: PMCR_EL0.N of QEMU 7.2's Cortex-A53/A57/A72 and max (reset_pmcr_el0 0x410x3000).
PMU_COUNTERS = 6
NO_DEADLINE = (1 << 63) - 1

#: uc_cb_arm_pmu_t(uc, irq_level, deadline_ns, user_data)
PMU_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                                ctypes.c_void_p)

_REBUILD = "; scripts/bootstrap.sh rebuilds kemu's engine"


def set_counters(uc: Uc, n: int = PMU_COUNTERS) -> None:
    """PMCR_EL0.N; before the engine creates its CPU (right after the CPU model)."""
    if engine.uc_ctl_write(uc, UC_CTL_ARM_PMU_COUNTERS, n):
        raise AccelError("the engine has no PMU counter setting (UC_CTL_ARM_PMU_COUNTERS)"
                         + _REBUILD)


class Pmu:
    """One vCPU's PMU outputs: its interrupt line and its overflow deadline.

    The engine calls back on the vCPU's thread (inside an MSR, an exception
    entry or :meth:`service`); ``on_deadline`` tells the board's kicker
    that an earlier deadline exists, ``on_error`` stops the guest on a bug.
    """

    def __init__(self, uc: Uc, irq: IrqLine, on_deadline: Callable[[], None],
                 on_error: Callable[[str], None]) -> None:
        self._uc = uc
        self.irq = irq
        self._on_deadline = on_deadline
        self._on_error = on_error
        self._deadline_ns: int | None = None
        self._level = False
        self._callback = PMU_CALLBACK(self._on_engine)
        if uclib.uc_ctl(uc._uch, engine._ctl(2, engine._UC_CTL_IO_WRITE, UC_CTL_ARM_PMU),
                        self._callback, ctypes.c_void_p(0)):
            raise AccelError("the engine has no PMU outputs (UC_CTL_ARM_PMU)" + _REBUILD)

    @property
    def level(self) -> bool:
        return self._level

    def deadline(self) -> float | None:
        """The next counter overflow in time.monotonic() seconds, or None."""
        d = self._deadline_ns
        return None if d is None else d / 1e9

    def service(self) -> None:
        """On the vCPU's thread: counters brought up to date once an overflow is due."""
        d = self._deadline_ns
        if d is None or time.monotonic_ns() < d:
            return
        out = ctypes.c_int64()
        if uclib.uc_ctl(self._uc._uch, engine._ctl(1, engine._UC_CTL_IO_READ,
                                                   UC_CTL_ARM_PMU_SYNC), ctypes.byref(out)):
            raise AccelError("Unicorn refused a PMU update")
        self._deadline_ns = None if out.value == NO_DEADLINE else out.value

    def _on_engine(self, _uc: int, level: int, deadline_ns: int, _user: int) -> None:
        try:
            new_deadline = None if deadline_ns == NO_DEADLINE else deadline_ns
            changed = new_deadline != self._deadline_ns
            self._deadline_ns = new_deadline
            if bool(level) != self._level:
                self._level = bool(level)
                self.irq.set(self._level)
            if changed and new_deadline is not None:
                self._on_deadline()
        except BaseException as e:  # a bug in kemu: stop the guest, report it
            self._on_error(f"internal error in the PMU callback: {type(e).__name__}: {e}")
