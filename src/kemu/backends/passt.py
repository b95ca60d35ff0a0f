"""User-mode networking through ``passt`` (https://passt.top), QEMU's ``-netdev user``.

kemu starts its own ``passt`` and stops it with the machine.  Rather than
a UNIX socket path that passt listens on (``--socket PATH``), kemu hands
passt one end of a private socket pair (``--fd``, the same stream
protocol), so no file is left behind and passt quits as soon as kemu's end
closes, even when kemu is killed::

    passt --foreground --quiet --fd FD -a 10.0.2.15 -n 24 -g 10.0.2.2 -D 10.0.2.3 \\
          --dns-forward 10.0.2.3 [-t [ADDR/]HOSTPORT:GUESTPORT ...] [-t none] [-u none]

passt answers DHCP, ARP, NDP and DNS itself.  kemu gives the guest QEMU's
user-mode network (:data:`QEMU_USER_NET`): address 10.0.2.15/24, gateway
10.0.2.2, which passt maps to the host's loopback (so a guest reaches a
server on the host's 127.0.0.1 at 10.0.2.2, as under QEMU; passt's default
without ``--no-map-gw``), and DNS at 10.0.2.3, forwarded to the host's
resolver.

QEMU's ``hostfwd=tcp:[ADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT`` becomes passt's
``-t [ADDR/]HOSTPORT:GUESTPORT`` (``-u`` for udp); the guest address is
implied, passt's guest has one.

The wire protocol is QEMU's stream netdev (:class:`StreamBackend`): each
Ethernet frame is prefixed by its length as a 4-byte big-endian integer.  Frames are read on the
:class:`~kemu.backends.ioloop.IoLoop` thread and handed to the device with
the machine lock held; frames sent by the device are written at once or
buffered (up to :data:`OUT_LIMIT` bytes, then dropped as a wire would).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass

from kemu.backends.ioloop import EVENT_READ, EVENT_WRITE, BackendError, IoLoop
from kemu.errors import ConfigError

log = logging.getLogger(__name__)

#: Longest frame accepted from passt (a 65535-byte MTU and headers), bytes.
MAX_FRAME = 65535 + 18
#: Bytes of frames buffered towards passt before frames are dropped.
OUT_LIMIT = 4 << 20
READ_CHUNK = 256 << 10
#: How long passt gets to refuse its options before kemu goes on, seconds.
STARTUP_CHECK = 0.1


class PasstError(BackendError):
    """passt is missing or failed to start."""


@dataclass(frozen=True)
class HostForward:
    """One ``hostfwd=``: connections to the host's ``host_port`` go to the guest's ``guest_port``."""

    proto: str            # "tcp" or "udp"
    host_addr: str        # "" for every address
    host_port: int
    guest_port: int

    def passt_args(self) -> list[str]:
        addr = f"{self.host_addr}/" if self.host_addr else ""
        return ["-t" if self.proto == "tcp" else "-u", f"{addr}{self.host_port}:{self.guest_port}"]


def parse_hostfwd(text: str) -> HostForward:
    """QEMU's ``[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport``."""
    bad = ConfigError(f"hostfwd={text}: expected [tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT")
    try:
        host, guest = text.split("-", 1)
        proto, host_addr, host_port = host.split(":")
        _guest_addr, guest_port = guest.rsplit(":", 1)
        proto = proto or "tcp"
        hp, gp = int(host_port), int(guest_port)
    except ValueError:
        raise bad from None
    if proto not in ("tcp", "udp") or not (1 <= hp <= 65535 and 1 <= gp <= 65535):
        raise bad
    return HostForward(proto, host_addr, hp, gp)


def find_passt() -> str:
    exe = shutil.which("passt")
    if exe is None:
        raise PasstError("user-mode networking needs passt, which is not installed "
                         "(Debian/Ubuntu: apt-get install passt)")
    return exe


