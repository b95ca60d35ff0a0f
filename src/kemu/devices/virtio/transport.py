"""The transport-independent half of a virtio transport (VIRTIO 1.2, sections 2 and 3).

:class:`VirtioTransport` holds what every transport does the same way in
front of a :class:`~kemu.devices.virtio.VirtioDevice`: the device status
machine (2.1), feature negotiation (2.2), the virtqueues, the session handed
to the device at DRIVER_OK, the device error path (DEVICE_NEEDS_RESET), the
configuration space and generation (2.5), and the interrupt status bits
(bit 0 used buffer, bit 1 configuration change) that drive the transport's
interrupt line while non-zero.  Register layouts are the subclasses':
virtio-mmio (:mod:`.mmio`) and virtio-pci (:mod:`.pci`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Sequence

from kemu.devices.base import IrqLine
from kemu.devices.virtio import (
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VirtioDevice,
    VirtioError,
)
from kemu.devices.virtio.queue import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    Virtqueue,
)
from kemu.errors import MemoryAccessError
from kemu.memory import GuestMemory

log = logging.getLogger(__name__)

#: Interrupt status bits (4.2.2 InterruptStatus, 4.1.4.5 ISR status).
INT_VRING = 1 << 0
INT_CONFIG = 1 << 1

#: Device-independent features every transport instance offers (section 6).
TRANSPORT_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX)

class _Session:
    """The :class:`~kemu.devices.virtio.VirtioSession` of one activation."""

    def __init__(self, transport: VirtioTransport) -> None:
        self._transport = transport
        self.memory = transport.memory
        self.features = transport.driver_features
        self.queues: Sequence[Virtqueue] = tuple(transport.queues)
        self.active = True

    def signal_used(self, queue_index: int) -> None:
        if self.active:
            self._transport._signal_used(queue_index)

    def signal_config(self) -> None:
        if self.active:
            self._transport.config_changed()

    def device_error(self, reason: str) -> None:
        if self.active:
            self._transport.device_error(reason)


@dataclass
class TransportState:
    """The registers every virtio transport saves (each transport's state adds its own)."""

    version: int
    status: int
    driver_features: int
    device_features_sel: int
    driver_features_sel: int
    queue_sel: int
    interrupt_status: int
    config_generation: int


class VirtioTransport:
    """Status, features, queues and interrupt status of one device (``None``: no device)."""

    #: The legacy interface (virtio-mmio version 1 only): VERSION_1 not required.
    legacy = False

    def __init__(self, device: VirtioDevice | None, memory: GuestMemory, irq: IrqLine,
                 name: str) -> None:
        self.device = device
        self.memory = memory
        self.irq = irq
        self.name = name
        self.queues = [Virtqueue(memory, size, i)
                       for i, size in enumerate(device.queue_max_sizes if device else ())]
        self.config_generation = 0
        #: Why the device last entered DEVICE_NEEDS_RESET (for diagnostics).
        self.error: str | None = None
        #: Register accesses of the wrong width or alignment, ignored.
        self.bad_accesses = 0
        self._session: _Session | None = None

    # -- state ---------------------------------------------------------------------------
    def _reset_registers(self) -> None:
        """Transport registers back to their reset values (2.4)."""
        self.status = 0
        self.driver_features = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        for q in self.queues:
            q.reset()
            q.set_features(0)

    def kick_ready_queues(self) -> None:
        """After a restore: have the device look at every ready queue that holds
        buffers (those given back by the save, requests a paused machine had not
        taken yet), as if the driver had just notified it."""
        for i, q in enumerate(self.queues):
            try:
                waiting = q.ready and q.pending() > 0
            except VirtioError:
                waiting = False
            if waiting:
                self.notify(i)

    def _restore_registers(self, state) -> None:
        """After :meth:`reset`: the registers every transport saves, and the queues."""
        self.driver_features = state.driver_features
        self.device_features_sel = state.device_features_sel
        self.driver_features_sel = state.driver_features_sel
        self.queue_sel = state.queue_sel
        self.config_generation = state.config_generation
        for q, qs in zip(self.queues, state.queues):
            q.restore(qs)

    def _restore_status(self, state) -> None:
        """Last: status and interrupt status, and the device active again if DRIVER_OK
        was set (its own state is restored after)."""
        self.status = state.status
        self.interrupt_status = state.interrupt_status
        if (self.device is not None and (self.status & (STATUS_DRIVER_OK
                                                        | STATUS_DEVICE_NEEDS_RESET))
                == STATUS_DRIVER_OK):
            self._activate()
        self._update_irq()

    def reset(self) -> None:
        """Device reset (2.4, 4.2.2 Status: writing 0)."""
        if self._session is not None:
            self._session.active = False
            self._session = None
        self._reset_registers()
        self.error = None
        if self.device is not None:
            self.device.reset()
        self._update_irq()

    @property
    def device_features(self) -> int:
        if self.device is None:
            return 0
        return (self.device.device_features() | TRANSPORT_FEATURES) & ((1 << 64) - 1)

    def _queue(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _interrupt(self, bit: int, queue_index: int | None) -> None:
        """Tell the driver: a used buffer in ``queue_index`` (INT_VRING) or a
        configuration change (INT_CONFIG, ``None``).  Transports with message
        interrupts (MSI-X) override this."""
        self.interrupt_status |= bit
        self._update_irq()

    def _update_irq(self) -> None:
        self.irq.set(self.interrupt_status != 0)

    # -- notifications from the device ---------------------------------------------------------
    def _signal_used(self, index: int) -> None:
        try:
            wanted = self.queues[index].should_notify()
        except VirtioError as exc:
            self.device_error(str(exc))
            return
        if wanted:
            self._interrupt(INT_VRING, index)

    def config_changed(self) -> None:
        """Configuration space changed: new generation and a config interrupt (2.5.1)."""
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        if self.status & STATUS_DRIVER_OK:
            self._interrupt(INT_CONFIG, None)

    def device_error(self, reason: str) -> None:
        """Enter DEVICE_NEEDS_RESET and tell the driver (2.1.2).

        The device stops processing queues until the driver resets it; the
        VMM carries on.
        """
        if self.device is None or self.status & STATUS_DEVICE_NEEDS_RESET:
            return
        log.warning("%s: device error, needs reset: %s", self.name, reason)
        self.error = reason
        self.status |= STATUS_DEVICE_NEEDS_RESET
        if self._session is not None:
            self._session.active = False
        if self.status & STATUS_DRIVER_OK:
            self._interrupt(INT_CONFIG, None)

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & STATUS_DEVICE_NEEDS_RESET)

    # -- status and features -------------------------------------------------------------
    def _features_ok(self) -> str | None:
        """Why the driver's features cannot be accepted, or ``None`` (2.2.1, 6.1)."""
        extra = self.driver_features & ~self.device_features
        if extra:
            return f"driver accepted features {extra:#x} that were not offered"
        if not self.legacy and not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
            return "driver did not accept VIRTIO_F_VERSION_1 (legacy driver?)"
        if not self.device.check_features(self.driver_features):
            return f"device refused feature set {self.driver_features:#x}"
        return None

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self.status
        new = old | (value & 0xFF)  # the driver never clears bits except by reset (2.1.1)
        added = new & ~old
        if added & STATUS_FEATURES_OK:
            why = self._features_ok()
            if why is not None:
                log.info("%s: FEATURES_OK refused: %s", self.name, why)
                new &= ~STATUS_FEATURES_OK
            else:
                for q in self.queues:
                    q.set_features(self.driver_features)
        if added & STATUS_DRIVER_OK and self.legacy and not new & STATUS_FEATURES_OK:
            why = self._features_ok()    # a legacy driver never sets FEATURES_OK
            if why is not None:
                self.status = new & ~STATUS_DRIVER_OK
                self.device_error(why)
                return
            for q in self.queues:
                q.set_features(self.driver_features)
        elif added & STATUS_DRIVER_OK and not new & STATUS_FEATURES_OK:
            self.status = new & ~STATUS_DRIVER_OK
            self.device_error("DRIVER_OK without FEATURES_OK: legacy virtio drivers are not supported")
            return
        if added & STATUS_DRIVER_OK:
            if old & STATUS_DEVICE_NEEDS_RESET:
                self.status = new & ~STATUS_DRIVER_OK
                return
            self.status = new
            self._activate()
            return
        self.status = new

    def _activate(self) -> None:
        self._session = _Session(self)
        try:
            self.device.activate(self._session)
        except (VirtioError, MemoryAccessError) as exc:
            self.device_error(str(exc))

    def notify(self, index: int) -> None:
        """The driver notified queue ``index`` (QueueNotify, or an ioeventfd standing in)."""
        if (self.status & (STATUS_DRIVER_OK | STATUS_DEVICE_NEEDS_RESET)) != STATUS_DRIVER_OK:
            return  # 3.1.1: no buffers are consumed before DRIVER_OK
        if index >= len(self.queues) or not self.queues[index].ready:
            return
        try:
            self.device.queue_notify(index, self.queues[index])
        except (VirtioError, MemoryAccessError) as exc:
            self.device_error(str(exc))

    # -- register access (Device protocol) -----------------------------------------------
    def _write_queue_ready(self, q: Virtqueue | None, value: int) -> None:
        if q is None:
            return
        if not value & 1:
            q.disable()
            return
        if q.ready or self.status & STATUS_DEVICE_NEEDS_RESET:
            return
        if self.status & STATUS_FEATURES_OK:
            q.set_features(self.driver_features)
        try:
            q.enable()
        except VirtioError as exc:
            self.device_error(str(exc))

    # -- configuration space (2.5, 4.2.2 Config) -------------------------------------------
    def _config_read(self, offset: int, size: int) -> int:
        if self.device is None or size not in (1, 2, 4, 8):
            return 0
        space = self.device.config_space()
        if offset + size > len(space):
            return 0
        return int.from_bytes(space[offset:offset + size], "little")

    def _config_write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4, 8) or offset + size > len(self.device.config_space()):
            return
        self.device.config_write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

