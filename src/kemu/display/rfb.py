"""The server side of one RFB connection (RFC 6143, "The Remote Framebuffer Protocol").

Sans-I/O: the connection's bytes go in through :meth:`RfbSession.receive`,
what to send comes out of :attr:`RfbSession.outbox`, and the socket glue
(:mod:`kemu.display.vnc`) moves them.  The session walks the handshake of
section 7.1-7.3 (ProtocolVersion 3.3, 3.7 or 3.8; security None or VNC
Authentication; ClientInit / ServerInit), then serves the client messages
of 7.5: SetPixelFormat, SetEncodings, FramebufferUpdateRequest, KeyEvent,
PointerEvent, ClientCutText (read and dropped).

Updates are pulled, as the protocol wants: one FramebufferUpdate per
request, sent once something changed (an incremental request waits; nothing
at all is sent for an idle screen).  What changed comes from the surface's
:class:`~kemu.display.surface.DirtyTracker`; a session keeps a copy of what
its client has, so a scrolled console goes out as one CopyRect plus the
new lines, and the rest is encoded in ZRLE when the client takes it (Raw
otherwise).  A size change goes out as a DesktopSize pseudo-rectangle to
clients that announced it.

Everything from the client is untrusted: unknown message types, bad pixel
formats and oversized cut text end the connection (:attr:`closed` with a
reason), never the server.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from kemu.display import rfb_encode as enc
from kemu.display.surface import BYTES_PER_PIXEL, DisplaySurface, Rect

SEC_INVALID, SEC_NONE, SEC_VNC_AUTH = 0, 1, 2
MSG_SET_PIXEL_FORMAT = 0
MSG_SET_ENCODINGS = 2
MSG_FRAMEBUFFER_UPDATE_REQUEST = 3
MSG_KEY_EVENT = 4
MSG_POINTER_EVENT = 5
MSG_CLIENT_CUT_TEXT = 6
MSG_SET_DESKTOP_SIZE = 251          # ExtendedDesktopSize extension
MSG_QEMU = 255                      # QEMU client messages; submessage 0: extended key event
#: Cut text longer than this ends the connection (as QEMU's bound).
MAX_CUT_TEXT = 1 << 20
#: Bytes queued for a client beyond which no new update is made for it.
MAX_BACKLOG = 4 << 20
#: Bands of at least this many rows are looked at for a scroll (CopyRect).
SCROLL_MIN_ROWS = 16


@dataclass
class SessionHooks:
    """What a session calls; all optional."""

    #: check_password(challenge, response) -> bool, for VNC Authentication.
    check_auth: Callable[[bytes, bytes], bool] | None = None
    #: shared flag of ClientInit -> None to go on, or a reason to refuse.
    client_init: Callable[[bool], str | None] = lambda shared: None
    initialized: Callable[[], None] = lambda: None
    key: Callable[[int, bool], None] = lambda keysym, down: None
    #: a QEMU extended key event: (XT scancode as RFB encodes it, down)
    scancode: Callable[[int, bool], None] = lambda code, down: None
    pointer: Callable[[int, int, int], None] = lambda x, y, mask: None
    #: the surface changed and an update may be due (the glue schedules one).
    wake: Callable[[], None] = lambda: None
    #: the client asks for another desktop size (SetDesktopSize) -> whether it may.
    resize: Callable[[int, int], bool] = lambda width, height: False


class RfbSession:
    """One client: handshake, messages, updates."""

    def __init__(self, surface: DisplaySurface, hooks: SessionHooks, *, auth: bool = False,
                 name: str = "kemu") -> None:
        self.surface = surface
        self.hooks = hooks
        self.auth = auth
        self.name = name.encode()[:255]
        self.outbox = bytearray()
        self.closed: str | None = None
        self.minor = 0
        self.pf = enc.PixelFormat()
        self.encodings: list[int] = []
        self.initialized = False
        self._in = bytearray()
        self._state = "version"
        self._challenge = b""
        self._request: tuple[bool, Rect] | None = None
        self._tracker = None
        self._shadow: bytearray | None = None      # XRGB of what the client has
        self._shadow_size = (0, 0)
        self._zrle: enc.ZrleEncoder | None = None
        #: Answers to SetDesktopSize owed to the client (status codes), and whether it
        #: has been told the layout once (ExtendedDesktopSize).
        self._resize_replies: list[int] = []
        self._layout_sent = False
        #: The client was told it may send QEMU extended key events.
        self._ext_keys_sent = False
        #: FramebufferUpdate messages and payload bytes sent (for the benchmark).
        self.updates_sent = 0
        self.bytes_sent = 0
        self.outbox += b"RFB 003.008\n"

    # -- input ----------------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        if self.closed:
            return
        self._in += data
        while not self.closed:
            handled = getattr(self, f"_on_{self._state}")()
            if not handled:
                break

    def close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
            if self._tracker is not None:
                self._tracker.close()
                self._tracker = None

    def _take(self, n: int) -> bytes | None:
        if len(self._in) < n:
            return None
        data = bytes(self._in[:n])
        del self._in[:n]
        return data

    def _on_version(self) -> bool:
        data = self._take(12)
        if data is None:
            return False
        if data[:4] != b"RFB " or data[7:8] != b"." or data[11:12] != b"\n" \
                or not data[4:7].isdigit() or not data[8:11].isdigit():
            self.close("not an RFB client")
            return True
        major, minor = int(data[4:7]), int(data[8:11])
        if major != 3:
            self.close(f"RFB version {major}.{minor}")
            return True
        self.minor = 8 if minor >= 8 else 7 if minor == 7 else 3
        sec = SEC_VNC_AUTH if self.auth else SEC_NONE
        if self.minor == 3:
            self.outbox += struct.pack(">I", sec)
            self._after_security_type(sec)
        else:
            self.outbox += bytes([1, sec])
            self._state = "security"
        return True

    def _on_security(self) -> bool:
        data = self._take(1)
        if data is None:
            return False
        want = SEC_VNC_AUTH if self.auth else SEC_NONE
        if data[0] != want:
            self._fail("security type not offered")
            return True
        self._after_security_type(want)
        return True

    def _after_security_type(self, sec: int) -> None:
        if sec == SEC_VNC_AUTH:
            self._challenge = os.urandom(16)
            self.outbox += self._challenge
            self._state = "auth"
        else:
            if self.minor == 8:
                self.outbox += struct.pack(">I", 0)
            self._state = "client_init"

    def _on_auth(self) -> bool:
        response = self._take(16)
        if response is None:
            return False
        check = self.hooks.check_auth
        if check is None or not check(self._challenge, response):
            self._fail("Authentication failed")
            return True
        self.outbox += struct.pack(">I", 0)
        self._state = "client_init"
        return True

    def _fail(self, reason: str) -> None:
        self.outbox += struct.pack(">I", 1)
        if self.minor == 8:
            text = reason.encode()
            self.outbox += struct.pack(">I", len(text)) + text
        self.close(reason)

    def _on_client_init(self) -> bool:
        data = self._take(1)
        if data is None:
            return False
        refused = self.hooks.client_init(bool(data[0]))
        if refused:
            self.close(refused)
            return True
        with self.surface.lock:
            w, h = self.surface.width, self.surface.height
            self._tracker = self.surface.subscribe(self.hooks.wake)
        self._shadow, self._shadow_size = None, (w, h)
        self.outbox += struct.pack(">HH", w, h) + self.pf.pack()
        self.outbox += struct.pack(">I", len(self.name)) + self.name
        self._state = "normal"
        self.initialized = True
        self.hooks.initialized()
        return True

    def _on_normal(self) -> bool:
        if not self._in:
            return False
        kind = self._in[0]
        if kind == MSG_SET_PIXEL_FORMAT:
            data = self._take(20)
            if data is None:
                return False
            try:
                self.pf = enc.PixelFormat.unpack(data[4:20])
            except enc.PixelFormatError as exc:
                self.close(f"SetPixelFormat: {exc}")
                return True
            self._shadow = None                       # resend everything in the new format
            # (the ZRLE zlib stream goes on: it lasts as long as the connection, 7.7.6)
        elif kind == MSG_SET_ENCODINGS:
            if len(self._in) < 4:
                return False
            n = struct.unpack_from(">H", self._in, 2)[0]
            data = self._take(4 + 4 * n)
            if data is None:
                return False
            self.encodings = list(struct.unpack_from(f">{n}i", data, 4))
            self._layout_sent = False
            self._ext_keys_sent = False
            if enc.ENC_QEMU_EXTENDED_KEY_EVENT in self.encodings:
                self.hooks.wake()
        elif kind == MSG_FRAMEBUFFER_UPDATE_REQUEST:
            data = self._take(10)
            if data is None:
                return False
            incremental, x, y, w, h = struct.unpack_from(">BHHHH", data, 1)
            if not incremental:
                self._shadow = None                   # the client wants it all again
            self._request = (bool(incremental), Rect(x, y, w, h))
            self.hooks.wake()
        elif kind == MSG_KEY_EVENT:
            data = self._take(8)
            if data is None:
                return False
            down, keysym = struct.unpack_from(">B2xI", data, 1)
            self.hooks.key(keysym, bool(down))
        elif kind == MSG_POINTER_EVENT:
            data = self._take(6)
            if data is None:
                return False
            mask, x, y = struct.unpack_from(">BHH", data, 1)
            self.hooks.pointer(x, y, mask)
        elif kind == MSG_CLIENT_CUT_TEXT:
            if len(self._in) < 8:
                return False
            (length,) = struct.unpack_from(">i", self._in, 4)
            if not 0 <= length <= MAX_CUT_TEXT:
                self.close(f"ClientCutText of {length} bytes")
                return True
            if self._take(8 + length) is None:
                return False
        elif kind == MSG_QEMU and self._ext_keys_sent:
            if len(self._in) < 2:
                return False
            if self._in[1] != 0:
                self.close(f"QEMU client message {self._in[1]} not supported")
                return True
            data = self._take(12)
            if data is None:
                return False
            down, _keysym, code = struct.unpack_from(">HII", data, 2)
            self.hooks.scancode(code, bool(down))
        elif kind == MSG_SET_DESKTOP_SIZE and enc.ENC_EXTENDED_DESKTOP_SIZE in self.encodings:
            if len(self._in) < 8:
                return False
            w, h, n = struct.unpack_from(">HHB", self._in, 2)
            if self._take(8 + 16 * n) is None:
                return False
            if n == 0 or w == 0 or h == 0:
                self._resize_replies.append(3)           # invalid screen layout
            else:
                self._resize_replies.append(0 if self.hooks.resize(w, h) else 1)
            self.hooks.wake()
        else:
            self.close(f"unknown client message type {kind}")
        return True

    # -- updates --------------------------------------------------------------------------
    @property
    def update_due(self) -> bool:
        """A request is pending and there is something to send for it."""
        if self._request is None or self._tracker is None or self.closed:
            return False
        if len(self.outbox) > MAX_BACKLOG:
            return False
        with self.surface.lock:
            return (not self._request[0] or self._shadow is None or self._tracker.resized
                    or bool(self._tracker.rects) or bool(self._resize_replies)
                    or (not self._ext_keys_sent
                        and enc.ENC_QEMU_EXTENDED_KEY_EVENT in self.encodings))

    def update(self) -> bool:
        """Append one FramebufferUpdate to :attr:`outbox` if one is due; True if so."""
        if not self.update_due:
            return False
        with self.surface.lock:
            resized, rects = self._tracker.take()
            w, h = self.surface.width, self.surface.height
            frame = bytes(self.surface.data)
        full = Rect(0, 0, w, h)
        out: list[bytes] = []
        if enc.ENC_QEMU_EXTENDED_KEY_EVENT in self.encodings and not self._ext_keys_sent:
            out.append(enc.RECT_HEADER.pack(0, 0, 0, 0, enc.ENC_QEMU_EXTENDED_KEY_EVENT))
            self._ext_keys_sent = True
        extended = enc.ENC_EXTENDED_DESKTOP_SIZE in self.encodings
        for status in self._resize_replies:
            out.append(enc.extended_desktop_size_rect(w, h, 1, status))
        self._resize_replies.clear()
        if resized or (w, h) != self._shadow_size or (extended and not self._layout_sent):
            self._shadow = None
            if extended:
                out.append(enc.extended_desktop_size_rect(w, h))
            elif enc.ENC_DESKTOP_SIZE in self.encodings:
                out.append(enc.desktop_size_rect(w, h))
            self._layout_sent = True
            self._shadow_size = (w, h)
        if self._shadow is None or len(self._shadow) != len(frame):
            rects = [full]
            old = None
        else:
            old = self._shadow
        self._request = None
        rects = [r.intersect(full) for r in rects]
        rects = [r for r in rects if not r.empty]
        if old is not None and enc.ENC_COPYRECT in self.encodings:
            rects = self._scrolls(rects, frame, old, w, out)
        for r in rects:
            out.append(self._encode(r, frame, w))
        self._shadow = bytearray(frame)
        body = b"".join(out)
        self.outbox += struct.pack(">BxH", 0, len(out)) + body
        self.updates_sent += 1
        self.bytes_sent += 4 + len(body)
        return True

    def _rows(self, r: Rect, frame: bytes, width: int) -> bytes:
        stride, span = width * BYTES_PER_PIXEL, r.w * BYTES_PER_PIXEL
        off = r.y * stride + r.x * BYTES_PER_PIXEL
        if r.x == 0 and r.w == width:
            return frame[off:off + stride * r.h]
        return b"".join(frame[off + i * stride:off + i * stride + span] for i in range(r.h))

    def _encode(self, r: Rect, frame: bytes, width: int) -> bytes:
        pixels = self.pf.convert(self._rows(r, frame, width))
        if enc.ENC_ZRLE in self.encodings:
            if self._zrle is None:
                self._zrle = enc.ZrleEncoder()
            return self._zrle.rect(r.x, r.y, r.w, r.h, pixels, self.pf)
        return enc.raw_rect(r.x, r.y, r.w, r.h, pixels)

    def _scrolls(self, rects: list[Rect], frame: bytes, old: bytearray, width: int,
                 out: list[bytes]) -> list[Rect]:
        """Find full-width bands whose rows moved up or down; send them as CopyRect.

        Returns the rectangles still to encode (the rows the copy did not give).
        """
        stride = width * BYTES_PER_PIXEL
        result = []
        for r in rects:
            if r.x != 0 or r.w != width or r.h < SCROLL_MIN_ROWS:
                result.append(r)
                continue
            new_rows = [frame[(r.y + i) * stride:(r.y + i + 1) * stride] for i in range(r.h)]
            old_rows = [bytes(old[(r.y + i) * stride:(r.y + i + 1) * stride]) for i in range(r.h)]
            dy = _find_shift(new_rows, old_rows)
            if dy == 0:
                result.append(r)
                continue
            # new[i] == old[i + dy] for the rows of the band that the copy covers
            lo, hi = (0, r.h - dy) if dy > 0 else (-dy, r.h)
            out.append(enc.copy_rect(0, r.y + lo, width, hi - lo, 0, r.y + lo + dy))
            start = None
            for i in range(r.h):
                same = lo <= i < hi and new_rows[i] == old_rows[i + dy]
                if not same and start is None:
                    start = i
                elif same and start is not None:
                    result.append(Rect(0, r.y + start, width, i - start))
                    start = None
            if start is not None:
                result.append(Rect(0, r.y + start, width, r.h - start))
        return result


def _find_shift(new_rows: list[bytes], old_rows: list[bytes]) -> int:
    """The shift ``dy`` for which most rows satisfy ``new[i] == old[i + dy]`` (0: none worth it).

    Rows that are the same everywhere (blank lines) do not vote.
    """
    n = len(new_rows)
    where: dict[bytes, int] = {}
    for i, row in enumerate(old_rows):
        where.setdefault(row, i)
    votes: dict[int, int] = {}
    for i in range(0, n, max(1, n // 64)):
        row = new_rows[i]
        j = where.get(row)
        if j is not None and j != i and row.count(row[:4]) * 4 != len(row):
            votes[j - i] = votes.get(j - i, 0) + 1
    if not votes:
        return 0
    dy = max(votes, key=votes.get)
    matched = sum(1 for i in range(max(0, -dy), min(n, n - dy))
                  if new_rows[i] == old_rows[i + dy])
    unchanged = sum(1 for i in range(n) if new_rows[i] == old_rows[i])
    return dy if matched > max(n // 2, unchanged) else 0
