"""Running a machine: vCPU threads as explicit state machines, and the result.

Each vCPU has one thread.  Its state is one of :class:`RunState`; other
threads change it only through requests (pause, resume, stop) that the
vCPU thread acts on between runs of guest code, after a kick.  The machine
ends with an :class:`Outcome`: why it stopped and the exit status a CLI
should return (0 for a guest power-off, 1 for a guest failure).
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass
from typing import Callable

from kemu.accel.base import Exit, Halted, InternalError, Kicked, SystemEvent


class RunState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Outcome:
    reason: str          # "poweroff", "reset", "panic", "error", "quit"
    status: int          # process exit status
    message: str = ""


class VcpuThread:
    """Drives one accelerator vCPU in its own thread.

    ``cpu`` must offer ``run() -> Exit``, ``kick()``, ``wait_for_interrupt(t)``.
    ``next_deadline()`` gives the monotonic time (s) of the next timer event, or
    None.  ``on_exit(exit)`` handles system events and errors and returns an
    :class:`Outcome` to end the machine, or None to go on.
    """

    def __init__(self, cpu, next_deadline: Callable[[], float | None],
                 on_exit: Callable[[Exit], Outcome | None], name: str = "vcpu0") -> None:
        self.cpu = cpu
        self.next_deadline = next_deadline
        self.on_exit = on_exit
        self.state = RunState.CREATED
        self._requested: RunState | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.outcome: Outcome | None = None
        self._stop_outcome: Outcome | None = None
        self._done = threading.Event()
        #: Called with the new state on every transition (events for QMP and the API).
        self.on_state: Callable[[RunState], None] = lambda s: None

    # -- control, from any thread ------------------------------------------------------
    def start(self, paused: bool = False) -> None:
        self._set_state(RunState.PAUSED if paused else RunState.RUNNING)
        self._thread.start()

    def request(self, state: RunState, outcome: Outcome | None = None) -> None:
        """Ask for a state change; ``outcome`` is how a STOPPED machine ended."""
        with self._cond:
            self._requested = state
            if outcome is not None and self._stop_outcome is None:
                self._stop_outcome = outcome
            self._cond.notify_all()
        self.cpu.kick(final=state == RunState.STOPPED)

    def wait_state(self, state: RunState, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.state in (state, RunState.STOPPED), timeout)

    def join(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    # -- the thread -------------------------------------------------------------------------
    def _set_state(self, state: RunState) -> None:
        with self._cond:
            if self.state == state:
                return
            self.state = state
            self._cond.notify_all()
        self.on_state(state)

    def _finish(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self._set_state(RunState.STOPPED)
        self._done.set()

    def _take_request(self) -> bool:
        """Apply a pending request; returns False when the thread must end."""
        with self._cond:
            req, self._requested = self._requested, None
        if req == RunState.STOPPED:
            self._finish(self._stop_outcome or Outcome("quit", 0))
            return False
        if req is not None:
            self._set_state(req)
        while self.state == RunState.PAUSED:
            with self._cond:
                self._cond.wait_for(lambda: self._requested is not None)
                req, self._requested = self._requested, None
            if req == RunState.STOPPED:
                self._finish(self._stop_outcome or Outcome("quit", 0))
                return False
            self._set_state(req)
        return True

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug in kemu: end the machine, report it
            self._finish(Outcome("error", 1, f"internal error in {self._thread.name}: "
                                           f"{type(e).__name__}: {e}"))

    def _loop(self) -> None:
        while True:
            if not self._take_request():
                return
            exit = self.cpu.run()
            if isinstance(exit, Kicked):
                continue
            if isinstance(exit, Halted):
                deadline = self.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                self.cpu.wait_for_interrupt(timeout)
                continue
            if isinstance(exit, (SystemEvent, InternalError)):
                outcome = self.on_exit(exit)
                if outcome is not None:
                    self._finish(outcome)
                    return
                continue
            raise RuntimeError(f"unexpected exit {exit!r}")


class DeadlineKicker:
    """A thread that kicks a running vCPU when its next timer deadline passes.

    This is the only preemption the TCG vCPU has: without it a guest that
    spins in user space would never see its timer interrupt.
    """

    def __init__(self, cpu, next_deadline: Callable[[], float | None],
                 name: str = "vcpu0-timer") -> None:
        self.cpu = cpu
        self.next_deadline = next_deadline
        self._cond = threading.Condition()
        self._stop = False
        #: The deadline the thread sleeps until (None: no deadline), under _cond.
        self._sleeping_until: float | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def changed(self) -> None:
        """A deadline may have changed (called at every timer register write).

        The thread is woken only for a deadline earlier than the one it
        sleeps until: a later one it finds itself when it wakes.
        """
        deadline = self.next_deadline()
        with self._cond:
            until = self._sleeping_until
            if deadline is not None and (until is None or deadline < until):
                self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()

    def _main(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                deadline = self.next_deadline()
                now = time.monotonic()
                if deadline is None or deadline > now:
                    self._sleeping_until = deadline
                    self._cond.wait(None if deadline is None else deadline - now)
                    self._sleeping_until = None
                    continue
            self.cpu.post_work()
            # The vCPU re-arms the timer when it handles the interrupt; do not
            # spin on a deadline that stays in the past while it catches up.
            with self._cond:
                self._cond.wait(0.001)
