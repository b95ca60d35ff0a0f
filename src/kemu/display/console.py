"""A machine's graphical console: the surface its adapter draws, the input devices behind it.

This is what the host side (VNC, screendump, the API) holds, in the manner of
QEMU's ``QemuConsole``: the :class:`~kemu.display.surface.DisplaySurface`
and the keyboards and pointers that key and pointer events go to.  Input
is delivered under the machine lock (device state is touched under it
only); events arriving while no guest driver listens are dropped, as the
devices drop them.
"""

from __future__ import annotations

import logging
import threading

from kemu.display.keymap import KEY_LEFTSHIFT, keysym_to_key, xt_to_key
from kemu.display.surface import DisplaySurface

log = logging.getLogger(__name__)


class DisplayConsole:
    def __init__(self, lock: threading.RLock | None = None) -> None:
        self.lock = lock if lock is not None else threading.RLock()
        self.surface = DisplaySurface()
        #: Whether a graphics adapter draws the surface (else it stays blank).
        self.has_adapter = False
        self.keyboards: list = []
        self.tablets: list = []
        self.mice: list = []
        self._shift_down = False
        self._last_pointer: tuple[int, int] | None = None

    def key_event(self, keysym: int, down: bool) -> None:
        """An X keysym pressed or released (RFB KeyEvent)."""
        found = keysym_to_key(keysym)
        if found is None:
            log.debug("console: no key for keysym %#x", keysym)
            return
        code, shifted = found
        if code == KEY_LEFTSHIFT or code == 54:
            self._shift_down = down
        with self.lock:
            for kbd in self.keyboards:
                # A shifted character sent without Shift (clients that type text) gets one.
                fake_shift = down and shifted and not self._shift_down
                if fake_shift:
                    kbd.key(KEY_LEFTSHIFT, True)
                kbd.key(code, down)
                if fake_shift:
                    kbd.key(KEY_LEFTSHIFT, False)

    def scancode_event(self, code: int, down: bool) -> None:
        """A key by its position (RFB QEMU extended key event): no layout involved."""
        key = xt_to_key(code)
        if key is None:
            log.debug("console: no key for scancode %#x", code)
            return
        if key in (KEY_LEFTSHIFT, 54):
            self._shift_down = down
        with self.lock:
            for kbd in self.keyboards:
                kbd.key(key, down)

    def pointer_event(self, x: int, y: int, mask: int) -> None:
        """The pointer at surface pixel ``(x, y)`` with RFB button ``mask``."""
        width, height = self.surface.width, self.surface.height
        with self.lock:
            for tablet in self.tablets:
                tablet.pointer(x, y, width, height, mask)
            if self.mice:
                last = self._last_pointer or (x, y)
                for mouse in self.mice:
                    mouse.motion(x - last[0], y - last[1], mask)
        self._last_pointer = (x, y)