class StreamBackend:
    """A NIC's host side on a stream socket speaking QEMU's stream netdev protocol."""

    def __init__(self, loop: IoLoop, sock: socket.socket, name: str = "stream") -> None:
        self.loop = loop
        self.name = name
        self.sock = sock
        self._receive: Callable[[bytes], bool] | None = None
        self._inbuf = bytearray()
        self._out = bytearray()
        self._out_lock = threading.Lock()
        self._paused = False
        self._closed = False
        self._writing = False
        #: Frames dropped because the peer did not keep up.
        self.dropped = 0
        sock.setblocking(False)

    def _peer_message(self) -> str:
        """Why the peer went away, if it can say (passt's log)."""
        return ""

    # -- NetBackend ---------------------------------------------------------------------------
    def connect(self, receive: Callable[[bytes], bool]) -> None:
        self._receive = receive
        self.loop.watch(self.sock.fileno(), EVENT_READ, self._on_ready)
        self.loop.start()

    def send(self, frame: bytes) -> None:
        if self._closed:
            return
        record = len(frame).to_bytes(4, "big") + frame
        with self._out_lock:
            if not self._out:
                try:
                    n = self.sock.send(record)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError as exc:
                    log.warning("%s: send failed: %s", self.name, exc)
                    return
                if n == len(record):
                    return
                record = record[n:]
            elif len(self._out) + len(record) > OUT_LIMIT:
                self.dropped += 1
                return
            self._out += record
            start = not self._writing
            self._writing = True
        if start:
            self.loop.call_soon(self._update_watch)

    def resume(self) -> None:
        self.loop.call_soon(self._resume)

    # -- loop thread ----------------------------------------------------------------------------
    def _update_watch(self) -> None:
        if self._closed:
            return
        events = 0 if self._paused else EVENT_READ
        if self._writing:
            events |= EVENT_WRITE
        if events:
            self.loop.watch(self.sock.fileno(), events, self._on_ready)
        else:
            self.loop.unwatch(self.sock.fileno())

    def _on_ready(self, mask: int) -> None:
        if mask & EVENT_WRITE:
            self._flush()
        if mask & EVENT_READ and not self._paused:
            self._read()

    def _flush(self) -> None:
        with self._out_lock:
            try:
                n = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("%s: send failed: %s", self.name, exc)
                self._out.clear()
                n = 0
            del self._out[:n]
            if self._out:
                return
            self._writing = False
        self._update_watch()

    def _read(self) -> None:
        try:
            data = self.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            data = b""
            log.warning("%s: receive failed: %s", self.name, exc)
        if not data:
            self._hang_up()
            return
        self._inbuf += data
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand every complete frame to the device, under the machine lock, in one go."""
        buf = self._inbuf
        pos = 0
        receive = self._receive
        with self.loop.lock:
            while len(buf) - pos >= 4:
                n = int.from_bytes(buf[pos:pos + 4], "big")
                if n > MAX_FRAME:
                    log.error("%s: peer sent a frame of %d bytes; disconnecting", self.name, n)
                    buf.clear()
                    self._hang_up()
                    return
                if len(buf) - pos - 4 < n:
                    break
                frame = bytes(buf[pos + 4:pos + 4 + n])
                pos += 4 + n
                if receive is not None and not receive(frame):
                    self._paused = True
                    break
        del buf[:pos]
        if self._paused:
            self._update_watch()

    def _resume(self) -> None:
        if not self._paused or self._closed:
            return
        self._paused = False
        self._dispatch()
        if not self._paused:
            self._update_watch()

    def _hang_up(self) -> None:
        if not self._closed:
            log.warning("%s: the peer closed the connection (%s)", self.name,
                        self._peer_message() or "no message")
            self.loop.unwatch(self.sock.fileno())
            self._paused = True

    # -- teardown -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Nothing to flush to disk (part of the board's backend list protocol)."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        fd = self.sock.fileno()
        self.loop.unwatch(fd)
        if not self.loop.in_loop:
            done = threading.Event()
            self.loop.call_soon(done.set)
            done.wait(2)
        self.sock.close()


#: QEMU's ``-netdev user`` addresses (guest, prefix, host/gateway, DNS) as passt options.
QEMU_USER_NET = ["-a", "10.0.2.15", "-n", "24", "-g", "10.0.2.2", "-D", "10.0.2.3",
                 "--dns-forward", "10.0.2.3"]


class PasstBackend(StreamBackend):
    """A NIC's host side: a ``passt`` process kemu owns, on a private socket pair."""

    def __init__(self, loop: IoLoop, forwards: list[HostForward] = (),
                 name: str = "passt", extra_args: list[str] = ()) -> None:
        exe = find_passt()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._log = tempfile.TemporaryFile(prefix="kemu-passt-")  # noqa: SIM115 (lives with passt)
        args = [exe, "--foreground", "--quiet", "--fd", str(theirs.fileno()), *QEMU_USER_NET]
        for fwd in forwards:
            args += fwd.passt_args()
        for proto, flag in (("tcp", "-t"), ("udp", "-u")):
            if not any(f.proto == proto for f in forwards):
                args += [flag, "none"]
        args += list(extra_args)
        self.args = args
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=self._log, pass_fds=[theirs.fileno()],
                                         start_new_session=True)
        except OSError as e:
            ours.close()
            self._log.close()
            raise PasstError(f"cannot run passt: {e.strerror}") from None
        finally:
            theirs.close()
        try:
            status = self.proc.wait(STARTUP_CHECK)
        except subprocess.TimeoutExpired:
            status = None
        if status is not None:
            why = self._log_tail()
            ours.close()
            self._log.close()
            raise PasstError(f"passt exited with status {status}" + (f": {why}" if why else ""))
        super().__init__(loop, ours, name)

    def _peer_message(self) -> str:
        return self._log_tail()

    def _log_tail(self) -> str:
        try:
            self._log.seek(0)
            text = self._log.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""
        lines = [line.strip() for line in text.splitlines()
                 if line.strip() and "syslog" not in line and "run as root" not in line]
        return lines[-1] if lines else ""

    def close(self) -> None:
        if self._closed:
            return
        super().close()       # passt quits when its --fd socket hangs up
        self._stop_process()
        self._log.close()

    def _stop_process(self) -> None:
        try:
            self.proc.wait(1)
            return
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except OSError:
            self.proc.terminate()
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
