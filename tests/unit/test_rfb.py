"""The RFB server session (RFC 6143), sans-I/O: handshake, auth, messages, updates."""

import struct
import zlib

import pytest

from kemu.display import rfb_encode as enc
from kemu.display.rfb import MAX_CUT_TEXT, RfbSession, SessionHooks
from kemu.display.surface import DisplaySurface, Rect
from kemu.display.vnc import vnc_auth_response, vnc_des_key

RED = bytes([0, 0, 255, 0])      # XRGB8888 in memory: B, G, R, X
WHITE = b"\xff\xff\xff\x00"


def connect(surface, version=b"RFB 003.008\n", auth=False, password="secret", encodings=(),
            shared=1, **hooks):
    got = {"keys": [], "pointer": [], "init": 0}
    h = SessionHooks(key=lambda k, d: got["keys"].append((k, d)),
                     pointer=lambda x, y, m: got["pointer"].append((x, y, m)),
                     initialized=lambda: got.__setitem__("init", got["init"] + 1),
                     check_auth=lambda c, r: vnc_auth_response(password, c) == r, **hooks)
    s = RfbSession(surface, h, auth=auth, name="test")
    assert s.outbox[:12] == b"RFB 003.008\n"
    del s.outbox[:12]
    s.receive(version)
    if version.startswith(b"RFB 003.003"):
        sec, = struct.unpack(">I", s.outbox[:4])
        del s.outbox[:4]
    else:
        assert s.outbox[0] == 1
        sec = s.outbox[1]
        del s.outbox[:2]
        s.receive(bytes([sec]))
    if sec == 2:
        challenge = bytes(s.outbox[:16])
        del s.outbox[:16]
        s.receive(vnc_auth_response(password, challenge))
    if sec == 2 or s.minor == 8:
        assert struct.unpack(">I", s.outbox[:4])[0] == 0
        del s.outbox[:4]
    s.receive(bytes([shared]))
    w, h_, = struct.unpack(">HH", s.outbox[:4])
    name_len, = struct.unpack(">I", s.outbox[20:24])
    assert s.outbox[24:24 + name_len] == b"test"
    del s.outbox[:24 + name_len]
    assert (w, h_) == (surface.width, surface.height) and got["init"] == 1
    if encodings:
        s.receive(struct.pack(">BxH", 2, len(encodings)) + struct.pack(f">{len(encodings)}i",
                                                                    *encodings))
    return s, got


def request(s, incremental, x=0, y=0, w=0xFFFF, h=0xFFFF):
    """FramebufferUpdateRequest, then what the socket glue does: make the update if due."""
    s.receive(struct.pack(">BBHHHH", 3, incremental, x, y, w, h))
    return s.update()


def read_update(s, zrle=None):
    """Parse one FramebufferUpdate from the outbox: list of (x, y, w, h, enc, payload)."""
    data = bytes(s.outbox)
    assert data[0] == 0
    n, = struct.unpack_from(">H", data, 2)
    off, rects = 4, []
    bpp = s.pf.bytes_per_pixel
    for _ in range(n):
        x, y, w, h, e = enc.RECT_HEADER.unpack_from(data, off)
        off += enc.RECT_HEADER.size
        if e == enc.ENC_RAW:
            payload = data[off:off + w * h * bpp]
            off += w * h * bpp
        elif e == enc.ENC_COPYRECT:
            payload = struct.unpack_from(">HH", data, off)
            off += 4
        elif e == enc.ENC_ZRLE:
            length, = struct.unpack_from(">I", data, off)
            payload = decode_zrle(zrle.decompress(data[off + 4:off + 4 + length]), w, h)
            off += 4 + length
        elif e == enc.ENC_EXTENDED_DESKTOP_SIZE:
            screens = data[off]
            payload = data[off:off + 4 + 16 * screens]
            off += 4 + 16 * screens
        else:
            payload = None
        rects.append((x, y, w, h, e, payload))
    del s.outbox[:off]
    return rects


