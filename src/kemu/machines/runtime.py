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


class VcpuGroup:
    """The vCPU threads of one machine, driven together.

    QMP's ``stop``/``cont``/``quit`` and the API act on every vCPU; the state
    reported (``on_state``) is the boot CPU's.  A guest reset stops the other
    vCPUs, has the board rebuild its vCPUs (``rebuild``) and runs again; a
    host reset does the same with every vCPU paused.  The first outcome that
    ends the machine is the machine's.
    """

    def __init__(self) -> None:
        self.threads: list[VcpuThread] = []
        self.on_state: Callable[[RunState], None] = lambda s: None
        self._end: Outcome | None = None
        self._reset_lock = threading.Lock()
        self._stopping = False
        self._quiet = False             # no on_state during a reset's pause and resume
        #: -no-shutdown: a guest power-off (or, with -no-reboot, reset) pauses every
        #: vCPU and calls ``on_guest_shutdown(reason)`` instead of ending the machine.
        self.no_shutdown = False
        self.on_guest_shutdown: Callable[[str], None] = lambda reason: None

    def add(self, thread: VcpuThread) -> None:
        index = len(self.threads)
        thread.on_state = lambda s: self._state_changed(index, s)
        self.threads.append(thread)

    def _state_changed(self, index: int, state: RunState) -> None:
        if state == RunState.STOPPED and not self._stopping:
            # A vCPU thread ended by itself (an internal error): the machine ends.
            self.end(self.threads[index].outcome or Outcome("quit", 0))
        if index == 0 and not self._quiet:
            self.on_state(state)

    @property
    def state(self) -> RunState:
        return self.threads[0].state if self.threads else RunState.CREATED

    @property
    def boot_thread(self) -> VcpuThread | None:
        return self.threads[0] if self.threads else None

    def thread_ids(self) -> list[int]:
        return [t._thread.native_id for t in self.threads if t._thread.native_id]

    # -- control ------------------------------------------------------------------------
    def start(self, paused: bool = False) -> None:
        # Secondaries first, so that the boot CPU's RUNNING is the last transition reported.
        for t in reversed(self.threads):
            t.start(paused=paused)

    def pause(self, timeout: float | None = 10.0) -> bool:
        for t in self.threads:
            t.request(RunState.PAUSED)
        return all(t.wait_state(RunState.PAUSED, timeout) for t in self.threads)

    def resume(self, wait: bool = False) -> None:
        for t in self.threads[1:]:
            t.request(RunState.RUNNING)
        if self.threads:
            self.threads[0].request(RunState.RUNNING)
        if wait:
            for t in self.threads:
                t.wait_state(RunState.RUNNING, 10)

    def stop(self) -> None:
        self._stopping = True
        for t in self.threads:
            t.request(RunState.STOPPED)

    def end(self, outcome: Outcome) -> None:
        """End the machine with ``outcome`` (the first one given counts)."""
        self._stopping = True
        if self._end is None:
            self._end = outcome
        for t in self.threads:
            t.request(RunState.STOPPED, outcome)

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """The machine's outcome once every thread has ended, or None at ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self.threads:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not t.join(left):
                return None
        return self._end or self.threads[0].outcome

    # -- exits and resets ------------------------------------------------------------------
    def handle_exit(self, exit: Exit, no_reboot: bool, on_reset: Callable[[], None],
                    rebuild: Callable[[], None]) -> Outcome | None:
        """A vCPU thread's system event or error (on that thread): the outcome
        that ends the machine, or None after a guest reset."""
        outcome = None
        if isinstance(exit, SystemEvent):
            if exit.kind == "poweroff":
                outcome = Outcome("poweroff", 0)
            elif no_reboot:
                outcome = Outcome("reset", 0)
            else:
                on_reset()
                self.reboot(threading.current_thread(), rebuild)
                return None
        elif isinstance(exit, InternalError):
            outcome = Outcome("error", 1, f"guest stopped: {exit.message}")
        return None if outcome is None else self.guest_ended(outcome)

    def guest_ended(self, outcome: Outcome) -> Outcome | None:
        """The guest powered off, reset under -no-reboot, or failed: the outcome that
        ends the machine, or None under -no-shutdown, where a power-off or reset
        pauses every vCPU and is reported through ``on_guest_shutdown`` instead."""
        if self.no_shutdown and outcome.reason in ("poweroff", "reset"):
            self.on_guest_shutdown(outcome.reason)
            for t in self.threads:
                t.request(RunState.PAUSED)
            return None
        self.end(outcome)
        return self._end

    def reboot(self, current: threading.Thread | None, rebuild: Callable[[], None]) -> None:
        """Stop the vCPUs other than ``current``, ``rebuild``, run again."""
        with self._reset_lock:
            others = [t for t in self.threads if t._thread is not current]
            self._quiet = True
            try:
                running = [t for t in others if t.state == RunState.RUNNING]
                for t in others:
                    t.request(RunState.PAUSED)
                for t in others:
                    t.wait_state(RunState.PAUSED, 10)
                if any(t.state == RunState.STOPPED for t in self.threads):
                    return
                rebuild()
                if not self._stopping:
                    for t in running:
                        t.request(RunState.RUNNING)
            finally:
                if self._stopping:
                    # stop() came during the reboot: a pause request may have replaced
                    # its stop request; ask again.
                    for t in self.threads:
                        t.request(RunState.STOPPED)
                self._quiet = False

    def host_reset(self, rebuild: Callable[[], None]) -> None:
        """With every vCPU paused: ``rebuild`` without reporting state changes."""
        self._quiet = True
        try:
            with self._reset_lock:
                rebuild()
        finally:
            self._quiet = False
