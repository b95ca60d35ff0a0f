"""The keyboard, tablet and mouse of QEMU's ``virtio-keyboard-device``,
``virtio-tablet-device`` and ``virtio-mouse-device`` (VIRTIO 1.2, 5.8).

Each is a :class:`~kemu.devices.virtio.input.VirtioInput` with the event
types QEMU's devices report (``hw/input/virtio-input-hid.c`` names and
ranges): a keyboard with Linux key codes 1-255 and the three lock LEDs, an
absolute pointer with ABS_X/ABS_Y in 0..:data:`ABS_MAX` (as QEMU's
INPUT_EVENT_ABS_MAX), three buttons and a wheel, and a relative mouse.
The display side (:mod:`kemu.display.vnc`) feeds them with the methods
below; each call is one batch ending with SYN_REPORT.
"""

from __future__ import annotations

from kemu.devices.virtio.input import (
    ABS_X,
    ABS_Y,
    BTN_LEFT,
    BTN_MIDDLE,
    BTN_RIGHT,
    BUS_VIRTUAL,
    EV_ABS,
    EV_KEY,
    EV_LED,
    EV_REL,
    EV_REP,
    LED_CAPSL,
    LED_NUML,
    LED_SCROLLL,
    REL_WHEEL,
    REL_X,
    REL_Y,
    InputEvent,
    VirtioInput,
)

#: Largest absolute coordinate of the tablet (QEMU's INPUT_EVENT_ABS_MAX).
ABS_MAX = 0x7FFF
#: RFB button mask bits (RFC 6143 7.5.5) -> Linux button codes; bits 3/4 are the wheel.
BUTTONS = ((1 << 0, BTN_LEFT), (1 << 1, BTN_MIDDLE), (1 << 2, BTN_RIGHT))
WHEEL_UP, WHEEL_DOWN = 1 << 3, 1 << 4
QEMU_VENDOR = 0x0627            # as QEMU's virtio-input-hid ids
#: Events a keyboard or pointer keeps while the guest's driver is behind: a VNC
#: client types a whole line at once, faster than a busy guest takes it.
MAX_PENDING_HID = 4096


class _Pointer(VirtioInput):
    def __init__(self, **kwargs) -> None:
        super().__init__([code for _bit, code in BUTTONS], max_pending=MAX_PENDING_HID, **kwargs)
        self.buttons = 0

    def _button_events(self, mask: int) -> list[InputEvent]:
        out = [InputEvent(EV_KEY, code, 1 if mask & bit else 0)
               for bit, code in BUTTONS if (mask ^ self.buttons) & bit]
        if mask & WHEEL_UP and not self.buttons & WHEEL_UP:
            out.append(InputEvent(EV_REL, REL_WHEEL, 1))
        if mask & WHEEL_DOWN and not self.buttons & WHEEL_DOWN:
            out.append(InputEvent(EV_REL, REL_WHEEL, -1))
        self.buttons = mask
        return out


class VirtioTablet(_Pointer):
    """An absolute pointer (QEMU's virtio-tablet-device)."""

    def __init__(self, name: str = "virtio-tablet") -> None:
        super().__init__(device_name="QEMU Virtio Tablet", serial="",
                         ids=(BUS_VIRTUAL, QEMU_VENDOR, 0x0003, 1), name=name,
                         events={EV_ABS: [ABS_X, ABS_Y], EV_REL: [REL_WHEEL]},
                         abs_info={ABS_X: (0, ABS_MAX, 0, 0, 0), ABS_Y: (0, ABS_MAX, 0, 0, 0)})

    def pointer(self, x: int, y: int, width: int, height: int, mask: int) -> bool:
        """The pointer at pixel ``(x, y)`` of a ``width`` x ``height`` screen, buttons ``mask``."""
        ax = min(max(x, 0), width - 1) * ABS_MAX // max(width - 1, 1)
        ay = min(max(y, 0), height - 1) * ABS_MAX // max(height - 1, 1)
        return self.send([InputEvent(EV_ABS, ABS_X, ax), InputEvent(EV_ABS, ABS_Y, ay),
                          *self._button_events(mask)])


class VirtioMouse(_Pointer):
    """A relative pointer (QEMU's virtio-mouse-device)."""

    def __init__(self, name: str = "virtio-mouse") -> None:
        super().__init__(device_name="QEMU Virtio Mouse", serial="",
                         ids=(BUS_VIRTUAL, QEMU_VENDOR, 0x0002, 1), name=name,
                         events={EV_REL: [REL_X, REL_Y, REL_WHEEL]})

    def motion(self, dx: int, dy: int, mask: int) -> bool:
        events = [InputEvent(EV_REL, REL_X, dx & 0xFFFFFFFF)] if dx else []
        if dy:
            events.append(InputEvent(EV_REL, REL_Y, dy & 0xFFFFFFFF))
        return self.send(events + self._button_events(mask))


class VirtioKeyboard(VirtioInput):
    """A keyboard reporting Linux key codes (QEMU's virtio-keyboard-device)."""

    def __init__(self, name: str = "virtio-keyboard") -> None:
        super().__init__(range(1, 256), device_name="QEMU Virtio Keyboard", serial="",
                         ids=(BUS_VIRTUAL, QEMU_VENDOR, 0x0001, 1), name=name,
                         max_pending=MAX_PENDING_HID,
                         # EV_REP has no codes: its presence asks for the driver's autorepeat
                         events={EV_REP: [], EV_LED: [LED_NUML, LED_CAPSL, LED_SCROLLL]})

    def key(self, code: int, down: bool) -> bool:
        if code not in self.keys:
            return False
        return self.send([InputEvent(EV_KEY, code, 1 if down else 0)])
