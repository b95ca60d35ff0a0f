"""An ACPI Generic Event Device (ACPI 6.5, 5.6.9) carrying the power button.

Hardware-reduced platforms have no fixed power-button event: the DSDT
describes a GED (``ACPI0013``) with one interrupt, and its ``_EVT`` method
reads an event selector register to learn what happened; for the power
button it notifies the ``PNP0C0C`` device, and Linux's button driver turns
that into KEY_POWER (busybox ``acpid`` in the default guest powers off).

The selector is one 32-bit register (kemu's layout, described by the
DSDT that :func:`kemu.boot.acpi.dsdt` writes): reading it returns the pending
events and clears them, which lowers the level-triggered interrupt.
"""

from __future__ import annotations

from dataclasses import dataclass

from kemu.boot.acpi import GED_EVENT_POWER_BUTTON
from kemu.devices.base import IrqLine

SELECTOR = 0
SIZE = 4


@dataclass
class AcpiGedState:
    version: int
    pending: int


class AcpiGed:
    def __init__(self, irq: IrqLine, name: str = "acpi-ged") -> None:
        self.name = name
        self.irq = irq
        self.pending = 0

    def press_power_button(self) -> None:
        self.pending |= GED_EVENT_POWER_BUTTON
        self.irq.set(True)

    def read(self, offset: int, size: int) -> int:
        if offset != SELECTOR:
            return 0
        events, self.pending = self.pending, 0
        self.irq.set(False)
        return events

    def write(self, offset: int, size: int, value: int) -> None:
        """Read-only: writes are ignored."""

    def reset(self) -> None:
        self.pending = 0
        self.irq.set(False)

    # -- state -------------------------------------------------------------------------------
    def save(self) -> AcpiGedState:
        return AcpiGedState(1, self.pending)

    def restore(self, state: AcpiGedState) -> None:
        from kemu.state import check_version
        check_version(self.name, state.version)
        self.pending = state.pending & GED_EVENT_POWER_BUTTON
        self.irq.set(bool(self.pending))
