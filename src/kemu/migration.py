"""Live migration in QEMU's spelling: ``migrate``, ``-incoming``, ``query-migrate``...

The source sends RAM while the guest runs, then what the guest dirtied
meanwhile, pass after pass, until what is left can go within the downtime
limit at the bandwidth seen; then it pauses the guest, sends the last pages
and the machine's state (:mod:`kemu.state`), and ends paused in
``postmigrate``.  The destination, started with the same configuration and
``-incoming URI`` (or ``defer`` and ``migrate-incoming``), checks the
stream's header against its own machine, writes the pages into its RAM and
starts from the state.  A cancelled or failed migration leaves the source
running.

Disks are on shared storage (no block migration): the destination's are opened
inactive (:mod:`kemu.backends.block`); the source inactivates its own (flush,
write locks dropped) once its guest is paused for the last pass, the
destination activates them (locks taken, metadata read again) before its guest
runs, and a source whose migration fails after that takes them back.

Write tracking is the board's when it has a dirty log (``start_dirty_log``,
``dirty_pages``, ``stop_dirty_log``: the microvm board on KVM, with
KVM_GET_DIRTY_LOG for the vCPUs' writes and the VMM's own record of its
devices' writes): each pass sends the pages written since the one before.
Otherwise (TCG) the source keeps a shadow copy of what it sent and
compares guest RAM with it (64 KiB blocks, then 4 KiB pages: memcmp speed).
Every byte the guest changed since it was sent is found, with no hook on the
guest's stores (a store hook would cost every store a callback; the engine's
code-page tracking marks only pages holding translated code), at the price
of a second copy of RAM on the source while it migrates.

The wire format is kemu's own (QEMU's is not spoken): the
:mod:`kemu.state` stream header (machine fingerprint, RAM size and regions),
then records ``P`` (RAM offset, length, data, CRC-32: RAM offsets are the
regions end to end, :class:`kemu.memory.GuestMemory`), ``E`` (end of a
pass), ``S`` (the machine state, a checked stream) and ``D`` (done).

URIs: ``unix:PATH``, ``tcp:HOST:PORT``, ``exec:CMD`` (the stream through a
shell command's stdin / stdout), ``fd:NAME`` (a descriptor passed with
``getfd``; on ``-incoming``, a number).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import socket
import struct
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

from kemu import state as st
from kemu.errors import KemuError
from kemu.state import StateError

log = logging.getLogger(__name__)

BLOCK = 64 << 10
PAGE = 4096
_REC = struct.Struct("<cQI")          # kind, offset, length
_CRC = struct.Struct("<I")
_ZERO = bytes(BLOCK)
SEND_BATCH = 1 << 20
CHECKSUM_CHUNK = 1 << 20
#: A bound on the machine state record (a few tens of KiB in practice).
MAX_STATE = 64 << 20
#: The destination's answer over a socket once it runs the machine.
ACK = b"K"
#: Passes after which the guest is stopped whatever is left (it dirties faster than we send).
MAX_PASSES = 30
#: QEMU 7.2's defaults: max-bandwidth 128 MiB/s, downtime-limit 300 ms.
DEFAULT_BANDWIDTH = 128 << 20
DEFAULT_DOWNTIME_MS = 300

#: Capabilities kemu honours (QEMU's names; x-checksum is kemu's: a SHA-256 of
#: guest RAM at the switch (:func:`ram_checksum`), in query-migrate, on both sides).
CAPABILITIES = ("events", "x-checksum")


class MigrationError(KemuError):
    """A migration that cannot start or go on."""


# -- URIs and channels ---------------------------------------------------------------------------
def parse_uri(uri: str) -> tuple[str, str]:
    kind, sep, rest = uri.partition(":")
    if not sep or kind not in ("unix", "tcp", "exec", "fd") or not rest:
        raise MigrationError(f"unknown migration protocol: {uri}")
    return kind, rest


def _tcp_address(rest: str) -> tuple[str, int]:
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise MigrationError(f"tcp:{rest}: expected tcp:HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class _Channel:
    """A byte stream both ways: a socket, or a pipe of a command."""

    def __init__(self, sock: socket.socket | None = None, proc: subprocess.Popen | None = None,
                 fd: int | None = None, writing: bool = True) -> None:
        self.sock, self.proc = sock, proc
        if sock is not None:
            self._w = self._r = None
        elif proc is not None:
            self._w, self._r = proc.stdin, proc.stdout
        else:
            self._w = os.fdopen(fd, "wb", buffering=0) if writing else None
            self._r = os.fdopen(fd, "rb", buffering=0) if not writing else None

    def send(self, data) -> None:
        if self.sock is not None:
            self.sock.sendall(data)
            return
        view = memoryview(data)
        while view:
            n = self._w.write(view)
            view = view[n or 0:]

    def recv_exact(self, n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            if self.sock is not None:
                part = self.sock.recv(min(n - got, 1 << 20))
            else:
                part = self._r.read(n - got)
            if not part:
                raise StateError("migration stream: truncated (the source went away)")
            chunks.append(part)
            got += len(part)
        return b"".join(chunks)

    def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` from the stream (no copy through a bytes object)."""
        got, n = 0, len(view)
        while got < n:
            if self.sock is not None:
                part = self.sock.recv_into(view[got:])
            else:
                part = self._r.readinto(view[got:])
            if not part:
                raise StateError("migration stream: truncated (the source went away)")
            got += part

    def read(self, n: int) -> bytes:        # for kemu.state's readers
        try:
            return self.recv_exact(n)
        except StateError:
            return b""

    def close(self) -> None:
        for f in (self._w, self._r):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def connect(uri: str, fds: dict[str, int]) -> _Channel:
    kind, rest = parse_uri(uri)
    try:
        if kind == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(rest)
            return _Channel(sock=s)
        if kind == "tcp":
            return _Channel(sock=socket.create_connection(_tcp_address(rest), timeout=30))
        if kind == "exec":
            return _Channel(proc=subprocess.Popen(["/bin/sh", "-c", rest], stdin=subprocess.PIPE))
    except OSError as e:
        raise MigrationError(f"Failed to connect to '{rest}': {e.strerror or e}") from None
    if rest not in fds:
        raise MigrationError(f"File descriptor named '{rest}' has not been found")
    fd = fds.pop(rest)
    try:
        return _Channel(sock=socket.socket(fileno=fd))
    except OSError:
        return _Channel(fd=fd, writing=True)


