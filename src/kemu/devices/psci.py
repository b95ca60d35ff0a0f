"""Power State Coordination Interface (PSCI) firmware, version 1.0.

Function identifiers and return codes from Arm DEN 0022 (PSCI), chapter 5
("PSCI function summary"), using the SMC Calling Convention (Arm DEN 0028).
The guest reaches it through HVC; the accelerator hands the call's registers
to :meth:`Psci.call`, which returns the value for x0.  Power actions are
reported through the ``on_system_event`` callback handed in by the board.
"""

from __future__ import annotations

import enum
from typing import Callable, Protocol, Sequence

PSCI_VERSION = 0x84000000
CPU_SUSPEND_32 = 0x84000001
CPU_SUSPEND_64 = 0xC4000001
CPU_OFF = 0x84000002
CPU_ON_32 = 0x84000003
CPU_ON_64 = 0xC4000003
AFFINITY_INFO_32 = 0x84000004
AFFINITY_INFO_64 = 0xC4000004
MIGRATE_INFO_TYPE = 0x84000006
SYSTEM_OFF = 0x84000008
SYSTEM_RESET = 0x84000009
PSCI_FEATURES = 0x8400000A

SUCCESS = 0
NOT_SUPPORTED = -1
INVALID_PARAMETERS = -2
DENIED = -3
ALREADY_ON = -4
ON_PENDING = -5

#: MIGRATE_INFO_TYPE: "Trusted OS is not present or does not require migration".
TOS_NOT_PRESENT_MP = 2

VERSION_1_0 = 0x00010000

#: AFFINITY_INFO results (5.1.5).
AFF_ON, AFF_OFF, AFF_ON_PENDING = 0, 1, 2
#: MPIDR affinity fields above Aff0: Aff3 [39:32], Aff2 [23:16], Aff1 [15:8].
AFF_ABOVE_0 = 0xFF_00FF_FF00


class SystemEvent(enum.Enum):
    POWEROFF = "poweroff"
    RESET = "reset"


class CpuControl(Protocol):
    """What PSCI needs from the board to start and stop secondary CPUs."""

    def cpu_on(self, mpidr: int, entry: int, context_id: int) -> int: ...

    def cpu_off(self, cpu: int) -> int: ...

    def affinity_info(self, mpidr: int) -> int: ...


class Psci:
    """Firmware-side PSCI state machine; stateless apart from its callbacks."""

    name = "psci"

    def __init__(self, on_system_event: Callable[[SystemEvent], None],
                 cpus: CpuControl | None = None) -> None:
        self.on_system_event = on_system_event
        self.cpus = cpus

    def supported(self) -> set[int]:
        ids = {PSCI_VERSION, CPU_SUSPEND_32, CPU_SUSPEND_64, MIGRATE_INFO_TYPE, SYSTEM_OFF,
               SYSTEM_RESET, PSCI_FEATURES}
        if self.cpus is not None:
            ids |= {CPU_OFF, CPU_ON_32, CPU_ON_64, AFFINITY_INFO_32, AFFINITY_INFO_64}
        return ids

    def call(self, cpu: int, x0: int, x1: int, x2: int, x3: int) -> int:
        """Handle one call; returns x0 (as a 64-bit two's complement value)."""
        fn = x0 & 0xFFFFFFFF
        if fn == PSCI_VERSION:
            ret = VERSION_1_0
        elif fn in (CPU_SUSPEND_32, CPU_SUSPEND_64):
            # A standby power state behaves like WFI; returning at once is allowed.
            ret = SUCCESS
        elif fn == MIGRATE_INFO_TYPE:
            ret = TOS_NOT_PRESENT_MP
        elif fn == SYSTEM_OFF:
            self.on_system_event(SystemEvent.POWEROFF)
            ret = SUCCESS
        elif fn == SYSTEM_RESET:
            self.on_system_event(SystemEvent.RESET)
            ret = SUCCESS
        elif fn == PSCI_FEATURES:
            ret = SUCCESS if (x1 & 0xFFFFFFFF) in self.supported() else NOT_SUPPORTED
        elif self.cpus is not None and fn in (CPU_ON_32, CPU_ON_64):
            ret = self.cpus.cpu_on(x1, x2, x3)
        elif self.cpus is not None and fn == CPU_OFF:
            ret = self.cpus.cpu_off(cpu)
        elif self.cpus is not None and fn in (AFFINITY_INFO_32, AFFINITY_INFO_64):
            ret = self.cpus.affinity_info(x1)
        else:
            ret = NOT_SUPPORTED
        return ret & ((1 << 64) - 1)


class CpuPower(Protocol):
    """One CPU's power state as PSCI sees it (the accelerator's vCPU)."""

    @property
    def powered_on(self) -> bool: ...

    @property
    def on_pending(self) -> bool: ...

    def power_on(self, entry: int, context_id: int) -> None: ...

    def power_off(self) -> None: ...


class CpuPowerControl:
    """:class:`CpuControl` over a board's CPUs, addressed by MPIDR: CPU i's
    affinity is ``affinities[i]``, by default Aff0 = CPU index and the other
    affinity levels 0 (QEMU's virt up to 8 CPUs).

    ``cpus()`` gives the current CPUs (a reset replaces them); called under the
    board's lock, as :meth:`Psci.call` is.
    """

    def __init__(self, cpus: Callable[[], Sequence[CpuPower]],
                 affinities: Sequence[int] | None = None) -> None:
        self._cpus = cpus
        self._index = (None if affinities is None else
                       {a & (AFF_ABOVE_0 | 0xFF): i for i, a in enumerate(affinities)})

    def _by_mpidr(self, target: int) -> CpuPower | None:
        cpus = self._cpus()
        if self._index is not None:
            index = self._index.get(target & (AFF_ABOVE_0 | 0xFF))
        else:
            index = None if target & AFF_ABOVE_0 else target & 0xFF
        if index is None or index >= len(cpus):
            return None
        return cpus[index]

    def cpu_on(self, mpidr: int, entry: int, context_id: int) -> int:
        """CPU_ON (5.1.4): the target starts at ``entry`` with x0 = ``context_id``."""
        cpu = self._by_mpidr(mpidr)
        if cpu is None:
            return INVALID_PARAMETERS
        if cpu.powered_on:
            return ALREADY_ON
        if cpu.on_pending:
            return ON_PENDING
        cpu.power_on(entry, context_id)
        return SUCCESS

    def cpu_off(self, cpu: int) -> int:
        """CPU_OFF (5.1.3) from CPU ``cpu`` itself: it does not return to the caller."""
        self._cpus()[cpu].power_off()
        return SUCCESS

    def affinity_info(self, mpidr: int) -> int:
        """AFFINITY_INFO (5.1.5) at affinity level 0."""
        cpu = self._by_mpidr(mpidr)
        if cpu is None:
            return INVALID_PARAMETERS
        if cpu.powered_on:
            return AFF_ON
        return AFF_ON_PENDING if cpu.on_pending else AFF_OFF
