"""ACPI hardware-reduced sleep registers (ACPI 6.5, 4.8.3.7 and 4.8.3.8).

On a hardware-reduced platform the OS enters a sleep state by writing
``SLP_TYPx << 2 | SLP_EN`` to the FADT's sleep control register, with
SLP_TYPx taken from the ``\\_Sx`` package of the DSDT; it then polls the
sleep status register for WAK_STS.  Two one-byte registers: control at
offset 0, status at offset 1.  Entering S5 (soft off, the type
:data:`kemu.boot.acpi.S5_SLEEP_TYPE`) calls ``poweroff()``; other sleep
states are not supported and are ignored (the guest keeps running, as if
woken at once: WAK_STS reads set).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kemu.boot.acpi import (
    S5_SLEEP_TYPE,
    SLEEP_CONTROL_SLP_EN,
    SLEEP_STATUS_WAK_STS,
    SLEEP_TYPE_MASK,
    SLEEP_TYPE_SHIFT,
)

CONTROL = 0
STATUS = 1


@dataclass
class AcpiSleepState:
    version: int
    wake_status: bool


class AcpiSleep:
    def __init__(self, poweroff: Callable[[], None], name: str = "acpi-sleep") -> None:
        self.name = name
        self.poweroff = poweroff
        self.wake_status = False

    def read(self, offset: int, size: int) -> int:
        if offset == STATUS:
            return SLEEP_STATUS_WAK_STS if self.wake_status else 0
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == STATUS:
            if value & SLEEP_STATUS_WAK_STS:
                self.wake_status = False        # write 1 to clear
        elif offset == CONTROL and value & SLEEP_CONTROL_SLP_EN:
            if (value & SLEEP_TYPE_MASK) >> SLEEP_TYPE_SHIFT == S5_SLEEP_TYPE:
                self.poweroff()
            else:
                self.wake_status = True

    # -- state -------------------------------------------------------------------------------
    def save(self) -> AcpiSleepState:
        return AcpiSleepState(1, self.wake_status)

    def restore(self, state: AcpiSleepState) -> None:
        from kemu.state import check_version
        check_version(self.name, state.version)
        self.wake_status = bool(state.wake_status)
