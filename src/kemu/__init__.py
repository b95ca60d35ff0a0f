"""kemu: a machine emulator and virtualizer in Python."""

from kemu.api import (CommandFailed, Console, ConsoleClosed, ConsoleTimeout, Machine,
                      MachineStateError, MachineTimeout, Powerdown, Reset, Resume, Shutdown,
                      Stop)

__all__ = ["CommandFailed", "Console", "ConsoleClosed", "ConsoleTimeout", "Machine",
           "MachineStateError", "MachineTimeout", "Powerdown", "Reset", "Resume", "Shutdown",
           "Stop"]
