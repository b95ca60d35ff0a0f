"""One exception hierarchy for kemu.

Everything that can go wrong because of input from outside (command lines,
files, the network, the guest) is raised as a :class:`KemuError`; the CLI
turns it into one line on stderr and an exit status.  Anything else escaping
is a bug in kemu.
"""

from __future__ import annotations


class KemuError(Exception):
    """Base of all errors kemu reports to its user."""

    #: Process exit status the CLI uses for this error.
    exit_status: int = 2


class ConfigError(KemuError):
    """A machine configuration or command line that cannot be honoured."""


class BootError(KemuError):
    """A kernel, initrd or firmware file that cannot be loaded."""


class GuestBuildError(KemuError):
    """The default guest could not be fetched or assembled."""


class AccelError(KemuError):
    """The accelerator could not be set up (no /dev/kvm, bad CPU model...)."""


class MemoryAccessError(KemuError):
    """A guest-physical access outside guest RAM."""


class BusError(KemuError):
    """A device mapping that overlaps another one, or lies outside the bus."""


class HostResourceError(KemuError):
    """The host cannot give what the machine needs (memory for guest RAM, ...)."""

    exit_status = 1


class GuestError(KemuError):
    """The guest failed: a kernel panic, an unrecoverable CPU state."""

    exit_status = 1


class StartupError(ConfigError):
    """An option QEMU accepts syntactically but cannot honour at start-up (an
    unknown -object type, a -blockdev on a missing file, a -device naming no
    node): QEMU's one line and its exit status 1."""

    exit_status = 1
