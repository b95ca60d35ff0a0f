"""The device protocol and interrupt lines.

Devices are sans-I/O state machines over register accesses: ``read(offset,
size)`` and ``write(offset, size, value)`` with offsets relative to where the
device is mapped.  Their side effects go through objects handed in at
construction: :class:`IrqLine` for interrupts, backends for host I/O.
Devices never import an accelerator.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable


@runtime_checkable
class Device(Protocol):
    name: str

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class IrqLine:
    """One interrupt wire: a level that a device drives and a sink observes.

    ``sink(level)`` is called on every change of level.  Edge-style users call
    :meth:`pulse`.
    """

    __slots__ = ("name", "level", "_sink")

    def __init__(self, sink: Callable[[bool], None] | None = None, name: str = "irq") -> None:
        self.name = name
        self.level = False
        self._sink = sink

    def connect(self, sink: Callable[[bool], None]) -> None:
        self._sink = sink

    def set(self, level: bool) -> None:
        level = bool(level)
        if level != self.level:
            self.level = level
            if self._sink is not None:
                self._sink(level)

    def raise_(self) -> None:
        self.set(True)

    def lower(self) -> None:
        self.set(False)

    def pulse(self) -> None:
        self.set(True)
        self.set(False)


class Stateful(Protocol):
    """Devices whose state can be saved and restored as plain data."""

    def save(self) -> Any: ...

    def restore(self, state: Any) -> None: ...