class Listener:
    """``-incoming URI``: where the destination waits for its one source."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.kind, self.rest = parse_uri(uri)
        self._sock: socket.socket | None = None
        self._path: str | None = None
        try:
            if self.kind == "unix":
                from kemu.backends.unix_socket import listen_unix
                self._sock, self._owned = listen_unix(self.rest, f"-incoming {uri}")
            elif self.kind == "tcp":
                host, port = _tcp_address(self.rest)
                self._sock = socket.create_server((host, port), reuse_port=False)
        except OSError as e:
            raise MigrationError(f"-incoming {uri}: cannot listen: {e.strerror or e}") from None

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1] if self.kind == "tcp" else 0

    def accept(self) -> _Channel:
        if self.kind in ("unix", "tcp"):
            conn, _ = self._sock.accept()
            self.close()
            return _Channel(sock=conn)
        if self.kind == "exec":
            return _Channel(proc=subprocess.Popen(["/bin/sh", "-c", self.rest],
                                                  stdin=subprocess.DEVNULL,
                                                  stdout=subprocess.PIPE))
        try:
            fd = int(self.rest)
        except ValueError:
            raise MigrationError(f"-incoming fd:{self.rest}: expected a file descriptor "
                                 "number") from None
        try:
            return _Channel(sock=socket.socket(fileno=fd))
        except OSError:
            return _Channel(fd=fd, writing=False)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            owned = getattr(self, "_owned", None)
            if owned is not None:
                owned.remove()


# -- state shared by both ends ---------------------------------------------------------------------
@dataclass
class MigrationInfo:
    """What query-migrate reports (QEMU's MigrationInfo)."""

    status: str = "none"
    started: float = 0.0
    total_ms: int = 0
    setup_ms: int = 0
    downtime_ms: int | None = None
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    duplicate: int = 0
    normal: int = 0
    passes: int = 0
    error: str | None = None
    checksum: str | None = None

    def qmp(self) -> dict:
        if self.status == "none":
            return {}
        out: dict[str, Any] = {"status": self.status}
        elapsed = self.total_ms if self.status in ("completed", "failed", "cancelled") else \
            int((time.monotonic() - self.started) * 1000)
        out["total-time"] = elapsed
        out["setup-time"] = self.setup_ms
        if self.downtime_ms is not None:
            out["downtime"] = self.downtime_ms
        secs = max(elapsed / 1000, 1e-3)
        out["ram"] = {"transferred": self.transferred, "remaining": self.remaining,
                      "total": self.total, "duplicate": self.duplicate,
                      "normal": self.normal, "normal-bytes": self.normal * PAGE,
                      "dirty-sync-count": self.passes, "page-size": PAGE,
                      "mbps": round(self.transferred * 8 / secs / 1e6, 3),
                      "pages-per-second": int(self.normal / secs)}
        if self.error:
            out["error-desc"] = self.error
        if self.checksum:
            out["x-ram-sha256"] = self.checksum
        return out


@dataclass
class MigrationSettings:
    capabilities: dict[str, bool] = field(default_factory=lambda: {c: False for c in CAPABILITIES})
    downtime_limit_ms: int = DEFAULT_DOWNTIME_MS
    max_bandwidth: int = DEFAULT_BANDWIDTH


def ram_checksum(memory) -> str:
    """x-checksum: SHA-256 over guest RAM by RAM offset, MiB by MiB, each a tag byte
    then, unless it is all zeros, its bytes (zero MiBs of a large, mostly empty
    machine cost a page-table look-up, not a hash)."""
    h = hashlib.sha256()
    size = memory.size
    for off in range(0, size, CHECKSUM_CHUNK):
        n = min(CHECKSUM_CHUNK, size - off)
        if memory.ram_is_zero(off, n):
            h.update(b"Z")
        else:
            h.update(b"D")
            h.update(memory.ram_read(off, n))
    return h.hexdigest()


# -- the source ----------------------------------------------------------------------------------
class Outgoing:
    """One outgoing migration, on its own thread."""

    def __init__(self, vm, channel: _Channel, settings: MigrationSettings,
                 emit: Callable[[str, dict], None]) -> None:
        self.vm = vm
        self.board = vm._board
        self.channel = channel
        self.settings = settings
        self.info = MigrationInfo(status="setup", started=time.monotonic())
        self._emit = emit
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._main, name="migration", daemon=True)
        #: guest RAM; pages go by RAM offset (the regions end to end)
        self.memory = memory = self.board.memory
        self.info.total = memory.size
        self._window = (time.monotonic(), 0)
        self._out = bytearray()
        self._ever_sent = bytearray((memory.size + BLOCK - 1) // BLOCK)
        #: Disks handed over at the stop-and-copy (taken back if the migration fails).
        self._inactivated: list = []

    def start(self) -> None:
        self._set_status("setup")
        self._thread.start()

    def cancel(self) -> None:
        self._cancel.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _set_status(self, status: str) -> None:
        self.info.status = status
        if self.settings.capabilities.get("events"):
            self._emit("MIGRATION", {"status": status})

    # -- sending ---------------------------------------------------------------------------
    def _send(self, data) -> None:
        """Queue ``data``; it goes out in writes of :data:`SEND_BATCH` bytes."""
        self._out += data
        if len(self._out) >= SEND_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._cancel.is_set():
            raise _Cancelled()
        data, self._out = self._out, bytearray()
        if data:
            self.channel.send(data)
            self.info.transferred += len(data)
            self._throttle(len(data))

    def _throttle(self, n: int) -> None:
        start, sent = self._window
        sent += n
        now = time.monotonic()
        limit = self.settings.max_bandwidth
        if limit > 0:
            ahead = sent / limit - (now - start)
            if ahead > 0:
                time.sleep(ahead)
        if now - start > 0.1:
            self._window = (time.monotonic(), 0)
        else:
            self._window = (start, sent)

    def _send_page(self, offset: int, data: bytes) -> None:
        self._send(_REC.pack(b"P", offset, len(data)) + data + _CRC.pack(zlib.crc32(data)))
        self.info.normal += len(data) // PAGE

    # Comparisons are of bytes objects (memcmp): slicing the mmap and the shadow
    # copies 64 KiB, which costs far less than comparing memoryviews item by item.
    def _shadow_pass(self, mem, shadow: mmap.mmap) -> int:
        """Send every page that differs from what was sent; returns the bytes sent."""
        sent = 0
        ever = self._ever_sent
        size = mem.size
        for n, off in enumerate(range(0, size, BLOCK)):
            block = mem.ram_read(off, min(BLOCK, size - off))
            # a block never sent is zero at the destination (and in the shadow,
            # which is not read: untouched, it costs no page faults)
            old = shadow[off:off + BLOCK] if ever[n] else _ZERO[:len(block)]
            if block == old:
                if not ever[n] and self.info.passes == 0:
                    self.info.duplicate += len(block) // PAGE   # zero: never sent
                continue
            ever[n] = 1
            for p in range(0, len(block), PAGE):
                page = block[p:p + PAGE]
                if page != old[p:p + PAGE]:
                    shadow[off + p:off + p + PAGE] = page
                    self._send_page(off + p, page)
                    sent += PAGE
        return sent

    def _shadow_dirty_bytes(self, mem, shadow: mmap.mmap) -> int:
        ever = self._ever_sent
        size = mem.size
        return sum(BLOCK for n, off in enumerate(range(0, size, BLOCK))
                   if (mem.ram_read(off, min(BLOCK, size - off))
                       != shadow[off:off + BLOCK] if ever[n]
                       else not mem.ram_is_zero(off, min(BLOCK, size - off))))

    # -- with the board's dirty log -------------------------------------------------------------
    def _log_pass(self, mem, _shadow) -> int:
        """The first pass sends every page that is not zero (a page never sent is zero
        at the destination); the next ones the pages logged as written since."""
        # Records of up to a block (pages next to each other in RAM go together):
        # what costs here is Python's work per record, not the bytes.
        sent = 0
        if self.info.passes == 0:
            size = mem.size
            for off in range(0, size, BLOCK):
                n = min(BLOCK, size - off)
                if mem.ram_is_zero(off, n):
                    self.info.duplicate += n // PAGE
                    continue
                self._send_page(off, mem.ram_read(off, n))
                sent += n
            return sent
        self._pending |= self.board.dirty_pages()
        pending, self._pending = sorted(self._pending), set()
        run_start = run_end = -1
        for page in pending:
            try:
                off = mem.gpa_to_ram(page * PAGE)
            except KemuError:
                continue                # not RAM (a log bit outside every region)
            if off == run_end and run_end - run_start < BLOCK:
                run_end += PAGE
                continue
            if run_start >= 0:
                self._send_page(run_start, mem.ram_read(run_start, run_end - run_start))
                sent += run_end - run_start
            run_start, run_end = off, off + PAGE
        if run_start >= 0:
            self._send_page(run_start, mem.ram_read(run_start, run_end - run_start))
            sent += run_end - run_start
        return sent

    def _log_dirty_bytes(self, _mem, _shadow) -> int:
        self._pending |= self.board.dirty_pages()
        return len(self._pending) * PAGE

    def _main(self) -> None:
        paused_here = False
        logging = hasattr(self.board, "dirty_pages")
        if logging:
            self._pass, self._dirty_bytes = self._log_pass, self._log_dirty_bytes
        else:
            self._pass, self._dirty_bytes = self._shadow_pass, self._shadow_dirty_bytes
        self._pending: set[int] = set()
        try:
            header = {"kind": "migration", "machine": self.board.state_fingerprint(),
                      "memory": {"size": self.memory.size,
                                 "regions": self.memory.ram_layout()}}
            from kemu.snapshot import config_to_plain
            self._send(st.encode_stream(header, {"config": config_to_plain(self.vm.config)}))
            self._flush()
            self.info.setup_ms = int((time.monotonic() - self.info.started) * 1000)
            self._set_status("active")
            mem = self.memory
            if logging:
                shadow = None
                with self.board.lock:
                    self.board.start_dirty_log()
            else:
                # what was sent, as an anonymous mapping: untouched pages stay the zero page
                shadow = mmap.mmap(-1, self.memory.size,
                                   flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            while True:
                t0 = time.monotonic()
                sent = self._pass(mem, shadow)
                self.info.passes += 1
                self._send(_REC.pack(b"E", self.info.passes, 0))
                self._flush()
                if self.settings.capabilities.get("events"):
                    self._emit("MIGRATION_PASS", {"pass": self.info.passes})
                elapsed = max(time.monotonic() - t0, 1e-3)
                rate = min(max(sent / elapsed, 1 << 20), self.settings.max_bandwidth or 1 << 40)
                dirty = self._dirty_bytes(mem, shadow)
                self.info.remaining = dirty
                if (dirty / rate * 1000 <= self.settings.downtime_limit_ms
                        or self.info.passes >= MAX_PASSES):
                    break
            # Stop and copy.
            stop_at = time.monotonic()
            if self.vm.state == "running":
                self.vm.pause()
                paused_here = True
            self._set_status("device")
            with self.board.lock:
                # Disks on shared storage: what the guest wrote is in the image now and
                # the write locks are dropped, for the destination to take over.
                from kemu.backends.block import inactivate_all
                self._inactivated = inactivate_all(disk_backends(self.vm))
                self._pass(mem, shadow)
                self.info.remaining = 0
                board_state = self.board.save_state()
            blob = st.encode_stream({"kind": "machine-state"}, board_state)
            self._send(_REC.pack(b"S", 0, len(blob)) + blob)
            self._send(_REC.pack(b"D", 0, 0))
            self._flush()
            # x-checksum: RAM as sent (the guest stays paused here), hashed while the
            # destination hashes what it got
            checksum = None
            if self.settings.capabilities.get("x-checksum"):
                with self.board.lock:
                    checksum = ram_checksum(self.board.memory)
            if self.channel.sock is not None:
                # Over a socket the destination answers once it runs: the source is
                # done (postmigrate) only then; any other answer leaves it running.
                if self._await_ack() != ACK:
                    raise MigrationError("the destination did not take the machine "
                                         "(see its error)")
            self.channel.close()
            self.info.downtime_ms = int((time.monotonic() - stop_at) * 1000)
            self.info.checksum = checksum
            self.info.total_ms = int((time.monotonic() - self.info.started) * 1000)
            self.vm._postmigrate = True
            self._set_status("completed")
        except _Cancelled:
            self._set_status("cancelled" if self._fail(None, paused_here) else "failed")
        except (OSError, KemuError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self._fail(reason, paused_here)
            self._set_status("failed")
        except Exception as e:       # a bug in kemu: the source goes on, the error is reported
            log.exception("migration failed")
            self._fail(f"internal error: {type(e).__name__}: {e}", paused_here)
            self._set_status("failed")
        finally:
            if logging:
                with self.board.lock:
                    self.board.stop_dirty_log()

    def _await_ack(self, limit: float = 120.0) -> bytes:
        """The destination's answer (b"" if it went away); migrate_cancel still works
        while it loads (the source then takes its disks back)."""
        sock = self.channel.sock
        end = time.monotonic() + limit
        sock.settimeout(0.2)
        while time.monotonic() < end:
            if self._cancel.is_set():
                raise _Cancelled()
            try:
                return sock.recv(1)
            except socket.timeout:
                continue
        raise MigrationError(f"the destination did not answer within {limit:g} s")

    def _fail(self, reason: str | None, paused_here: bool) -> bool:
        """Leave the source as before the migration; False if it could not take its
        disks back (it then stays paused)."""
        self.info.error = reason
        self.info.total_ms = int((time.monotonic() - self.info.started) * 1000)
        self.channel.close()
        if self._inactivated:
            # take the disks back; if someone else holds them now, the source stays
            # paused (as QEMU's does; a later cont tries again)
            from kemu.backends.block import activate_all
            try:
                activate_all(self._inactivated)
            except KemuError as e:
                self.info.error = f"{reason or 'cancelled'}; could not take the disks " \
                                  f"back, the machine stays paused: {e}"
                return False
            self._inactivated = []
        if paused_here and self.vm.state == "paused":
            self.vm.resume()
        return True


class _Cancelled(Exception):
    pass


def disk_backends(vm) -> list:
    """The machine's disk backends (every virtio-blk's)."""
    from kemu.snapshot import blk_backends_by_name
    return list(blk_backends_by_name(vm._board).values())


# -- the destination --------------------------------------------------------------------------------
class Incoming:
    """The destination's side: accept, check, load RAM and state, start."""

    def __init__(self, vm, listener: Listener, settings: MigrationSettings,
                 emit: Callable[[str, dict], None], paused: bool) -> None:
        self.vm = vm
        self.board = vm._board
        self.listener = listener
        self.settings = settings
        self.paused = paused
        self.info = MigrationInfo(status="setup")
        self._emit = emit
        self._thread = threading.Thread(target=self._main, name="migration-incoming",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _set_status(self, status: str) -> None:
        self.info.status = status
        if self.settings.capabilities.get("events"):
            self._emit("MIGRATION", {"status": status})

    def _main(self) -> None:
        try:
            self._set_status("setup")
            channel = self.listener.accept()
            self.info.started = time.monotonic()
            try:
                self._load(channel)
            finally:
                channel.close()
        except (OSError, KemuError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self.info.error = reason
            self._set_status("failed")
            self.vm._incoming_failed(f"load of migration failed: {reason}")
        except Exception as e:
            log.exception("incoming migration failed")
            self.info.error = f"internal error: {type(e).__name__}: {e}"
            self._set_status("failed")
            self.vm._incoming_failed(f"load of migration failed: {self.info.error}")
        finally:
            self.listener.close()

    def _load(self, channel: _Channel) -> None:
        what = "migration stream"
        header = st.read_header(channel, what)
        st.read_payload(channel, header, what)
        if header.get("kind") != "migration":
            raise StateError(f"{what}: not a migration stream")
        st.check_header(header, self.board.state_fingerprint(), what)
        memory = self.board.memory
        st.check_ram(header.get("memory"), memory, what)
        self._set_status("active")
        self.info.total = size = memory.size
        board_state = None
        while True:
            kind, offset, length = _REC.unpack(channel.recv_exact(_REC.size))
            if kind == b"P":
                if length > BLOCK or offset + length > size or offset % PAGE:
                    raise StateError(f"{what}: corrupted (page at {offset:#x}+{length:#x})")
                # Straight into guest RAM: a machine whose load fails never runs.
                crc = 0
                for _, view in memory.ram_views(offset, length):
                    channel.recv_into(view)
                    crc = zlib.crc32(view, crc)
                (sent_crc,) = _CRC.unpack(channel.recv_exact(_CRC.size))
                if crc != sent_crc:
                    raise StateError(f"{what}: corrupted (page checksum at {offset:#x})")
                self.info.transferred += length + _REC.size + _CRC.size
                self.info.normal += length // PAGE
            elif kind == b"E":
                self.info.passes = offset
            elif kind == b"S":
                if length > MAX_STATE:
                    raise StateError(f"{what}: corrupted (state size)")
                blob = channel.recv_exact(length)
                import io
                f = io.BytesIO(blob)
                state_header = st.read_header(f, what)
                board_state = st.read_payload(f, state_header, what)
            elif kind == b"D":
                break
            else:
                raise StateError(f"{what}: corrupted (record {kind!r})")
        if not isinstance(board_state, dict):
            raise StateError(f"{what}: corrupted (no machine state)")
        if self.settings.capabilities.get("x-checksum"):
            self.info.checksum = ram_checksum(self.board.memory)
        # shared storage: the source let go of the disks; take them and read them again
        from kemu.backends.block import activate_all, inactivate_all
        disks = disk_backends(self.vm)
        try:
            activate_all(disks)
            self.vm._finish_incoming(board_state, self.paused)
        except BaseException:
            inactivate_all(disks)
            raise
        if channel.sock is not None:
            try:
                channel.send(ACK)
            except OSError:
                pass        # the source went away after sending everything: we run
        self.info.total_ms = int((time.monotonic() - self.info.started) * 1000)
        self._set_status("completed")


# -- the per-machine manager the QMP commands use ------------------------------------------------------
class Migration:
    """Migration settings and the current (or last) migration of one machine."""

    def __init__(self, vm) -> None:
        self.vm = vm
        self.settings = MigrationSettings()
        self.fds: dict[str, int] = {}
        self.outgoing: Outgoing | None = None
        self.incoming: Incoming | None = None

    def emit(self, name: str, data: dict) -> None:
        from kemu.api import MigrationPass, MigrationStatus
        self.vm._emit(MigrationStatus(status=data["status"]) if name == "MIGRATION"
                      else MigrationPass(pass_=data["pass"]))

    def migrate(self, uri: str) -> None:
        if self.outgoing is not None and self.outgoing.info.status in ("setup", "active",
                                                                         "device"):
            raise MigrationError("There's a migration process in progress")
        if self.vm.state not in ("running", "paused"):
            raise MigrationError(f"migrate: the machine is {self.vm.state}")
        if not hasattr(self.vm._board, "save_state"):
            raise MigrationError(f"migrate: the {self.vm.config.machine} board cannot be "
                                 "migrated yet")
        channel = connect(uri, self.fds)
        self.outgoing = Outgoing(self.vm, channel, self.settings, self.emit)
        self.outgoing.start()

    def incoming_from(self, uri: str, paused: bool) -> Incoming:
        listener = Listener(uri)
        self.incoming = Incoming(self.vm, listener, self.settings, self.emit, paused)
        self.incoming.start()
        return self.incoming

    def cancel(self) -> None:
        if self.outgoing is not None:
            self.outgoing.cancel()

    def info(self) -> dict:
        current = self.outgoing or self.incoming
        return current.info.qmp() if current is not None else {}

    def set_capabilities(self, caps: list) -> None:
        updates = {}
        for cap in caps:
            if not isinstance(cap, dict) or set(cap) != {"capability", "state"} \
                    or not isinstance(cap["state"], bool):
                raise MigrationError("Invalid parameter type for 'capabilities', expected: "
                                     "MigrationCapabilityStatus")
            name = cap["capability"]
            if name not in CAPABILITIES:
                raise MigrationError(f"Migration capability '{name}' is not supported by kemu "
                                     f"(have: {', '.join(CAPABILITIES)})")
            updates[name] = cap["state"]
        if self.outgoing is not None and self.outgoing.info.status in ("setup", "active",
                                                                         "device"):
            raise MigrationError("There's a migration process in progress")
        self.settings.capabilities.update(updates)

    def query_capabilities(self) -> list:
        return [{"capability": k, "state": v} for k, v in self.settings.capabilities.items()]

    def set_parameters(self, params: dict) -> None:
        for key, value in params.items():
            if key not in ("downtime-limit", "max-bandwidth"):
                raise MigrationError(f"migrate-set-parameters: parameter '{key}' is not "
                                     "supported by kemu (have: downtime-limit, max-bandwidth)")
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MigrationError(f"Parameter '{key}' expects a non-negative integer")
            if key == "downtime-limit" and value > 2000000:
                raise MigrationError("Parameter 'downtime_limit' expects an integer in the "
                                     "range of 0 to 2000000 milliseconds")
        if "downtime-limit" in params:
            self.settings.downtime_limit_ms = params["downtime-limit"]
        if "max-bandwidth" in params:
            self.settings.max_bandwidth = params["max-bandwidth"]

    def query_parameters(self) -> dict:
        return {"downtime-limit": self.settings.downtime_limit_ms,
                "max-bandwidth": self.settings.max_bandwidth}
