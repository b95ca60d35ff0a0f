"""Machine configuration: plain data made by the CLI or the Python API."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20


@dataclass
class MachineConfig:
    machine: str = "virt"
    accel: str = "tcg"
    cpu: str = "cortex-a57"
    smp: int = 1
    memory: int = 128 * MiB
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    #: On a guest reset, stop the machine instead of rebooting it (-no-reboot).
    no_reboot: bool = False
    #: Start with the CPUs stopped (-S).
    start_paused: bool = False
    name: str | None = None
    extra: dict = field(default_factory=dict)
