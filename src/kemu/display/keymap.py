"""X keysyms (what RFB KeyEvent messages carry, RFC 6143 7.5.4) to Linux key codes.

A US keyboard layout, as QEMU's default ``en-us`` keymap: each keysym maps to
the key that produces it and whether Shift must be down for it.  Linux key
codes are those of ``include/uapi/linux/input-event-codes.h``.  Keysyms
outside the table are ignored (one log line at debug level).
"""

from __future__ import annotations

KEY_LEFTSHIFT = 42

_ROWS = [
    # (first key code, unshifted characters, shifted characters)
    (2, "1234567890-=", "!@#$%^&*()_+"),
    (16, "qwertyuiop[]", "QWERTYUIOP{}"),
    (30, "asdfghjkl;'`", 'ASDFGHJKL:"~'),
    (43, "\\zxcvbnm,./", "|ZXCVBNM<>?"),
]

#: Keysyms of the function and modifier keys (X11 keysymdef.h) -> Linux key codes.
SPECIAL = {
    0xFF08: 14, 0xFF09: 15, 0xFF0D: 28, 0xFF1B: 1, 0xFFFF: 111,           # BackSpace Tab Return Escape Delete
    0xFF50: 102, 0xFF51: 105, 0xFF52: 103, 0xFF53: 106, 0xFF54: 108,       # Home Left Up Right Down
    0xFF55: 104, 0xFF56: 109, 0xFF57: 107, 0xFF63: 110,                    # Prior Next End Insert
    0xFFE1: 42, 0xFFE2: 54, 0xFFE3: 29, 0xFFE4: 97, 0xFFE5: 58,            # Shift Control Caps_Lock
    0xFFE7: 125, 0xFFE8: 126, 0xFFE9: 56, 0xFFEA: 100,                     # Meta Alt
    0xFFEB: 125, 0xFFEC: 126, 0xFF67: 127,                                 # Super Menu
    0xFF7F: 69, 0xFF14: 70, 0xFF61: 99, 0xFF13: 119,                       # Num/Scroll Lock Print Pause
    0xFF8D: 96, 0xFFAA: 55, 0xFFAB: 78, 0xFFAD: 74, 0xFFAF: 98,            # keypad Enter * + - /
    0x0020: 57,                                                            # space
    **{0xFFBE + i: 59 + i for i in range(10)},                             # F1-F10
    0xFFC8: 87, 0xFFC9: 88,                                                # F11 F12
    **{0xFFB0 + d: c for d, c in enumerate((82, 79, 80, 81, 75, 76, 77, 71, 72, 73))},  # KP_0-9
}


def _build() -> dict[int, tuple[int, bool]]:
    table: dict[int, tuple[int, bool]] = {k: (v, False) for k, v in SPECIAL.items()}
    for first, plain, shifted in _ROWS:
        for i, (lo, hi) in enumerate(zip(plain, shifted)):
            table[ord(lo)] = (first + i, False)
            table[ord(hi)] = (first + i, True)
    table[0xFE20] = (15, True)            # ISO_Left_Tab: Shift+Tab
    return table


KEYSYMS = _build()


def keysym_to_key(keysym: int) -> tuple[int, bool] | None:
    """(Linux key code, needs Shift) for ``keysym``, or None if the layout has no such key."""
    return KEYSYMS.get(keysym)


#: QEMU's key names (QKeyCode, as HMP sendkey and QMP send-key take them) -> Linux codes.
QCODES: dict[str, int] = {
    **{c: KEYSYMS[ord(c)][0] for c in "abcdefghijklmnopqrstuvwxyz0123456789"},
    "shift": 42, "shift_r": 54, "ctrl": 29, "ctrl_r": 97, "alt": 56, "alt_r": 100,
    "meta_l": 125, "meta_r": 126, "menu": 127, "esc": 1, "minus": 12, "equal": 13,
    "backspace": 14, "tab": 15, "bracket_left": 26, "bracket_right": 27, "ret": 28,
    "semicolon": 39, "apostrophe": 40, "grave_accent": 41, "backslash": 43, "comma": 51,
    "dot": 52, "slash": 53, "spc": 57, "caps_lock": 58, "num_lock": 69, "scroll_lock": 70,
    "print": 99, "sysrq": 99, "home": 102, "up": 103, "pgup": 104, "left": 105, "right": 106,
    "end": 107, "down": 108, "pgdn": 109, "insert": 110, "delete": 111, "pause": 119,
    **{f"f{i}": 58 + i for i in range(1, 11)}, "f11": 87, "f12": 88,
}


#: Extended XT scancodes (E0 xx, sent by RFB's QEMU extended key event as 0x80 | xx)
#: -> Linux key codes; single-byte scancodes 1-88 are the Linux codes themselves.
XT_EXTENDED = {0x9C: 96, 0x9D: 97, 0xB5: 98, 0xB7: 99, 0xB8: 100, 0xC7: 102, 0xC8: 103,
               0xC9: 104, 0xCB: 105, 0xCD: 106, 0xCF: 107, 0xD0: 108, 0xD1: 109, 0xD2: 110,
               0xD3: 111, 0xDB: 125, 0xDC: 126, 0xDD: 127}


def xt_to_key(code: int) -> int | None:
    """The Linux key code of an RFB-encoded XT scancode, or None."""
    if 1 <= code <= 88:
        return code
    return XT_EXTENDED.get(code)
