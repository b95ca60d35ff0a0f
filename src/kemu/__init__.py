"""kemu: a machine emulator and virtualizer in Python."""

from kemu.api import Console, Machine, Resume, Shutdown, Stop

__all__ = ["Machine", "Console", "Stop", "Resume", "Shutdown"]
