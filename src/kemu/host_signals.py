"""SIGTERM, SIGHUP and SIGINT end kemu as they end QEMU (softmmu/runstate.c).

QEMU's handler records the signal and who sent it; its main loop then stops
the vCPUs, emits ``SHUTDOWN`` (``guest: false, reason: host-signal``), drains
and flushes the block layer, removes what it created, prints
``terminating on signal 15 from pid 123 (bash)`` (without the pid part when
the kernel sent it, as for Ctrl-C at a terminal) and exits with status 0.

:class:`HostSignals` gives kemu the same: a "signals" thread takes the
signals with ``sigwaitinfo`` (which tells the sender's pid) once they are
blocked in the main thread and so in every thread started after it.  A
thread started before (during machine set-up) may still take one: Python's
handler catches it then, without the sender.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from typing import Callable

#: The signals that end kemu cleanly, as QEMU's termsig_handler.
TERMINATING = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


@dataclass(frozen=True)
class Termination:
    """A terminating signal and its sender (pid 0: the kernel or unknown)."""

    signum: int
    pid: int = 0

    def describe(self) -> str:
        """QEMU's qemu_kill_report line, without the program name."""
        if not self.pid:
            return f"terminating on signal {self.signum}"
        return (f"terminating on signal {self.signum} from pid {self.pid} "
                f"({process_name(self.pid)})")


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip() or "<unknown process>"
    except OSError:
        return "<unknown process>"


class HostSignals:
    """Turns the terminating signals into one call of ``on_signal`` (later ones are
    recorded but not acted on again).  Install from the main thread."""

    def __init__(self, on_signal: Callable[[Termination], None]) -> None:
        self._on_signal = on_signal
        self._lock = threading.Lock()
        self.received: Termination | None = None
        self._previous = {s: signal.getsignal(s) for s in TERMINATING}
        self._thread: threading.Thread | None = None

    def install(self) -> None:
        """Catch the signals from now on (set-up may still start threads)."""
        for s in TERMINATING:
            signal.signal(s, self._handler)

    def block(self) -> None:
        """Block the signals here (threads started from now on inherit that) and take
        them in the "signals" thread, with their sender."""
        signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATING)
        self._thread = threading.Thread(target=self._wait, name="signals", daemon=True)
        self._thread.start()

    def uninstall(self) -> None:
        """Python's handlers as they were (the thread, blocked in sigwaitinfo, stays)."""
        for s, previous in self._previous.items():
            signal.signal(s, previous)

    def _handler(self, signum: int, _frame) -> None:
        self._deliver(Termination(signum))

    def _wait(self) -> None:
        while True:
            info = signal.sigwaitinfo(TERMINATING)
            self._deliver(Termination(info.si_signo, info.si_pid))

    def _deliver(self, termination: Termination) -> None:
        with self._lock:
            if self.received is not None:
                return
            self.received = termination
        self._on_signal(termination)
