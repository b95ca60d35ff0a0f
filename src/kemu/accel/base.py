"""The narrow interface between boards and the CPU accelerators.

A vCPU's ``run()`` returns an *exit* as a frozen dataclass: what stopped the
guest and what it wants.  Port I/O and MMIO exits are turned into bus
accesses by :func:`dispatch`, a pure function over (exit, buses), so tests
can feed it made-up exits.  Devices and boards never import an accelerator
module; accelerators never import a board.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Union

from kemu.bus import Bus


@dataclass(frozen=True)
class MmioRead:
    addr: int
    size: int


@dataclass(frozen=True)
class MmioWrite:
    addr: int
    size: int
    value: int


@dataclass(frozen=True)
class IoIn:
    port: int
    size: int


@dataclass(frozen=True)
class IoOut:
    port: int
    size: int
    value: int


@dataclass(frozen=True)
class Halted:
    """The vCPU waits for an interrupt (WFI, HLT)."""


@dataclass(frozen=True)
class Kicked:
    """``run()`` returned because another thread asked the vCPU to stop."""


@dataclass(frozen=True)
class SystemEvent:
    """The guest asked for power off or reset (PSCI, i8042, triple fault)."""

    kind: str  # "poweroff" | "reset"


@dataclass(frozen=True)
class InternalError:
    """The accelerator cannot continue the guest."""

    message: str


IoExit = Union[MmioRead, MmioWrite, IoIn, IoOut]
Exit = Union[MmioRead, MmioWrite, IoIn, IoOut, Halted, Kicked, SystemEvent, InternalError]


def dispatch(exit: IoExit, mmio: Bus, pio: Bus | None = None) -> int | None:
    """Perform the bus access an I/O exit asks for; reads return the value."""
    if isinstance(exit, MmioRead):
        return mmio.read(exit.addr, exit.size)
    if isinstance(exit, MmioWrite):
        mmio.write(exit.addr, exit.size, exit.value)
        return None
    if pio is None:
        raise TypeError(f"{exit!r}: this machine has no port I/O bus")
    if isinstance(exit, IoIn):
        return pio.read(exit.port, exit.size)
    if isinstance(exit, IoOut):
        pio.write(exit.port, exit.size, exit.value)
        return None
    raise TypeError(f"not an I/O exit: {exit!r}")


class Vcpu(Protocol):
    index: int

    def run(self) -> Exit:
        """Run guest code until something needs the VMM; return why."""
        ...

    def kick(self) -> None:
        """From any thread: make a running ``run()`` return :class:`Kicked` soon."""
        ...

    def set_irq(self, level: bool) -> None:
        """Level of the interrupt request input (applied on the vCPU's thread)."""
        ...
