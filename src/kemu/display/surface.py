"""The display surface: what the guest's graphics adapter shows, for the host side to read.

A :class:`DisplaySurface` is one framebuffer of 32-bit pixels laid out as
QEMU's and Linux's ``XRGB8888`` (bytes B, G, R, X in memory) and the
rectangles that changed since each reader last looked.  The graphics
adapter (:mod:`kemu.devices.virtio.gpu`) writes it from the vCPU thread;
readers (the VNC server on the I/O thread, QMP ``screendump``, the API's
``screenshot``) take a consistent copy under :attr:`DisplaySurface.lock`.

Each reader subscribes a :class:`DirtyTracker`: the surface adds every
changed rectangle to every tracker, and wakes it through its callback, so a
reader sends only what changed since it last took its rectangles
(``take()``).  A change of size sets the tracker's ``resized`` flag.

The display side can ask the guest for another size (:meth:`request_size`,
a VNC client's SetDesktopSize, an API call): the adapter registers a
handler (:attr:`on_size_request`) that tells the guest's driver (virtio-gpu:
the display-change configuration event).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

BYTES_PER_PIXEL = 4
#: Bounds of a surface (kemu's, the same bound the graphics adapter puts on a scanout).
MAX_WIDTH = MAX_HEIGHT = 16384
#: Rectangles kept per tracker before they are merged into their bounding box.
MAX_RECTS = 64


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    w: int
    h: int

    @property
    def empty(self) -> bool:
        return self.w <= 0 or self.h <= 0

    def intersect(self, other: Rect) -> Rect:
        x0, y0 = max(self.x, other.x), max(self.y, other.y)
        x1 = min(self.x + self.w, other.x + other.w)
        y1 = min(self.y + self.h, other.y + other.h)
        return Rect(x0, y0, max(0, x1 - x0), max(0, y1 - y0))

    def union(self, other: Rect) -> Rect:
        x0, y0 = min(self.x, other.x), min(self.y, other.y)
        x1 = max(self.x + self.w, other.x + other.w)
        y1 = max(self.y + self.h, other.y + other.h)
        return Rect(x0, y0, x1 - x0, y1 - y0)


class DirtyTracker:
    """What changed on a surface since its reader last called :meth:`take`."""

    def __init__(self, surface: DisplaySurface, wake: Callable[[], None]) -> None:
        self.surface = surface
        self.wake = wake
        self.rects: list[Rect] = []
        self.resized = False

    def add(self, rect: Rect) -> None:
        if any(old.intersect(rect) == rect for old in self.rects):
            return                    # already inside a dirty rectangle
        self.rects.append(rect)
        if len(self.rects) > MAX_RECTS:
            box = self.rects[0]
            for r in self.rects[1:]:
                box = box.union(r)
            self.rects = [box]

    def take(self) -> tuple[bool, list[Rect]]:
        """(resized, rectangles) since the last call; call under the surface's lock."""
        resized, rects = self.resized, self.rects
        self.resized, self.rects = False, []
        return resized, rects

    def close(self) -> None:
        self.surface.unsubscribe(self)


class DisplaySurface:
    """A framebuffer of ``width`` x ``height`` XRGB8888 pixels (starts black)."""

    def __init__(self, width: int = 1280, height: int = 800) -> None:
        self.lock = threading.RLock()
        self.width = self.height = 0
        self.data = bytearray()
        self._trackers: list[DirtyTracker] = []
        #: Counts every change (a reader can tell whether anything happened).
        self.serial = 0
        #: Set by the graphics adapter: ``handler(width, height)`` asks the guest to resize.
        self.on_size_request: Callable[[int, int], None] | None = None
        self.resize(width, height)

    @property
    def stride(self) -> int:
        return self.width * BYTES_PER_PIXEL

    def subscribe(self, wake: Callable[[], None] = lambda: None) -> DirtyTracker:
        """A new reader: its tracker starts with the whole surface dirty."""
        with self.lock:
            tracker = DirtyTracker(self, wake)
            tracker.add(Rect(0, 0, self.width, self.height))
            self._trackers.append(tracker)
            return tracker

    def unsubscribe(self, tracker: DirtyTracker) -> None:
        with self.lock:
            if tracker in self._trackers:
                self._trackers.remove(tracker)

    def resize(self, width: int, height: int) -> None:
        """A new size (the guest set another mode): contents become black."""
        if not (1 <= width <= MAX_WIDTH and 1 <= height <= MAX_HEIGHT):
            raise ValueError(f"display size {width}x{height} out of range")
        with self.lock:
            if (width, height) == (self.width, self.height):
                return
            self.width, self.height = width, height
            self.data = bytearray(width * height * BYTES_PER_PIXEL)
            self.serial += 1
            for t in self._trackers:
                t.resized = True
                t.rects = [Rect(0, 0, width, height)]
            trackers = list(self._trackers)
        for t in trackers:
            t.wake()

    def update(self, x: int, y: int, w: int, h: int, rows) -> None:
        """Copy ``h`` rows (an iterable of ``w * 4``-byte rows) to ``(x, y)``, mark dirty.

        The caller has clipped the rectangle to the surface.
        """
        rect = Rect(x, y, w, h)
        if rect.empty:
            return
        with self.lock:
            if rect.intersect(Rect(0, 0, self.width, self.height)) != rect:
                raise ValueError(f"update {rect} outside a {self.width}x{self.height} surface")
            stride, span = self.stride, w * BYTES_PER_PIXEL
            off = y * stride + x * BYTES_PER_PIXEL
            data = self.data
            for row in rows:
                data[off:off + span] = row
                off += stride
            self.serial += 1
            for t in self._trackers:
                t.add(rect)
            trackers = list(self._trackers)
        for t in trackers:
            t.wake()

    def fill(self, rect: Rect, pixel: bytes = b"\0\0\0\0") -> None:
        rect = rect.intersect(Rect(0, 0, self.width, self.height))
        self.update(rect.x, rect.y, rect.w, rect.h, [pixel * rect.w] * rect.h)

    def request_size(self, width: int, height: int) -> bool:
        """Ask the guest for another size; False when no adapter can."""
        handler = self.on_size_request
        if handler is None or not (1 <= width <= MAX_WIDTH and 1 <= height <= MAX_HEIGHT):
            return False
        handler(width, height)
        return True

    def snapshot(self) -> tuple[int, int, bytes]:
        """A consistent copy: (width, height, XRGB8888 bytes)."""
        with self.lock:
            return self.width, self.height, bytes(self.data)

    def to_rgb(self) -> tuple[int, int, bytes]:
        """(width, height, packed 24-bit RGB bytes), as PPM and PNG want them."""
        width, height, data = self.snapshot()
        rgb = bytearray(width * height * 3)
        rgb[0::3] = data[2::4]
        rgb[1::3] = data[1::4]
        rgb[2::3] = data[0::4]
        return width, height, bytes(rgb)
