"""Virtio devices (OASIS VIRTIO 1.2): the device interface shared by all transports.

A virtio device is a table of operations (:class:`VirtioDevice`), in the
manner of kvmtool: device id, feature bits, configuration space, queue
sizes, ``activate``, ``queue_notify`` and ``reset``.  A transport
(:mod:`kemu.devices.virtio.mmio`) owns the registers, the device status
machine (section 2.1), feature negotiation (2.2) and the virtqueues
(:mod:`kemu.devices.virtio.queue`), and hands the device a
:class:`VirtioSession` when the driver sets DRIVER_OK.  The session is how
the device reaches the guest: memory, negotiated features, queues, used
buffer and configuration change notifications, and the device error path.
A session dies on reset, so late completions of a reset device are dropped.

Host I/O goes through an :class:`Executor`: a device parses a request in
``queue_notify`` (copying what it needs out of guest memory), submits the
backend call as ``work`` and finishes the request in ``done`` (writing guest
memory, the used ring, the interrupt).  :class:`SyncExecutor` runs both at
once; an executor that runs ``work`` on an I/O thread must call ``done``
back on the thread that owns device state (under the machine lock).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from kemu.devices.virtio.queue import (
    MAX_CHAIN_BYTES,
    MAX_QUEUE_SIZE,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DescriptorChain,
    Segment,
    VirtioError,
    Virtqueue,
    VirtqueueError,
)
from kemu.memory import GuestMemory

__all__ = [
    "MAX_CHAIN_BYTES",
    "MAX_QUEUE_SIZE",
    "STATUS_ACKNOWLEDGE",
    "STATUS_DEVICE_NEEDS_RESET",
    "STATUS_DRIVER",
    "STATUS_DRIVER_OK",
    "STATUS_FAILED",
    "STATUS_FEATURES_OK",
    "VIRTIO_F_EVENT_IDX",
    "VIRTIO_F_INDIRECT_DESC",
    "VIRTIO_F_VERSION_1",
    "VIRTIO_ID_BLOCK",
    "VIRTIO_ID_CONSOLE",
    "VIRTIO_ID_NET",
    "VIRTIO_ID_RNG",
    "DescriptorChain",
    "Executor",
    "Segment",
    "SyncExecutor",
    "VirtioDevice",
    "VirtioError",
    "VirtioSession",
    "Virtqueue",
    "VirtqueueError",
]

# Device status bits (2.1).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

# Device IDs (section 5).
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4

T = TypeVar("T")


class Executor(Protocol):
    """Where device backends run: ``done(work())``, now or later."""

    def submit(self, work: Callable[[], T], done: Callable[[T], None]) -> None: ...


class SyncExecutor:
    """Runs the backend call inline, on the vCPU thread that notified the queue."""

    def submit(self, work: Callable[[], T], done: Callable[[T], None]) -> None:
        done(work())


class VirtioSession(Protocol):
    """What an activated device may use; implemented by each transport.

    All methods are no-ops once the session is no longer :attr:`active`
    (the device was reset or failed).
    """

    memory: GuestMemory
    #: The feature bits the driver accepted (FEATURES_OK).
    features: int
    queues: Sequence[Virtqueue]

    @property
    def active(self) -> bool: ...

    def signal_used(self, queue_index: int) -> None:
        """Used buffers were added to a queue: notify the driver if it wants that."""

    def signal_config(self) -> None:
        """The configuration space changed (2.5): bump the generation, notify."""

    def device_error(self, reason: str) -> None:
        """The driver broke the protocol: set DEVICE_NEEDS_RESET (2.1.2)."""


@dataclass
class VirtioDeviceState:
    """A device with no state of its own beyond its transport's (blk, rng, console):
    its in-flight buffers are given back to the ring by the queue's save."""

    version: int


class VirtioDevice:
    """Base of virtio device models: override what the device type needs.

    The transport adds the device-independent features it implements
    (VERSION_1, INDIRECT_DESC, EVENT_IDX) to :meth:`device_features`.
    """

    device_id: int = 0
    name: str = "virtio"

    def __init__(self, queue_max_sizes: Sequence[int], executor: Executor | None = None) -> None:
        for size in queue_max_sizes:
            if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
                raise ValueError(f"{self.name}: queue size {size} is not a power of two <= 32768")
        self.queue_max_sizes = tuple(queue_max_sizes)
        self.executor: Executor = executor or SyncExecutor()
        self.session: VirtioSession | None = None

    def device_features(self) -> int:
        """Device-type feature bits offered (bits 0-23, section 2.2)."""
        return 0

    def check_features(self, features: int) -> bool:
        """Extra checks when the driver sets FEATURES_OK (dependent bits...)."""
        return True

    def config_space(self) -> bytes:
        """The current device configuration space (2.5), little-endian."""
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        """A driver write into the configuration space; ignored by default."""

    def activate(self, session: VirtioSession) -> None:
        """DRIVER_OK was set: the device may now use its queues (3.1.1 step 8)."""
        self.session = session

    def queue_notify(self, index: int, queue: Virtqueue) -> None:
        """An available buffer notification for queue ``index`` (2.7.10, 4.2.3.3).

        May raise :class:`VirtioError` (or MemoryAccessError) for a
        misbehaving driver; the transport turns it into a device error.
        """
        raise NotImplementedError

    def reset(self) -> None:
        """Device reset (2.4): forget the session and all in-flight state."""
        self.session = None

    def config_changed(self) -> None:
        """The configuration space changed: tell the driver if one is attached (2.5.1)."""
        if self.session is not None:
            self.session.signal_config()

    # -- snapshots (kemu.state's convention; the transport saves the queues) --------------------
    def save(self) -> VirtioDeviceState:
        return VirtioDeviceState(1)

    def restore(self, state: VirtioDeviceState) -> None:
        """Called after the transport's restore (the device may be active again)."""
        if state.version != 1:
            raise VirtioError(f"{self.name}: unsupported device state version {state.version}")
