"""The one place that turns a :class:`MachineConfig` into a running machine."""

from __future__ import annotations

from kemu.backends.serial import SerialBackend
from kemu.errors import ConfigError
from kemu.machines.config import MachineConfig

MACHINES = ("virt", "microvm", "none")
#: The accelerators each board runs on, the first one its default.
ACCELS = {"virt": ("tcg",), "microvm": ("kvm",), "none": ("tcg",)}
#: The guest architecture of each board (``none`` has no CPU: it serves either).
TARGETS = {"virt": "aarch64", "microvm": "x86_64"}


def board_accels(machine: str, target: str | None) -> tuple[str, ...]:
    """The accelerators ``machine`` runs on for an emulator of ``target`` (None: the
    generic ``kemu``, whose ``none`` is aarch64's).  The ``none`` board of the x86-64
    emulator also takes KVM, as QEMU's does: libvirt's probe asks for
    ``-machine none,accel=kvm:tcg`` and learns from query-kvm whether KVM domains
    can run."""
    if machine == "none" and target == "x86_64":
        return ("tcg", "kvm")
    return ACCELS.get(machine, ())


def build(config: MachineConfig, console: SerialBackend, ram_fd: int | None = None):
    """The board for ``config``; ``ram_fd``: guest RAM mapped private from a
    snapshot's memory file (a restored machine)."""
    if config.machine not in MACHINES:
        raise ConfigError(f"unsupported machine type {config.machine!r} "
                          f"(supported: {', '.join(MACHINES)})")
    runs_on = board_accels(config.machine, config.target)
    if config.accel not in runs_on:
        raise ConfigError(f"the {config.machine} machine runs on the "
                          f"{'/'.join(runs_on)} accelerator, not {config.accel}")
    if config.machine == "none":
        from kemu.machines.none_board import NoneBoard
        return NoneBoard(config, console)
    if config.machine == "microvm":
        from kemu.machines.x86_microvm import MicroVm
        return MicroVm(config, console, ram_fd=ram_fd)
    from kemu.machines.arm64_virt import VirtMachine
    return VirtMachine(config, console, ram_fd=ram_fd)