def decode_zrle(data, w, h):
    """A ZRLE decoder for 3-byte CPIXELs, solid and raw tiles (what kemu sends)."""
    out = bytearray(w * h * 4)
    off = 0
    for ty in range(0, h, 64):
        for tx in range(0, w, 64):
            tw, th = min(64, w - tx), min(64, h - ty)
            sub = data[off]
            off += 1
            if sub == 1:
                px = [data[off:off + 3] + b"\0"] * (tw * th)
                off += 3
            else:
                assert sub == 0
                px = [data[off + 3 * i:off + 3 * i + 3] + b"\0" for i in range(tw * th)]
                off += 3 * tw * th
            for r in range(th):
                row = b"".join(px[r * tw:(r + 1) * tw])
                o = ((ty + r) * w + tx) * 4
                out[o:o + tw * 4] = row
    assert off == len(data)
    return bytes(out)


@pytest.mark.parametrize("version", [b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n",
                                     b"RFB 003.889\n"])
def test_handshake_versions(version):
    surface = DisplaySurface(32, 16)
    s, got = connect(surface, version)
    assert s.initialized and s.closed is None


def test_vnc_authentication_right_and_wrong_password():
    surface = DisplaySurface(8, 8)
    s, _ = connect(surface, auth=True)
    assert s.initialized
    # wrong password: SecurityResult 1 with a reason (3.8), then closed
    h = SessionHooks(check_auth=lambda c, r: vnc_auth_response("secret", c) == r)
    s = RfbSession(surface, h, auth=True)
    s.outbox.clear()
    s.receive(b"RFB 003.008\n" + b"\x02")
    challenge = bytes(s.outbox[2:18])
    s.outbox.clear()
    s.receive(vnc_auth_response("wrong", challenge))
    assert struct.unpack(">I", s.outbox[:4])[0] == 1 and b"Authentication failed" in s.outbox
    assert s.closed and not s.initialized
    # asking for no authentication when it is required
    s = RfbSession(surface, h, auth=True)
    s.receive(b"RFB 003.008\n" + b"\x01")
    assert s.closed


def test_des_key_matches_the_vnc_convention():
    # Bits of each byte reversed: 'p' = 0x70 -> 0x0e.
    assert vnc_des_key("p") == b"\x0e" + bytes(7)
    assert len(vnc_auth_response("abcdefghXYZ", bytes(16))) == 16
    assert vnc_auth_response("abcdefgh", bytes(16)) == vnc_auth_response("abcdefghXYZ", bytes(16))


def test_raw_update_then_nothing_until_something_changes():
    surface = DisplaySurface(16, 8)
    surface.fill(Rect(2, 1, 3, 2), RED)
    s, _ = connect(surface)
    request(s, 0)
    (x, y, w, h, e, pixels), = read_update(s)
    assert (x, y, w, h, e) == (0, 0, 16, 8, enc.ENC_RAW)
    assert pixels[(1 * 16 + 2) * 4:(1 * 16 + 2) * 4 + 4] == RED
    # An incremental request on an idle screen: no bytes at all.
    assert not request(s, 1) and s.outbox == b""
    # One pixel changes: only it is sent.
    surface.fill(Rect(7, 3, 1, 1), WHITE)
    assert s.update()
    (x, y, w, h, e, pixels), = read_update(s)
    assert (x, y, w, h) == (7, 3, 1, 1) and pixels == WHITE


def test_pixel_format_is_honoured():
    surface = DisplaySurface(4, 4)
    surface.fill(Rect(0, 0, 4, 4), RED)
    s, _ = connect(surface)
    pf = enc.PixelFormat(32, 24, False, True, 255, 255, 255, 0, 8, 16)       # RGBX
    s.receive(b"\x00\x00\x00\x00" + pf.pack())
    request(s, 0)
    (_x, _y, _w, _h, _e, pixels), = read_update(s)
    assert pixels[:4] == b"\xff\x00\x00\x00"
    pf16 = enc.PixelFormat(16, 16, True, True, 31, 63, 31, 11, 5, 0)          # RGB565 BE
    s.receive(b"\x00\x00\x00\x00" + pf16.pack())
    request(s, 0)
    (_x, _y, _w, _h, _e, pixels), = read_update(s)
    assert pixels[:2] == b"\xf8\x00"


