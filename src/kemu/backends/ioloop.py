"""One I/O thread for the host side of devices (network, vsock sockets).

The architecture allows few threads on purpose: one per vCPU and one event
loop for I/O.  :class:`IoLoop` is that loop, a :mod:`selectors` loop in a
daemon thread.  Backends register file descriptors with callbacks; the
callbacks run on the loop thread, and take the machine lock
(:attr:`IoLoop.lock`) themselves before they touch device state.

Registration may be asked for from any thread: calls from outside the loop
thread are queued (:meth:`call_soon`) and run by the loop, since a
selector is not safe to change while another thread is in ``select()``.
"""

from __future__ import annotations

import functools
import logging
import os
import selectors
import threading
from collections import deque
from collections.abc import Callable

from kemu.errors import KemuError

log = logging.getLogger(__name__)

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE


class BackendError(KemuError):
    """A host-side device backend that cannot be set up (missing tool, no permission...)."""


class IoLoop:
    """A selectors loop in one thread; ``lock`` is the machine lock backends use."""

    def __init__(self, lock: threading.RLock | None = None, name: str = "io") -> None:
        self.lock = lock if lock is not None else threading.RLock()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, EVENT_READ, None)
        self._calls: deque[Callable[[], None]] = deque()
        self._closing = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False
        #: fd -> (events, callback(mask))
        self._handlers: dict[int, tuple[int, Callable[[int], None]]] = {}

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def close(self) -> None:
        """Stop the thread (after the queued calls) and free the selector.

        Idempotent, and safe from two threads at once: the second waits for the first.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closing = True
            self._wake()
            if self._started and threading.current_thread() is not self._thread:
                self._thread.join(5)
            self._closed = True
            self._sel.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def flush(self) -> None:
        """Nothing to flush (lets the loop sit in a board's list of backends)."""

    @property
    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread or not self._started

    # -- calls and registrations (any thread) -----------------------------------------------------
    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread (now, if this is the loop thread)."""
        if self.in_loop:
            fn()
            return
        self._calls.append(fn)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass   # a wake-up is pending already, or the loop is gone

    def watch(self, fd: int, events: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(mask)`` when ``fd`` is ready for ``events`` (0: stop watching)."""
        self.call_soon(lambda: self._set(fd, events, callback))

    def unwatch(self, fd: int) -> None:
        self.call_soon(lambda: self._set(fd, 0, None))

    def _set(self, fd: int, events: int, callback: Callable[[int], None] | None) -> None:
        if self._closed:
            return
        old = self._handlers.get(fd)
        if not events:
            if old is not None:
                del self._handlers[fd]
                try:
                    self._sel.unregister(fd)
                except (KeyError, ValueError, OSError):
                    pass
            return
        self._handlers[fd] = (events, callback)
        try:
            if old is None:
                self._sel.register(fd, events, None)
            elif old[0] != events:
                self._sel.modify(fd, events, None)
        except (KeyError, ValueError, OSError) as exc:
            log.warning("io loop: cannot watch fd %d: %s", fd, exc)
            self._handlers.pop(fd, None)

    # -- the thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closing:
            try:
                ready = self._sel.select(1.0)
            except OSError as exc:     # a closed fd still registered: drop it
                log.warning("io loop: select failed: %s", exc)
                self._drop_bad_fds()
                continue
            for key, mask in ready:
                if key.fd == self._wake_r:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                handler = self._handlers.get(key.fd)
                if handler is not None:
                    self._guarded(functools.partial(handler[1], mask))
            while self._calls:
                self._guarded(self._calls.popleft())
        while self._calls:   # let closing calls (unwatch, shutdowns) run
            self._guarded(self._calls.popleft())

    def _drop_bad_fds(self) -> None:
        for fd in list(self._handlers):
            try:
                os.fstat(fd)
            except OSError:
                self._set(fd, 0, None)

    @staticmethod
    def _guarded(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:   # a backend bug must not end every device's I/O
            log.exception("io loop: callback failed")
