"""kemu: a machine emulator and virtualizer in Python."""

from kemu.api import (CommandFailed, Console, ConsoleClosed, ConsoleTimeout, GuestPanicked,
                      Machine, MachineStateError, MachineTimeout, Powerdown, Reset, Resume,
                      Shutdown, Stop)

__all__ = ["CommandFailed", "Console", "ConsoleClosed", "ConsoleTimeout", "GuestPanicked",
           "Machine", "MachineStateError", "MachineTimeout", "Powerdown", "Reset", "Resume",
           "Shutdown", "Stop"]