def test_zrle_round_trip():
    surface = DisplaySurface(130, 70)               # tiles at the edges are partial
    surface.fill(Rect(0, 0, 130, 70), WHITE)
    surface.fill(Rect(60, 30, 10, 5), RED)
    s, _ = connect(surface, encodings=[enc.ENC_ZRLE, enc.ENC_RAW])
    z = zlib.decompressobj()
    request(s, 0)
    (_x, _y, w, h, e, pixels), = read_update(s, z)
    assert e == enc.ENC_ZRLE and pixels == surface.snapshot()[2]
    # the zlib stream goes on across updates
    surface.fill(Rect(1, 1, 2, 2), RED)
    assert request(s, 1)
    (x, y, w, h, e, pixels), = read_update(s, z)
    assert (x, y, w, h, e) == (1, 1, 2, 2, enc.ENC_ZRLE) and pixels == RED * 4
    # ... and across a change of pixel format (same 3-byte CPIXELs, bytes reordered)
    s.receive(b"\x00\x00\x00\x00" + enc.PixelFormat(32, 24, False, True, 255, 255, 255,
                                                       0, 8, 16).pack())
    request(s, 0)
    (_x, _y, w, h, e, pixels), = read_update(s, z)
    assert e == enc.ENC_ZRLE and pixels[60 * 4 + 30 * 130 * 4:][:4] == b"\xff\x00\x00\x00"


def test_scroll_goes_out_as_copyrect():
    w, h = 40, 64
    surface = DisplaySurface(w, h)
    # 64 distinct text-like rows
    rows = [bytes([(i * 7 + x) % 256, i, (x * 3) % 256, 0]) * 1 for i in range(h) for x in range(w)]
    surface.update(0, 0, w, h, [b"".join(rows[i * w:(i + 1) * w]) for i in range(h)])
    s, _ = connect(surface, encodings=[enc.ENC_COPYRECT, enc.ENC_RAW])
    request(s, 0)
    read_update(s)
    # scroll up by 8 rows, new rows at the bottom
    _w, _h, data = surface.snapshot()
    stride = w * 4
    new = data[8 * stride:] + b"\x11\x22\x33\x00" * (w * 8)
    surface.update(0, 0, w, h, [new[i * stride:(i + 1) * stride] for i in range(h)])
    assert request(s, 1)
    rects = read_update(s)
    assert rects[0][:5] == (0, 0, w, h - 8, enc.ENC_COPYRECT) and rects[0][5] == (0, 8)
    assert [r[:5] for r in rects[1:]] == [(0, h - 8, w, 8, enc.ENC_RAW)]


def test_resize_sends_desktop_size():
    surface = DisplaySurface(16, 8)
    s, _ = connect(surface, encodings=[enc.ENC_RAW, enc.ENC_DESKTOP_SIZE])
    request(s, 0)
    read_update(s)
    surface.resize(32, 24)
    assert request(s, 1)
    rects = read_update(s)
    assert rects[0][:5] == (0, 0, 32, 24, enc.ENC_DESKTOP_SIZE)
    assert rects[1][:5] == (0, 0, 32, 24, enc.ENC_RAW)


def test_key_and_pointer_events_reach_the_hooks():
    surface = DisplaySurface(16, 8)
    s, got = connect(surface)
    s.receive(struct.pack(">BBxxI", 4, 1, 0x61) + struct.pack(">BBHH", 5, 1, 3, 4))
    # split across reads
    msg = struct.pack(">BBxxI", 4, 0, 0x61)
    s.receive(msg[:3])
    s.receive(msg[3:])
    assert got["keys"] == [(0x61, True), (0x61, False)] and got["pointer"] == [(3, 4, 1)]


@pytest.mark.parametrize("data", [
    b"\x63",                                                     # unknown message type
    struct.pack(">BxxxI", 6, MAX_CUT_TEXT + 1),                  # oversized cut text
    struct.pack(">Bxxxi", 6, -8),                                # extended clipboard, not offered
    b"\x00\x00\x00\x00" + enc.PixelFormat(24, 24).pack(),        # 24 bpp
    b"\x00\x00\x00\x00" + enc.PixelFormat(8, 8, true_colour=False).pack(),  # colour map
])
def test_hostile_messages_close_the_connection(data):
    surface = DisplaySurface(16, 8)
    s, _ = connect(surface)
    s.receive(data)
    assert s.closed


def test_garbage_version_closes():
    s = RfbSession(DisplaySurface(4, 4), SessionHooks())
    s.receive(b"GET / HTTP/1.1\r\n")
    assert s.closed


def test_cut_text_is_consumed():
    surface = DisplaySurface(16, 8)
    s, got = connect(surface)
    s.receive(struct.pack(">BxxxI", 6, 5) + b"hello" + struct.pack(">BBxxI", 4, 1, 0x62))
    assert not s.closed and got["keys"] == [(0x62, True)]


