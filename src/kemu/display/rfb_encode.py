"""RFB pixel formats and rectangle encodings (RFC 6143 7.4, 7.7).

The surface holds XRGB8888 pixels (B, G, R, X bytes).  :class:`PixelFormat`
is a client's SetPixelFormat; :meth:`PixelFormat.convert` turns surface
bytes into the client's pixels: byte-aligned 32-bit true-colour formats by
byte shuffling, anything else (16 and 8 bits per pixel, colour maps are
refused) pixel by pixel through a cache.

Encodings: Raw (0), CopyRect (1), ZRLE (16; tiles of 64x64, solid or raw
subencoding, one zlib stream per connection as 7.7.6 requires).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

ENC_RAW = 0
ENC_COPYRECT = 1
ENC_ZRLE = 16
ENC_DESKTOP_SIZE = -223
ENC_EXTENDED_DESKTOP_SIZE = -308
ENC_QEMU_EXTENDED_KEY_EVENT = -258

RECT_HEADER = struct.Struct(">HHHHi")
PIXEL_FORMAT = struct.Struct(">BBBBHHHBBB3x")
ZRLE_TILE = 64


class PixelFormatError(ValueError):
    """A SetPixelFormat kemu cannot serve (colour maps, odd sizes)."""


@dataclass(frozen=True)
class PixelFormat:
    bpp: int = 32
    depth: int = 24
    big_endian: bool = False
    true_colour: bool = True
    red_max: int = 255
    green_max: int = 255
    blue_max: int = 255
    red_shift: int = 16
    green_shift: int = 8
    blue_shift: int = 0

    @classmethod
    def unpack(cls, data: bytes) -> PixelFormat:
        bpp, depth, be, tc, rm, gm, bm, rs, gs, bs = PIXEL_FORMAT.unpack(data)
        pf = cls(bpp, depth, bool(be), bool(tc), rm, gm, bm, rs, gs, bs)
        if bpp not in (8, 16, 32):
            raise PixelFormatError(f"{bpp} bits per pixel")
        if not tc:
            raise PixelFormatError("colour-map pixel formats are not supported")
        for m, s in ((rm, rs), (gm, gs), (bm, bs)):
            if m == 0 or m & (m + 1) or s >= bpp or m << s >= 1 << bpp:
                raise PixelFormatError(f"colour max {m} shift {s} do not fit {bpp} bits")
        return pf

    def pack(self) -> bytes:
        return PIXEL_FORMAT.pack(self.bpp, self.depth, self.big_endian, self.true_colour,
                                 self.red_max, self.green_max, self.blue_max,
                                 self.red_shift, self.green_shift, self.blue_shift)

    @property
    def bytes_per_pixel(self) -> int:
        return self.bpp // 8

    def _byte_positions(self) -> tuple[int, int, int] | None:
        """Where R, G, B sit in a 32-bit pixel's bytes, when they are whole bytes."""
        if self.bpp != 32 or (self.red_max, self.green_max, self.blue_max) != (255, 255, 255):
            return None
        shifts = (self.red_shift, self.green_shift, self.blue_shift)
        if any(s % 8 for s in shifts):
            return None
        return tuple((3 - s // 8) if self.big_endian else s // 8 for s in shifts)

    def convert(self, xrgb: bytes | bytearray | memoryview) -> bytes:
        """Surface pixels to this format's pixels."""
        pos = self._byte_positions()
        if pos == (2, 1, 0):
            return bytes(xrgb)
        n = len(xrgb) // 4
        if pos is not None:
            out = bytearray(n * 4)
            out[pos[0]::4] = xrgb[2::4]
            out[pos[1]::4] = xrgb[1::4]
            out[pos[2]::4] = xrgb[0::4]
            return bytes(out)
        return self._convert_slow(bytes(xrgb))

    def _convert_slow(self, xrgb: bytes) -> bytes:
        size = self.bytes_per_pixel
        order = "big" if self.big_endian else "little"
        cache: dict[bytes, bytes] = {}
        out = bytearray()
        for i in range(0, len(xrgb), 4):
            px = xrgb[i:i + 4]
            enc = cache.get(px)
            if enc is None:
                b, g, r = px[0], px[1], px[2]
                value = ((r * self.red_max // 255) << self.red_shift
                         | (g * self.green_max // 255) << self.green_shift
                         | (b * self.blue_max // 255) << self.blue_shift)
                enc = cache[px] = value.to_bytes(size, order)
            out += enc
        return bytes(out)

    def cpixel_slice(self) -> slice | None:
        """For ZRLE: the 3 bytes of a 32-bit pixel that hold its colour (7.7.6 CPIXEL)."""
        if self.bpp != 32 or self.depth > 24:
            return None
        top = max((m.bit_length() + s) for m, s in ((self.red_max, self.red_shift),
                                                     (self.green_max, self.green_shift),
                                                     (self.blue_max, self.blue_shift)))
        low = min((self.red_shift, self.green_shift, self.blue_shift))
        if top <= 24:         # the least significant 3 bytes
            return slice(1, 4) if self.big_endian else slice(0, 3)
        if low >= 8:          # the most significant 3 bytes
            return slice(0, 3) if self.big_endian else slice(1, 4)
        return None


def raw_rect(x: int, y: int, w: int, h: int, pixels: bytes) -> bytes:
    return RECT_HEADER.pack(x, y, w, h, ENC_RAW) + pixels


def copy_rect(x: int, y: int, w: int, h: int, src_x: int, src_y: int) -> bytes:
    return RECT_HEADER.pack(x, y, w, h, ENC_COPYRECT) + struct.pack(">HH", src_x, src_y)


def _compact(pixels: bytes, bpp_bytes: int, cslice: slice | None) -> bytes:
    """Pixels as CPIXELs."""
    if cslice is None:
        return pixels
    out = bytearray(len(pixels) // 4 * 3)
    a = cslice.start
    out[0::3] = pixels[a::4]
    out[1::3] = pixels[a + 1::4]
    out[2::3] = pixels[a + 2::4]
    return bytes(out)


class ZrleEncoder:
    """ZRLE (7.7.6) with one zlib stream for the whole connection."""

    def __init__(self, level: int = 6) -> None:
        self._z = zlib.compressobj(level)

    def rect(self, x: int, y: int, w: int, h: int, pixels: bytes, pf: PixelFormat) -> bytes:
        """``pixels``: the rectangle's pixels in ``pf``, row by row."""
        bpp = pf.bytes_per_pixel
        cslice = pf.cpixel_slice()
        stride = w * bpp
        out = bytearray()
        for ty in range(0, h, ZRLE_TILE):
            th = min(ZRLE_TILE, h - ty)
            for tx in range(0, w, ZRLE_TILE):
                tw = min(ZRLE_TILE, w - tx)
                span = tw * bpp
                rows = [pixels[(ty + r) * stride + tx * bpp:(ty + r) * stride + tx * bpp + span]
                        for r in range(th)]
                first = rows[0][:bpp]
                solid_row = first * tw
                if all(row == solid_row for row in rows):
                    out.append(1)
                    out += _compact(first, bpp, cslice)
                else:
                    out.append(0)
                    out += _compact(b"".join(rows), bpp, cslice)
        data = self._z.compress(bytes(out)) + self._z.flush(zlib.Z_SYNC_FLUSH)
        return RECT_HEADER.pack(x, y, w, h, ENC_ZRLE) + struct.pack(">I", len(data)) + data


def desktop_size_rect(width: int, height: int) -> bytes:
    return RECT_HEADER.pack(0, 0, width, height, ENC_DESKTOP_SIZE)


def extended_desktop_size_rect(width: int, height: int, reason: int = 0, status: int = 0) -> bytes:
    """ExtendedDesktopSize (RFB community extension): one screen covering the desktop;
    ``reason`` 0 for a server-side change, 1 for the answer to the client's request,
    ``status`` 0 (done), 1 (prohibited) or 3 (invalid layout)."""
    return (RECT_HEADER.pack(reason, status, width, height, ENC_EXTENDED_DESKTOP_SIZE)
            + struct.pack(">B3xIHHHHI", 1, 0, 0, 0, width, height, 0))
