"""A KVM vCPU behind the :class:`kemu.accel.base.Vcpu` protocol.

:class:`KvmVcpu` wraps a :class:`~kemu.accel.kvm.ioctls.VcpuFd`.  Given the
machine's buses it performs port I/O and MMIO exits itself through
:func:`kemu.accel.base.dispatch` (answering reads through ``kvm_run``) and
returns only what the board must decide: :class:`Halted`, :class:`Kicked`,
:class:`SystemEvent`, :class:`InternalError`.  Without buses, ``run()``
returns the I/O exits too and the caller answers reads with
:meth:`KvmVcpu.complete`.

Kicking follows api.rst 5. ("immediate_exit") and QEMU's SIG_IPI: ``kick()``
sets ``kvm_run.immediate_exit`` (so a vCPU about to enter the guest returns
at once) and sends the vCPU thread a signal (so one inside ``KVM_RUN``
returns with EINTR).  The signal needs a handler, which Python can only
install from the main thread: :func:`install_kick_signal` does it and
:class:`KvmVcpu` calls it when created there.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from kemu.accel.base import (
    Exit,
    InternalError,
    IoIn,
    IoOut,
    Kicked,
    MmioRead,
    MmioWrite,
    SystemEvent,
    dispatch,
)
from kemu.accel.kvm.ioctls import VcpuFd, VmFd
from kemu.bus import Bus
from kemu.errors import KemuError

#: The signal that interrupts ``KVM_RUN`` (a real-time one, as no library uses it).
SIG_KICK = signal.SIGRTMIN + 6


def _ignore(signum: int, frame: object) -> None:
    pass


def install_kick_signal() -> bool:
    """Install the no-op handler for :data:`SIG_KICK` (main thread only).

    Returns whether the handler is in place.  Python's C-level handler runs in
    whatever thread the signal hits, which is all that is needed to make that
    thread's ``KVM_RUN`` return EINTR.
    """
    if signal.getsignal(SIG_KICK) is _ignore:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(SIG_KICK, _ignore)
    return True


class KvmVcpu:
    """One vCPU: ``run() -> Exit``, ``kick()``, ``set_irq()``, ``wait_for_interrupt()``."""

    def __init__(self, vm: VmFd, index: int, mmio: Bus | None = None,
                 pio: Bus | None = None) -> None:
        self.index = index
        self.vm = vm
        self.fd: VcpuFd = vm.create_vcpu(index)
        self.mmio = mmio
        # x86 always has a port space: with an MMIO bus but no port bus, ports
        # read as zero and ignore writes, as on a PC where nothing decodes them.
        self.pio = pio if pio is not None or mmio is None else Bus("pio", 1 << 16)
        self._thread_id: int | None = None
        self._kicked = False
        self._event: Exit | None = None
        self._cond = threading.Condition()
        self._signal_lock = threading.Lock()
        self._irq_level = False
        # Without the handler (vCPU made off the main thread before anyone called
        # install_kick_signal) a kick still works, but only at the next exit.
        self._kick_signal = install_kick_signal()
        #: Exits from KVM_RUN so far (diagnostics, benchmarks).
        self.exits = 0

    def close(self) -> None:
        self.fd.close()

    # -- from any thread ---------------------------------------------------------------
    def kick(self) -> None:
        """Make ``run()`` return :class:`Kicked` soon (api.rst: immediate_exit)."""
        with self._cond:
            self._kicked = True
            self._cond.notify_all()
        self.fd.immediate_exit = True
        # Signal only a thread that is inside run(): signalling a thread that has
        # ended is undefined; run() clears _thread_id under the same lock.
        with self._signal_lock:
            tid = self._thread_id
            if tid is not None and tid != threading.get_ident() and (
                    self._kick_signal or signal.getsignal(SIG_KICK) is _ignore):
                signal.pthread_kill(tid, SIG_KICK)

    def set_irq(self, level: bool) -> None:
        """The INTR input of an x86 vCPU is inside KVM's irqchip model: devices raise
        GSIs with :meth:`VmFd.irq_line` (``vm.irq_sink(gsi)`` for an IrqLine).
        Here the level is only recorded, and a rising level wakes a halted vCPU
        of a VM without in-kernel irqchip (where HLT exits to the VMM)."""
        with self._cond:
            self._irq_level = bool(level)
            self._cond.notify_all()

    def request_system_event(self, kind: str) -> None:
        """A device asks for power off or reset (i8042, ACPI): ``run()`` returns the
        :class:`SystemEvent` after the current access (or soon, from another thread)."""
        self._event = SystemEvent(kind)
        if self._thread_id != threading.get_ident():
            self.kick()

    def wait_for_interrupt(self, timeout: float | None) -> None:
        """After :class:`Halted`: block until an interrupt, a kick or ``timeout``."""
        with self._cond:
            if self._irq_level or self._kicked:
                return
            self._cond.wait(timeout)

    # -- the vCPU thread ---------------------------------------------------------------
    def complete(self, value: int) -> None:
        """Answer the :class:`IoIn` / :class:`MmioRead` ``run()`` just returned."""
        self.fd.complete(value)

    def _take_kick(self) -> bool:
        with self._cond:
            kicked, self._kicked = self._kicked, False
        if kicked:
            self.fd.immediate_exit = False
        return kicked

    def run(self) -> Exit:
        """Run the guest; I/O exits go to the buses, the rest is returned."""
        with self._signal_lock:
            self._thread_id = threading.get_ident()
        try:
            kicked = self._take_kick()
            if self._event is not None:
                event, self._event = self._event, None
                return event
            if kicked:
                return Kicked()
            return self._run()
        finally:
            with self._signal_lock:
                self._thread_id = None

    def _run(self) -> Exit:
        fd = self.fd
        mmio, pio = self.mmio, self.pio
        while True:
            exit = fd.run()
            self.exits += 1
            kind = type(exit)
            if mmio is None or kind not in _IO_EXITS:
                if kind is Kicked:
                    self._take_kick()
                    if self._event is not None:
                        exit, self._event = self._event, None
                return exit
            try:
                value = dispatch(exit, mmio, pio)
            except KemuError as e:
                return InternalError(f"vcpu {self.index}: {exit}: {e}")
            if value is not None:
                fd.complete(value)
            if self._event is not None:
                event, self._event = self._event, None
                return event


_IO_EXITS = frozenset({IoIn, IoOut, MmioRead, MmioWrite})


def gsi_sinks(vm: VmFd, gsis: range | list[int]) -> dict[int, Callable[[bool], None]]:
    """IrqLine sinks for a list of GSIs of the in-kernel irqchip."""
    return {gsi: vm.irq_sink(gsi) for gsi in gsis}