def test_exclusive_refused_by_hook():
    surface = DisplaySurface(16, 8)
    s = RfbSession(surface, SessionHooks(client_init=lambda shared: None if shared else "no"))
    s.receive(b"RFB 003.008\n\x01\x00")
    assert s.closed == "no"


def test_set_desktop_size_asks_the_adapter_and_answers():
    surface = DisplaySurface(16, 8)
    asked = []
    s, _ = connect(surface, encodings=[enc.ENC_RAW, enc.ENC_EXTENDED_DESKTOP_SIZE],
                   resize=lambda w, h: asked.append((w, h)) or True)
    request(s, 0)
    rects = read_update(s)
    assert rects[0][:5] == (0, 0, 16, 8, enc.ENC_EXTENDED_DESKTOP_SIZE)   # the layout, once
    screen = struct.pack(">IHHHHI", 0, 0, 0, 64, 32, 0)
    s.receive(struct.pack(">BxHHBx", 251, 64, 32, 1) + screen)
    assert asked == [(64, 32)]
    assert request(s, 1)
    rects = read_update(s)
    assert rects[0][:5] == (1, 0, 16, 8, enc.ENC_EXTENDED_DESKTOP_SIZE)   # reply: done
    # the guest follows: the surface changes size, the client is told (reason 0)
    surface.resize(64, 32)
    assert request(s, 1)
    rects = read_update(s)
    assert rects[0][:5] == (0, 0, 64, 32, enc.ENC_EXTENDED_DESKTOP_SIZE)
    # an empty layout is invalid (status 3); no adapter means prohibited (status 1)
    s.receive(struct.pack(">BxHHBx", 251, 64, 32, 0))
    assert request(s, 1) and read_update(s)[0][:2] == (1, 3)
    s.hooks.resize = lambda w, h: False
    s.receive(struct.pack(">BxHHBx", 251, 10, 10, 1) + screen)
    assert request(s, 1) and read_update(s)[0][:2] == (1, 1)


def test_set_desktop_size_without_the_extension_closes():
    surface = DisplaySurface(16, 8)
    s, _ = connect(surface)
    s.receive(struct.pack(">BxHHBx", 251, 64, 32, 0))
    assert s.closed


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=20))
def test_any_bytes_from_a_client_never_raise(chunks):
    surface = DisplaySurface(16, 8)
    s, _ = connect(surface, encodings=[enc.ENC_ZRLE, enc.ENC_COPYRECT,
                                       enc.ENC_EXTENDED_DESKTOP_SIZE])
    for chunk in chunks:
        s.receive(chunk)
        s.update()
    assert len(s._in) <= 8 + MAX_CUT_TEXT


def test_qemu_extended_key_events():
    from kemu.display.console import DisplayConsole
    surface = DisplaySurface(16, 8)
    codes = []
    s, _ = connect(surface, encodings=[enc.ENC_RAW, enc.ENC_QEMU_EXTENDED_KEY_EVENT],
                   scancode=lambda code, down: codes.append((code, down)))
    # before the server says it takes them, the message is unknown: checked below
    assert request(s, 1)                       # the acknowledgement goes out at once
    rects = read_update(s)
    assert rects[0][:5] == (0, 0, 0, 0, enc.ENC_QEMU_EXTENDED_KEY_EVENT)
    s.receive(struct.pack(">BBHII", 255, 0, 1, 0x61, 0x1E) + struct.pack(">BBHII", 255, 0, 0,
                                                                          0xFF52, 0xC8))
    assert codes == [(0x1E, True), (0xC8, False)]
    s.receive(struct.pack(">BBHII", 255, 1, 0, 0, 0))       # audio: not offered
    assert s.closed
    # the console maps the scancodes to Linux key codes, whatever the layout
    console = DisplayConsole()
    sent = []

    class Kbd:
        def key(self, code, down):
            sent.append((code, down))
    console.keyboards.append(Kbd())
    console.scancode_event(0x1E, True)
    console.scancode_event(0xC8, True)
    console.scancode_event(0x7F, True)
    assert sent == [(30, True), (103, True)]
    # a client that was never told gets closed for sending it
    s2, _ = connect(surface)
    s2.receive(struct.pack(">BBHII", 255, 0, 1, 0x61, 0x1E))
    assert s2.closed
