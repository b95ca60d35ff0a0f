"""Device notifications that bypass the vCPU threads: ioeventfd and irqfd.

* ioeventfd (api.rst 4.59, ``KVM_IOEVENTFD``): a guest write of a given
  value to a given MMIO address signals an eventfd inside the kernel; the
  vCPU does not exit to kemu at all.  kemu's I/O loop reads the eventfd and
  runs the device there, so a virtio-blk request is served off the vCPU
  thread while the guest goes on.
* irqfd (api.rst 4.75, ``KVM_IRQFD``): writing an eventfd asserts a GSI of
  the in-kernel irqchip.  Virtio-mmio interrupts are level-triggered, so
  the irqfd is a *resampling* one: KVM deasserts the line when the guest
  ends the interrupt (EOI) and signals a second eventfd, and kemu asserts
  it again if the device's line is still high.

These objects own their eventfds for the machine's life; :meth:`attach`
registers them with a VM (again after a reboot builds a fresh VM).  When
the kernel lacks a capability, callers keep the exit-based path.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from kemu.accel.kvm.ioctls import (
    KVM_CAP_IOEVENTFD,
    KVM_CAP_IRQFD,
    KVM_CAP_IRQFD_RESAMPLE,
    Kvm,
    VmFd,
)
from kemu.backends.ioloop import EVENT_READ, IoLoop


def _new_eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _drain(fd: int) -> bool:
    """Read an eventfd's counter; True when it had been signalled."""
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


def supports_ioeventfd(kvm: Kvm | VmFd) -> bool:
    return bool(kvm.check_extension(KVM_CAP_IOEVENTFD))


def supports_resample_irqfd(kvm: Kvm | VmFd) -> bool:
    return bool(kvm.check_extension(KVM_CAP_IRQFD)
                and kvm.check_extension(KVM_CAP_IRQFD_RESAMPLE))


class IoEventFd:
    """One MMIO doorbell: 4-byte writes of ``value`` at ``addr`` call ``handler()``
    on the I/O loop, under ``lock``."""

    def __init__(self, loop: IoLoop, lock: threading.RLock, addr: int, value: int,
                 handler: Callable[[], None]) -> None:
        self.addr = addr
        self.value = value
        self.fd = _new_eventfd()
        #: Signals handled (for tests and diagnostics).
        self.count = 0
        self._handler = handler
        self._lock = lock
        self._loop = loop
        loop.watch(self.fd, EVENT_READ, self._ready)
        loop.start()

    def attach(self, vm: VmFd) -> None:
        vm.ioeventfd(self.fd, self.addr, 4, datamatch=self.value)

    def _ready(self, _mask: int) -> None:
        if _drain(self.fd):
            self.count += 1
            with self._lock:
                self._handler()

    def close(self) -> None:
        self._loop.unwatch(self.fd)
        self._loop.call_soon(lambda: os.close(self.fd))


class ResampleIrqFd:
    """A level-triggered GSI driven through a resampling irqfd.

    :meth:`set_level` is an :class:`~kemu.devices.base.IrqLine` sink (called
    under the machine lock): a rising level asserts the GSI unless it is
    asserted already; a falling one does nothing, since KVM deasserts at the
    guest's EOI and the resample handler re-asserts while the device's line
    is still high.
    """

    def __init__(self, loop: IoLoop, lock: threading.RLock, gsi: int,
                 level: Callable[[], bool]) -> None:
        self.gsi = gsi
        self.trigger = _new_eventfd()
        self.resample = _new_eventfd()
        self._level = level
        self._lock = lock
        self._loop = loop
        #: The GSI is asserted through the irqfd and KVM has not resampled it yet.
        self.asserted = False
        loop.watch(self.resample, EVENT_READ, self._resampled)
        loop.start()

    def attach(self, vm: VmFd) -> None:
        vm.irqfd(self.trigger, self.gsi, resamplefd=self.resample)
        self.asserted = False           # a fresh VM: its line starts low
        if self._level():
            self._assert()

    def set_level(self, level: bool) -> None:
        if level and not self.asserted:
            self._assert()

    def _assert(self) -> None:
        self.asserted = True
        os.eventfd_write(self.trigger, 1)

    def _resampled(self, _mask: int) -> None:
        if _drain(self.resample):
            with self._lock:
                self.asserted = False   # KVM lowered the line at the EOI
                if self._level():
                    self._assert()

    def close(self) -> None:
        self._loop.unwatch(self.resample)

        def close_fds() -> None:
            os.close(self.trigger)
            os.close(self.resample)
        self._loop.call_soon(close_fds)
