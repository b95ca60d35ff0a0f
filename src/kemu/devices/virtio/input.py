"""virtio-input (VIRTIO 1.2, section 5.8 "Input Device"), and the board's power button.

The device reports evdev events (``struct virtio_input_event``: le16 type,
le16 code, le32 value, 5.8.6) in the buffers the driver posts on the
``eventq`` (queue 0); the driver sends LED and similar state back on the
``statusq`` (queue 1), which this model consumes and ignores.  There are no
feature bits (5.8.3).

The configuration space (5.8.4) is a window the driver steers: it writes
``select`` and ``subsel``, then reads ``size`` and the 128-byte union
(name, serial, device ids, property bits, event-type bits).  ``size`` is 0
for every combination the device does not support (5.8.5.1).

:func:`power_button` is a device with one key, KEY_POWER: pressing it is
how kemu delivers QMP's ``system_powerdown`` to a Linux guest.  The guest's
``virtio_input`` driver turns it into an input event on
``/dev/input/eventN`` that userspace acts on (busybox ``acpid`` runs
``/etc/acpi/PWRF/00000080``, systemd-logind powers off).  QEMU's ``virt``
board uses a PL061 GPIO line and a ``gpio-keys`` node for the same event,
but Debian's arm64 cloud kernel has no gpio-keys driver
(``CONFIG_KEYBOARD_GPIO`` is not set) while it ships ``virtio_input``.

Events are sent in batches ending with ``EV_SYN``/``SYN_REPORT``.  While
the driver has not posted enough buffers, batches wait in a bounded list
(:data:`MAX_PENDING` events by default, ``max_pending``); when it is full the oldest batches are
dropped, as QEMU drops events on a full queue.  Events sent before the
driver is ready (DRIVER_OK) are dropped: no driver, nobody to tell.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kemu.devices.virtio import Executor, VirtioDevice, VirtioSession
from kemu.devices.virtio.queue import VirtioError, Virtqueue
from kemu.errors import MemoryAccessError

log = logging.getLogger(__name__)

VIRTIO_ID_INPUT = 18          # 5.8.1

EVENTQ, STATUSQ = 0, 1        # 5.8.2

# virtio_input_config_select (5.8.4).
CFG_UNSET = 0x00
CFG_ID_NAME = 0x01
CFG_ID_SERIAL = 0x02
CFG_ID_DEVIDS = 0x03
CFG_PROP_BITS = 0x10
CFG_EV_BITS = 0x11
CFG_ABS_INFO = 0x12

CONFIG_HEADER = 8             # select, subsel, size, reserved[5]
CONFIG_UNION = 128

# Linux input-event-codes.h: the event types and codes this module uses.
EV_SYN = 0x00
EV_KEY = 0x01
EV_REL = 0x02
EV_ABS = 0x03
EV_LED = 0x11
EV_REP = 0x14
SYN_REPORT = 0
KEY_POWER = 116
BTN_LEFT, BTN_RIGHT, BTN_MIDDLE = 0x110, 0x111, 0x112
REL_X, REL_Y, REL_WHEEL = 0x00, 0x01, 0x08
ABS_X, ABS_Y = 0x00, 0x01
LED_NUML, LED_CAPSL, LED_SCROLLL = 0, 1, 2
BUS_VIRTUAL = 0x06

EVENT = struct.Struct("<HHI")  # struct virtio_input_event (5.8.6)
ABSINFO = struct.Struct("<IIIII")  # struct virtio_input_absinfo: min, max, fuzz, flat, res

DEFAULT_QUEUE_SIZE = 64
#: Events kept while the driver has no free buffers.
MAX_PENDING = 64

#: Device ids of kemu's input devices (bustype, vendor, product, version).
KEMU_VENDOR = 0x4B45          # "KE"
POWER_BUTTON_PRODUCT = 0x0001


@dataclass(frozen=True)
class InputEvent:
    """One ``struct virtio_input_event``."""

    type: int
    code: int
    value: int

    def pack(self) -> bytes:
        return EVENT.pack(self.type, self.code, self.value & 0xFFFFFFFF)


SYN = InputEvent(EV_SYN, SYN_REPORT, 0)


@dataclass
class VirtioInputState:
    """What :meth:`VirtioInput.save` returns (version 1)."""

    version: int
    select: int
    subsel: int
    pending: list[tuple[int, int, int]] = field(default_factory=list)


class VirtioInput(VirtioDevice):
    """An input device that reports the keys in ``keys`` (Linux key codes)."""

    device_id = VIRTIO_ID_INPUT

    def __init__(self, keys: Iterable[int], *, device_name: str = "kemu input",
                 serial: str = "", ids: tuple[int, int, int, int] = (BUS_VIRTUAL, KEMU_VENDOR,
                                                                     0, 1),
                 queue_size: int = DEFAULT_QUEUE_SIZE, executor: Executor | None = None,
                 name: str = "virtio-input",
                 events: dict[int, Iterable[int]] | None = None,
                 abs_info: dict[int, tuple[int, int, int, int, int]] | None = None,
                 max_pending: int = MAX_PENDING) -> None:
        self.name = name
        #: Events kept while the driver has no free buffers (then the oldest batches go).
        self.max_pending = max_pending
        super().__init__([queue_size, queue_size], executor)
        self.keys = frozenset(keys)
        #: Event codes reported, by event type (CFG_EV_BITS): EV_KEY is ``keys``.
        self.events = {etype: frozenset(codes) for etype, codes in (events or {}).items()}
        self.events[EV_KEY] = self.keys | self.events.get(EV_KEY, frozenset())
        self.keys = self.events[EV_KEY]
        #: Axis ranges (CFG_ABS_INFO): axis -> (min, max, fuzz, flat, res).
        self.abs_info = dict(abs_info or {})
        for etype, codes in self.events.items():
            for code in codes:
                if not 0 <= code < 8 * CONFIG_UNION:
                    raise ValueError(f"{name}: code {code} of type {etype} does not fit "
                                     "the bitmap")
        self.device_name = device_name.encode()[:CONFIG_UNION]
        self.serial = serial.encode()[:CONFIG_UNION]
        self.ids = ids
        self.select = CFG_UNSET
        self.subsel = 0
        self._pending: list[InputEvent] = []
        #: Batches dropped because the driver had no buffers (or was not ready).
        self.dropped = 0

    # -- configuration space (5.8.4) ------------------------------------------------------
    def _payload(self) -> bytes:
        sel, sub = self.select, self.subsel
        if sel == CFG_ID_NAME and sub == 0:
            return self.device_name
        if sel == CFG_ID_SERIAL and sub == 0:
            return self.serial
        if sel == CFG_ID_DEVIDS and sub == 0:
            return struct.pack("<HHHH", *self.ids)
        codes = self.events.get(sub) if sel == CFG_EV_BITS and sub != EV_SYN else None
        if codes is not None and not codes:
            return b"\0"        # the type with no codes (EV_REP: the driver's autorepeat)
        if codes:
            bitmap = bytearray((max(codes) >> 3) + 1)
            for code in codes:
                bitmap[code >> 3] |= 1 << (code & 7)
            return bytes(bitmap)
        if sel == CFG_ABS_INFO and sub in self.abs_info:
            return ABSINFO.pack(*self.abs_info[sub])
        # CFG_PROP_BITS: no properties; other event types: none.
        return b""

    def config_space(self) -> bytes:
        payload = self._payload()
        header = bytes([self.select, self.subsel, len(payload)]) + bytes(5)
        return header + payload.ljust(CONFIG_UNION, b"\0")

    def config_write(self, offset: int, data: bytes) -> None:
        """Only ``select`` (offset 0) and ``subsel`` (offset 1) are writable."""
        for i, byte in enumerate(data, offset):
            if i == 0:
                self.select = byte
            elif i == 1:
                self.subsel = byte

    # -- events (5.8.6) ----------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """The guest's driver set DRIVER_OK: events have somewhere to go."""
        return self.session is not None and self.session.active

    def send(self, events: Sequence[InputEvent]) -> bool:
        """Report ``events`` followed by a SYN_REPORT; False if they were dropped."""
        batch = [*events, SYN]
        if not self.ready:
            self.dropped += 1
            return False
        if len(batch) > self.max_pending:
            raise ValueError(f"{self.name}: {len(batch)} events exceed one batch")
        self._pending.extend(batch)
        while len(self._pending) > self.max_pending:
            # Drop the oldest whole batch, so the driver never sees half of one.
            end = next(i for i, e in enumerate(self._pending) if e == SYN) + 1
            del self._pending[:end]
            self.dropped += 1
        self._flush()
        return True

    def press(self, key: int) -> bool:
        """A key press and release, as two batches."""
        if key not in self.keys:
            raise ValueError(f"{self.name}: key {key} is not one of this device's keys")
        pressed = self.send([InputEvent(EV_KEY, key, 1)])
        return self.send([InputEvent(EV_KEY, key, 0)]) and pressed

    def _flush(self) -> None:
        session = self.session
        if session is None or not session.active:
            return
        queue = session.queues[EVENTQ]
        sent = 0
        try:
            while self._pending:
                chain = queue.pop()
                if chain is None:
                    break
                if chain.writable_len < EVENT.size:
                    raise VirtioError(f"{self.name}: eventq buffer of {chain.writable_len} "
                                      f"bytes, need {EVENT.size}")
                written = chain.write(session.memory, 0, self._pending[0].pack())
                queue.push(chain, written)
                del self._pending[0]
                sent += 1
        except (VirtioError, MemoryAccessError) as exc:
            session.device_error(str(exc))
            return
        if sent:
            session.signal_used(EVENTQ)

    def activate(self, session: VirtioSession) -> None:
        super().activate(session)
        self._pending.clear()

    def queue_notify(self, index: int, queue: Virtqueue) -> None:
        if index == EVENTQ:
            self._flush()
            return
        session = self.session
        if session is None:
            return
        # statusq: LED and sound state from the driver; nothing to show it on.
        used = False
        while (chain := queue.pop()) is not None:
            queue.push(chain, 0)
            used = True
        if used:
            session.signal_used(STATUSQ)

    def reset(self) -> None:
        super().reset()
        self._pending.clear()
        self.select = CFG_UNSET
        self.subsel = 0

    # -- snapshots -----------------------------------------------------------------------
    def save(self) -> VirtioInputState:
        return VirtioInputState(1, self.select, self.subsel,
                                [(e.type, e.code, e.value) for e in self._pending])

    def restore(self, state: VirtioInputState) -> None:
        if state.version != 1:
            raise VirtioError(f"{self.name}: incompatible virtio-input state")
        self.select, self.subsel = state.select, state.subsel
        self._pending = [InputEvent(*e) for e in state.pending[-self.max_pending:]]


class PowerButton(VirtioInput):
    """A virtio-input device with one key, KEY_POWER: the machine's power button."""

    def __init__(self, *, queue_size: int = 8, name: str = "virtio-power-button") -> None:
        super().__init__([KEY_POWER], device_name="kemu power button",
                         serial="kemu-power", ids=(BUS_VIRTUAL, KEMU_VENDOR,
                                                   POWER_BUTTON_PRODUCT, 1),
                         queue_size=queue_size, name=name)

    def push(self) -> bool:
        """Press and release the button; False when no driver listens."""
        return self.press(KEY_POWER)


def power_button() -> PowerButton:
    return PowerButton()
