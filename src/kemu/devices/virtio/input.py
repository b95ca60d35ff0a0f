"""virtio-input (VIRTIO 1.2 section 5.8) as a power button.

The device reports one key, KEY_POWER, as a Linux input device; the host
"presses" it (QMP ``system_powerdown``) and the guest's input layer and
userspace (busybox ``acpid`` in the default guest) act on it, as they would
on a real power button.  Queue 0 (eventq) carries ``struct
virtio_input_event {le16 type; le16 code; le32 value}`` to the driver;
queue 1 (statusq) carries LED/feedback events back, which are consumed and
ignored.
"""

from __future__ import annotations

import struct
from collections import deque

from kemu.devices.virtio import DescriptorChain, VirtioDevice, VirtioError, Virtqueue
from kemu.errors import MemoryAccessError

VIRTIO_ID_INPUT = 18

# virtio_input_config_select (5.8.5.1)
CFG_UNSET = 0x00
CFG_ID_NAME = 0x01
CFG_ID_SERIAL = 0x02
CFG_ID_DEVIDS = 0x03
CFG_PROP_BITS = 0x10
CFG_EV_BITS = 0x11
CFG_ABS_INFO = 0x12

# Linux input event codes (include/uapi/linux/input-event-codes.h)
EV_SYN = 0x00
EV_KEY = 0x01
SYN_REPORT = 0
KEY_POWER = 116

EVENT = struct.Struct("<HHI")
MAX_PENDING = 64


class VirtioPowerButton(VirtioDevice):
    device_id = VIRTIO_ID_INPUT

    def __init__(self, name: str = "virtio-power-button") -> None:
        self.name = name
        super().__init__([64, 64])
        self._select = 0
        self._subsel = 0
        self._pending: deque[bytes] = deque()

    # -- configuration space (5.8.4) -------------------------------------------------
    def _payload(self) -> bytes:
        if self._select == CFG_ID_NAME:
            return b"kemu power button"
        if self._select == CFG_ID_SERIAL:
            return b"kemu-0"
        if self._select == CFG_ID_DEVIDS:
            return struct.pack("<HHHH", 0x19, 0x0001, 0x0001, 0x0001)  # BUS_HOST
        if self._select == CFG_EV_BITS and self._subsel == EV_KEY:
            bitmap = bytearray(KEY_POWER // 8 + 1)
            bitmap[KEY_POWER // 8] |= 1 << (KEY_POWER % 8)
            return bytes(bitmap)
        return b""

    def config_space(self) -> bytes:
        payload = self._payload()
        return (bytes([self._select, self._subsel, len(payload)]) + bytes(5)
                + payload.ljust(128, b"\0"))

    def config_write(self, offset: int, data: bytes) -> None:
        for i, byte in enumerate(data):
            if offset + i == 0:
                self._select = byte
            elif offset + i == 1:
                self._subsel = byte

    # -- queues -------------------------------------------------------------------------
    def press(self) -> bool:
        """Press and release the power button; False if the driver is not there."""
        if self.session is None or not self.session.active:
            return False
        for event in ((EV_KEY, KEY_POWER, 1), (EV_SYN, SYN_REPORT, 0),
                      (EV_KEY, KEY_POWER, 0), (EV_SYN, SYN_REPORT, 0)):
            if len(self._pending) < MAX_PENDING:
                self._pending.append(EVENT.pack(*event))
        self._deliver()
        return True

    def _deliver(self) -> None:
        session = self.session
        if session is None or not session.active:
            return
        queue = session.queues[0]
        delivered = False
        try:
            while self._pending:
                chain: DescriptorChain | None = queue.pop()
                if chain is None:
                    break
                written = chain.write(session.memory, 0, self._pending.popleft())
                queue.push(chain, written)
                delivered = True
        except (VirtioError, MemoryAccessError) as exc:
            session.device_error(str(exc))
            return
        if delivered:
            session.signal_used(0)

    def queue_notify(self, index: int, queue: Virtqueue) -> None:
        if index == 0:
            self._deliver()          # new event buffers: hand over what waits
            return
        session = self.session
        if session is None:
            return
        while (chain := queue.pop()) is not None:   # statusq: consume, ignore
            queue.push(chain, 0)
        session.signal_used(index)

    def reset(self) -> None:
        super().reset()
        self._pending.clear()
        self._select = self._subsel = 0
