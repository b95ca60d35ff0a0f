"""A TAP interface as a NIC's host side (QEMU's ``-netdev tap,ifname=tap0,script=no``).

The interface is opened through ``/dev/net/tun`` with ``TUNSETIFF`` and
``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`` (Linux Documentation/networking/tuntap.rst):
every frame read or written carries a ``struct virtio_net_hdr`` in front,
set to the 12-byte VIRTIO 1.x layout with ``TUNSETVNETHDRSZ``.  No offloads
are enabled (no ``TUNSETOFFLOAD``), so the kernel hands over whole frames
with their checksums done; the header written is all zeroes, and a read
frame whose header asks for GSO is dropped.  kemu runs no ifup scripts:
the interface is expected to exist or to be creatable (CAP_NET_ADMIN),
and to be configured by the user.

Reads happen on the :class:`~kemu.backends.ioloop.IoLoop` thread (one frame
per ``read``); writes are non-blocking and a frame the kernel cannot take
is dropped, as on a wire.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from collections import deque
from collections.abc import Callable

from kemu.backends.ioloop import EVENT_READ, BackendError, IoLoop

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16

VNET_HDR_SIZE = 12
GSO_NONE = 0
MAX_FRAME = 65535 + 18
#: Frames read per wake-up, at most, before other fds get their turn.
READ_BATCH = 64


class TapError(BackendError):
    """The TAP interface cannot be opened."""


def open_tap(ifname: str, path: str = "/dev/net/tun") -> tuple[int, str]:
    """Open (or create) TAP interface ``ifname``; returns the fd and the kernel's name for it."""
    if len(ifname.encode()) >= IFNAMSIZ:
        raise TapError(f"-netdev tap: interface name {ifname!r} is longer than 15 bytes")
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TapError(f"-netdev tap: cannot open {path}: {e.strerror}") from None
    try:
        ifr = struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        res = fcntl.ioctl(fd, TUNSETIFF, ifr)
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
    except OSError as e:
        os.close(fd)
        hint = (" (needs CAP_NET_ADMIN, or a tap interface created for this user with "
                "'ip tuntap add NAME mode tap user USER vnet_hdr')"
                if e.errno in (errno.EPERM, errno.EACCES) else "")
        raise TapError(f"-netdev tap: cannot attach to {ifname or 'a new tap'}: "
                       f"{e.strerror}{hint}") from None
    name = res[:IFNAMSIZ].split(b"\0", 1)[0].decode()
    return fd, name


class TapBackend:
    """A NIC's host side on a TAP interface (frames with a virtio_net_hdr in front)."""

    def __init__(self, loop: IoLoop, ifname: str = "", name: str = "tap",
                 device_path: str = "/dev/net/tun", fd: int | None = None) -> None:
        self.loop = loop
        self.name = name
        if fd is None:
            self.fd, self.ifname = open_tap(ifname, device_path)
        else:                     # an already configured fd (tests, fd passing)
            self.fd, self.ifname = fd, ifname
            os.set_blocking(fd, False)
        self._receive: Callable[[bytes], bool] | None = None
        self._held: deque[bytes] = deque()
        self._paused = False
        self._closed = False
        self.dropped = 0
        self._zero_hdr = bytes(VNET_HDR_SIZE)

    # -- NetBackend ---------------------------------------------------------------------------
    def connect(self, receive: Callable[[bytes], bool]) -> None:
        self._receive = receive
        self.loop.watch(self.fd, EVENT_READ, self._on_readable)
        self.loop.start()

    def send(self, frame: bytes) -> None:
        if self._closed:
            return
        try:
            os.writev(self.fd, (self._zero_hdr, frame))
        except (BlockingIOError, InterruptedError):
            self.dropped += 1
        except OSError as exc:
            # EIO: the interface is down; the frame is lost, as on an unplugged cable.
            if exc.errno != errno.EIO:
                log.warning("%s: write failed: %s", self.name, exc)
            self.dropped += 1

    def resume(self) -> None:
        self.loop.call_soon(self._resume)

    # -- loop thread ----------------------------------------------------------------------------
    def _on_readable(self, _mask: int) -> None:
        frames: list[bytes] = []
        for _ in range(READ_BATCH):
            try:
                data = os.read(self.fd, VNET_HDR_SIZE + MAX_FRAME)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.warning("%s: read failed: %s", self.name, exc)
                break
            if len(data) <= VNET_HDR_SIZE:
                continue
            if data[1] != GSO_NONE:          # gso_type: offloads were never enabled
                self.dropped += 1
                continue
            frames.append(data[VNET_HDR_SIZE:])
        if frames:
            self._held.extend(frames)
            self._deliver()

    def _deliver(self) -> None:
        with self.loop.lock:
            while self._held and not self._paused:
                frame = self._held.popleft()
                if self._receive is not None and not self._receive(frame):
                    self._paused = True
        if self._paused:
            self.loop.unwatch(self.fd)

    def _resume(self) -> None:
        if not self._paused or self._closed:
            return
        self._paused = False
        self._deliver()
        if not self._paused:
            self.loop.watch(self.fd, EVENT_READ, self._on_readable)

    # -- teardown -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Nothing to flush (part of the board's backend list protocol)."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        fd = self.fd

        def shut() -> None:
            self.loop.unwatch(fd)
            os.close(fd)
        self.loop.call_soon(shut)
