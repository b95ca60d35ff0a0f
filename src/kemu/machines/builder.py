"""The one place that turns a :class:`MachineConfig` into a running machine."""

from __future__ import annotations

from kemu.backends.serial import SerialBackend
from kemu.errors import ConfigError
from kemu.machines.config import MachineConfig

MACHINES = ("virt", "microvm", "none")
#: The accelerators each board runs on, the first one its default.
ACCELS = {"virt": ("tcg",), "microvm": ("kvm",), "none": ("tcg",)}


def build(config: MachineConfig, console: SerialBackend, ram_fd: int | None = None):
    """The board for ``config``; ``ram_fd``: guest RAM mapped private from a
    snapshot's memory file (a restored machine)."""
    if config.machine not in MACHINES:
        raise ConfigError(f"unsupported machine type {config.machine!r} "
                          f"(supported: {', '.join(MACHINES)})")
    if config.accel not in ACCELS[config.machine]:
        raise ConfigError(f"the {config.machine} machine runs on the "
                          f"{'/'.join(ACCELS[config.machine])} accelerator, not {config.accel}")
    if config.machine == "none":
        from kemu.machines.none_board import NoneBoard
        return NoneBoard(config, console)
    if config.machine == "microvm":
        from kemu.machines.x86_microvm import MicroVm
        return MicroVm(config, console, ram_fd=ram_fd)
    from kemu.machines.arm64_virt import VirtMachine
    return VirtMachine(config, console, ram_fd=ram_fd)
