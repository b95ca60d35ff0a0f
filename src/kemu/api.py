"""kemu as a library: machines as Python objects in your own process.

::

    from kemu import Machine

    with Machine.default_guest(memory="256M") as vm:
        vm.start()                            # start(paused=True): as QEMU's -S
        vm.console.expect("# ")               # a regex (literal=True: plain text)
        print(vm.console.run("uname -m"))     # "aarch64\n"; CommandFailed if non-zero
        vm.pause(); vm.resume()               # the guest's clock stops meanwhile
        for event in vm.events(timeout=1):    # Stop, Resume, Reset, Powerdown, Shutdown
            print(event)
        vm.powerdown()                        # the power button: the guest powers off
        status = vm.wait(60)                  # 0: the guest powered off, 1: it failed

The same board, devices and runtime as the ``kemu`` command; the command line
only builds a :class:`MachineConfig` and runs it, and QMP
(:mod:`kemu.qmp`) is a table of commands over this class.

Every wait takes a timeout; every failure is a :class:`~kemu.errors.KemuError`:
:class:`ConsoleTimeout`, :class:`ConsoleClosed`, :class:`CommandFailed`,
:class:`MachineStateError` (not started, already ended) and
:class:`MachineTimeout` (the vCPU did not reach a safe point).
Events are frozen dataclasses with a host timestamp (``time.time()``); each
is also delivered, as the matching QMP event message, to every listener
(:meth:`Machine.add_listener`).
"""

from __future__ import annotations

import atexit
import queue
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Union

from kemu.backends.serial import SerialBackend
from kemu.errors import KemuError
from kemu.machines.config import DeviceConfig, DriveConfig, MachineConfig
from kemu.machines.runtime import Outcome, RunState

CONSOLE_BUFFER = 1 << 20

#: Machines still running when the interpreter exits are stopped first (their
#: vCPU threads must not be torn down inside Unicorn).
_live: "weakref.WeakSet[Machine]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for vm in list(_live):
        try:
            vm.stop()
            vm.wait(5)
        except Exception:
            pass


class ConsoleTimeout(KemuError):
    """What a console wait expected did not appear in time."""

    exit_status = 1


class ConsoleClosed(KemuError):
    """The machine ended while a console wait was still waiting for its pattern."""

    exit_status = 1


class CommandFailed(KemuError):
    """A command run through :meth:`Console.run` exited with a non-zero status."""

    exit_status = 1


class MachineStateError(KemuError):
    """An operation the machine cannot do in its state (not started, already ended...)."""


class MachineTimeout(KemuError):
    """The vCPU did not reach a safe point (pause, end) within the timeout."""

    exit_status = 1


@dataclass(frozen=True)
class Event:
    """Something that happened to the machine, with a host timestamp (time.time())."""

    timestamp: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Stop(Event):
    """The vCPUs stopped (QMP's STOP): ``reason`` is ``"io-error"`` when a disk's
    werror/rerror policy paused the machine (QMP's query-status then says
    ``io-error``), else empty."""

    reason: str = ""


@dataclass(frozen=True)
class BlockIOError(Event):
    """The host failed a disk request (QMP's BLOCK_IO_ERROR), and what was done
    about it: ``action`` ``report``, ``ignore`` or ``stop`` (the machine pauses;
    :meth:`Machine.resume` retries the request)."""

    device: str = ""
    node_name: str = ""
    operation: str = ""
    action: str = ""
    nospace: bool = False
    reason: str = ""

    def qmp_data(self) -> dict:
        return {"device": self.device, "node-name": self.node_name,
                "operation": self.operation, "action": self.action,
                "nospace": self.nospace, "reason": self.reason}


@dataclass(frozen=True)
class Resume(Event):
    """The vCPUs run again (QMP's RESUME)."""


@dataclass(frozen=True)
class Powerdown(Event):
    """The power button was pressed (QMP's POWERDOWN)."""


@dataclass(frozen=True)
class Reset(Event):
    """The machine was reset (QMP's RESET): ``guest`` is True when the guest asked."""

    guest: bool = False

    @property
    def qmp_reason(self) -> str:
        return "guest-reset" if self.guest else "host-qmp-system-reset"


@dataclass(frozen=True)
class Shutdown(Event):
    """The machine ended (QMP's SHUTDOWN): ``guest`` is True when the guest asked."""

    guest: bool = False
    reason: str = ""
    status: int = 0

    @property
    def qmp_reason(self) -> str:
        return {"poweroff": "guest-shutdown", "reset": "guest-reset", "panic": "guest-panic",
                "quit": "host-qmp-quit", "host-signal": "host-signal"
                }.get(self.reason, "host-error")


@dataclass(frozen=True)
class GuestPanicked(Event):
    """The guest kernel panicked (QMP's GUEST_PANICKED, action poweroff): kemu ends
    the machine, and a Shutdown with reason ``panic`` follows.  ``message`` is the
    panic line from the console."""

    message: str = ""


@dataclass(frozen=True)
class VncEvent(Event):
    """A VNC client connected, finished its handshake or left (QMP's VNC_CONNECTED,
    VNC_INITIALIZED, VNC_DISCONNECTED: ``kind``), with QMP's ``server`` and ``client``."""

    kind: str = ""
    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MigrationStatus(Event):
    """A migration changed state (QMP's MIGRATION, with the ``events`` capability):
    setup, active, device, completed, failed, cancelled."""

    status: str = ""


@dataclass(frozen=True)
class MigrationPass(Event):
    """A pass over guest RAM ended (QMP's MIGRATION_PASS)."""

    pass_: int = 0


@dataclass(frozen=True)
class DumpCompleted(Event):
    """dump-guest-memory ended (QMP's DUMP_COMPLETED): ``data`` is QEMU's ``result``
    (DumpQueryResult) and, on failure, ``error``."""

    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class JobStatusChange(Event):
    """A background job (QMP's snapshot-save, snapshot-load, snapshot-delete) changed
    state (QMP's JOB_STATUS_CHANGE): created, running, waiting, pending, aborting,
    concluded, null."""

    id: str = ""
    status: str = ""


MachineEvent = Union[Stop, Resume, Powerdown, Reset, GuestPanicked, Shutdown, BlockIOError,
                     VncEvent, MigrationStatus, MigrationPass, DumpCompleted, JobStatusChange]

#: QMP event names that are not the class name in capitals.
_QMP_NAMES = {GuestPanicked: "GUEST_PANICKED", BlockIOError: "BLOCK_IO_ERROR",
              MigrationStatus: "MIGRATION", MigrationPass: "MIGRATION_PASS",
              DumpCompleted: "DUMP_COMPLETED", JobStatusChange: "JOB_STATUS_CHANGE"}


class Console:
    """The machine's serial console: everything the guest printed, and typing into it."""

    def __init__(self, backend: SerialBackend, lock: threading.RLock) -> None:
        self._backend = backend
        self._lock = lock
        self._cond = threading.Condition()
        self._buffer = bytearray()
        self._dropped = 0          # bytes discarded from the front of the buffer
        self._cursor = 0           # absolute position expect() continues from
        self._closed = False       # the machine has ended: no more output
        backend.add_tap(self._output)

    def _close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _output(self, data: bytes) -> None:
        with self._cond:
            self._buffer += data
            excess = len(self._buffer) - CONSOLE_BUFFER
            if excess > 0:
                del self._buffer[:excess]
                self._dropped += excess
            self._cond.notify_all()

    @property
    def output(self) -> str:
        """The last megabyte the guest printed."""
        with self._cond:
            return self._buffer.decode(errors="replace")

    def write(self, text: str | bytes) -> None:
        """Type into the console (held by the host until the guest's driver listens)."""
        data = text.encode() if isinstance(text, str) else bytes(text)
        with self._lock:
            self._backend.send(data)

    def expect(self, pattern: str | bytes | re.Pattern, timeout: float = 60.0, *,
               literal: bool = False) -> re.Match:
        """Wait for ``pattern`` after the previous match; returns the match (over bytes).

        ``pattern`` is a regular expression, or plain text with ``literal=True``.
        Raises :class:`ConsoleTimeout` when it has not appeared within
        ``timeout``, :class:`ConsoleClosed` as soon as the machine has ended
        without printing it.
        """
        if literal:
            if isinstance(pattern, re.Pattern):
                raise TypeError("literal=True takes text, not a compiled pattern")
            pattern = re.escape(pattern.encode() if isinstance(pattern, str) else pattern)
        return self._expect(pattern, timeout)[0]

    def _expect(self, pattern: str | bytes | re.Pattern,
                timeout: float) -> tuple[re.Match, int, int]:
        """The match and its absolute (since boot) start and end in the output."""
        if isinstance(pattern, re.Pattern):
            regex = pattern if isinstance(pattern.pattern, bytes) else re.compile(
                pattern.pattern.encode(), pattern.flags & ~re.UNICODE)
        else:
            regex = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                start = max(0, self._cursor - self._dropped)
                m = regex.search(self._buffer, start)
                if m:
                    self._cursor = self._dropped + m.end()
                    return m, self._dropped + m.start(), self._cursor
                if self._closed:
                    tail = self._buffer[-500:].decode(errors="replace")
                    raise ConsoleClosed(f"console: the machine ended before {regex.pattern!r} "
                                        f"appeared (last output: {tail!r})")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = self._buffer[-500:].decode(errors="replace")
                    raise ConsoleTimeout(f"console: {regex.pattern!r} not seen within "
                                         f"{timeout:g} s (last output: {tail!r})")
                self._cond.wait(remaining)

    def run(self, command: str, timeout: float = 60.0) -> str:
        """Run a shell command in the guest and return its output.

        The guest must be at a shell prompt.  The command's exit status is
        checked; a non-zero status raises :class:`CommandFailed`, no answer
        within ``timeout`` raises :class:`ConsoleTimeout`.

        The output is what the shell prints between two markers echoed around
        the command.  The markers are typed split by an empty quote
        (``__kemu_b1''__``), so the terminal's echo of the command line, which
        the line editor may also wrap at 80 columns, never matches them.
        """
        deadline = time.monotonic() + timeout
        token = f"{time.monotonic_ns():x}"
        begin, end = f"__kemu_b{token}__", f"__kemu_e{token}__"
        command = command.rstrip().rstrip(";")
        self.write(f"echo __kemu_b{token}''__; {command}; echo __kemu_e{token}''__=$?\n")
        _, _, out_start = self._expect(re.escape(begin) + r"\r?\n", timeout)
        m, out_end, _ = self._expect(re.escape(end) + r"=(\d+)",
                                     max(0.0, deadline - time.monotonic()))
        with self._cond:
            lo = max(0, out_start - self._dropped)
            text = bytes(self._buffer[lo:max(lo, out_end - self._dropped)])
        out = text.decode(errors="replace").replace("\r\n", "\n")
        status = int(m.group(1))
        if status != 0:
            raise CommandFailed(f"{command!r} exited with status {status}: {out.strip()[-300:]}")
        return out


def _guest_cid(config: MachineConfig) -> int | None:
    for dev in config.devices:
        if "vsock" in dev.driver and "guest-cid" in dev.props:
            return int(dev.props["guest-cid"], 0)
    return None


def _identity(config: MachineConfig, mac: str | None, cid: int | None) -> None:
    """A restored copy's own MAC (first NIC) and vsock CID, in its configuration."""
    for dev in config.devices:
        if mac is not None and dev.driver.startswith("virtio-net"):
            dev.props["mac"] = mac
            mac = None
        if cid is not None and "vsock" in dev.driver:
            dev.props["guest-cid"] = str(cid)
            if "uds" in dev.props:        # the original may still hold its socket
                dev.props["uds"] = f"{dev.props['uds']}.{cid}"
            cid = None


class Machine:
    """A virtual machine in this process.

    ``memory`` takes sizes like ``"256M"`` or a number of bytes; ``disks``
    are image paths (raw or qcow2, detected) attached as virtio disks;
    ``smp`` is the number of vCPUs (QEMU's ``-smp``).
    """

    def __init__(self, kernel: str | Path, initrd: str | Path | None = None, append: str = "",
                 memory: str | int = "256M", cpu: str = "cortex-a57",
                 disks: list[str | Path] = (), devices: list[str] = (),
                 no_reboot: bool = False, name: str | None = None,
                 machine: str = "virt", accel: str = "tcg", smp: int = 1,
                 vnc: str | None = None) -> None:
        from kemu.options import parse_device, parse_size

        config = MachineConfig(
            machine=machine, accel=accel, cpu=cpu,
            memory=memory if isinstance(memory, int) else parse_size(memory),
            kernel=Path(kernel), initrd=Path(initrd) if initrd else None, append=append,
            no_reboot=no_reboot, name=name, smp=smp,
            drives=[DriveConfig(Path(d)) for d in disks],
            devices=[parse_device(d) if isinstance(d, str) else DeviceConfig(*d)
                     for d in devices])
        if vnc is not None:           # QEMU's -vnc argument: ":1", "unix:/path,password=on"
            from kemu.options.display import parse_vnc_option
            config.extra["vnc"] = parse_vnc_option(vnc, "vnc=")
        self.__init_from_config(config)

    @classmethod
    def from_config(cls, config: MachineConfig,
                    console_output: Callable[[bytes], None] | None = None) -> "Machine":
        """A machine from a full configuration; ``console_output`` also gets the console."""
        self = cls.__new__(cls)
        self.__init_from_config(config, console_output)
        return self

    @classmethod
    def default_guest(cls, arch: str = "aarch64", append: str = "", screen: bool = False,
                      **kwargs) -> "Machine":
        """The default guest (built from Debian's packages on first use); the x86-64
        one runs on the microvm board under KVM.  ``screen``: its display flavour
        (a kernel with DRM) with a graphics adapter, a keyboard and a tablet."""
        from kemu.guest.debian import default_guest
        if arch == "x86_64":
            kwargs.setdefault("machine", "microvm")
            kwargs.setdefault("accel", "kvm")
        if screen:
            given = {d if isinstance(d, str) else d[0] for d in kwargs.get("devices", ())}
            kwargs["devices"] = list(kwargs.get("devices", ())) + [
                d for d in ("virtio-gpu-device", "virtio-keyboard-device",
                            "virtio-tablet-device") if not any(g.startswith(d) for g in given)]
        image = default_guest(f"{arch}-display" if screen else arch, show_progress=False)
        return cls(kernel=image.kernel, initrd=image.initrd,
                   append=f"{image.append} {append}".strip(), **kwargs)

    def __init_from_config(self, config: MachineConfig,
                           console_output: Callable[[bytes], None] | None = None,
                           ram_fd: int | None = None) -> None:
        from kemu.machines.builder import build

        self.config = config
        self._backend = SerialBackend(console_output or (lambda data: None))
        self._board = build(config, self._backend, ram_fd=ram_fd)
        self.console = Console(self._backend, self._board.lock)
        self._events: queue.Queue[MachineEvent] = queue.Queue()
        self._listeners: list[Callable[[dict], None]] = []
        self._board.on_state = self._on_state
        # A board that reboots for the guest (PSCI SYSTEM_RESET without
        # -no-reboot) calls this first, if it has the hook.
        self._board.on_reset = lambda: self._emit(Reset(guest=True))
        # a disk's werror/rerror policy reports here (kemu.machines.virtio_devices)
        self._board.on_block_io_error = self._block_io_error
        # the VNC server (kemu.display.vnc) reports its clients here
        self._board.on_vnc_event = lambda kind, data: self._emit(VncEvent(kind=kind, data=data))
        #: Paused by a disk error (QMP's run state io-error) until resumed.
        self.io_error = False
        #: Stopped by the guest's power-off under -no-shutdown (QMP's run state
        #: shutdown) until a reset.
        self.guest_shut_down = False
        vcpus = getattr(self._board, "vcpus", None)
        if config.no_shutdown and vcpus is not None:
            vcpus.no_shutdown = True
            vcpus.on_guest_shutdown = self._guest_shutdown
        self._started = False
        self._outcome: Outcome | None = None
        self._stop_reason: str | None = None     # why the host ended it, if it did
        self._lock = threading.Lock()
        #: Whether the vCPUs ever ran (False after ``start(paused=True)`` until resumed).
        self.has_run = False
        #: A host reset pauses and resumes the vCPU: transitions not to report
        #: as STOP/RESUME (the RUNNING one comes after reset() has returned).
        self._unreported: set[RunState] = set()
        #: Notified on every run-state transition of the board.
        self._state_changed = threading.Condition()
        self._migration = None             # kemu.migration.Migration, made on first use
        #: Paused at the end of an outgoing migration (query-status: postmigrate).
        self._postmigrate = False
        #: Waiting for an incoming migration (query-status: inmigrate); set when it fails.
        self._incoming: threading.Event | None = None
        self._incoming_error: str | None = None

    # -- events -------------------------------------------------------------------------
    def _emit(self, event: MachineEvent) -> None:
        from kemu.qmp.protocol import event as qmp_event
        self._events.put(event)
        data = ({"guest": event.guest, "reason": event.qmp_reason}
                if isinstance(event, (Shutdown, Reset)) else None)
        if isinstance(event, GuestPanicked):
            data = {"action": "poweroff"}
        if isinstance(event, BlockIOError):
            data = event.qmp_data()
        if isinstance(event, MigrationStatus):
            data = {"status": event.status}
        if isinstance(event, MigrationPass):
            data = {"pass": event.pass_}
        if isinstance(event, DumpCompleted):
            data = event.data
        if isinstance(event, JobStatusChange):
            data = {"status": event.status, "id": event.id}
        name = _QMP_NAMES.get(type(event), type(event).__name__.upper())
        if isinstance(event, VncEvent):
            name, data = event.kind, event.data
        message = qmp_event(name, data, event.timestamp)
        for listener in list(self._listeners):
            listener(message)

    def add_listener(self, listener: Callable[[dict], None]) -> None:
        """Also deliver events as QMP event messages to ``listener`` (any thread)."""
        self._listeners.append(listener)

    def _on_state(self, state: RunState) -> None:
        with self._state_changed:
            self._state_changed.notify_all()
        with self._lock:
            if state in self._unreported:
                self._unreported.discard(state)
                return
        if state == RunState.PAUSED:
            self._emit(Stop(reason="io-error" if self.io_error else ""))
        elif state == RunState.RUNNING:
            self.has_run = True
            self._emit(Resume())
        elif state == RunState.STOPPED:
            self.console._close()
            threading.Thread(target=self.wait, daemon=True).start()

    def _guest_shutdown(self, reason: str) -> None:
        """-no-shutdown: the guest powered off (on its vCPU thread); the vCPUs pause,
        SHUTDOWN is reported now and kemu stays up until quit or a signal."""
        with self._lock:
            self.guest_shut_down = True
        self._emit(Shutdown(guest=True, reason=reason, status=0))

    def _block_io_error(self, info) -> None:
        """A disk request failed (any thread): BLOCK_IO_ERROR, and with the
        ``stop`` action, pause (from another thread: this may be the vCPU)."""
        self._emit(BlockIOError(device=info.device, node_name=info.node_name,
                                operation=info.operation, action=info.action,
                                nospace=info.nospace, reason=info.reason))
        if info.action == "stop":
            with self._lock:
                if self.io_error:
                    return          # already pausing for an earlier request
                self.io_error = True
            threading.Thread(target=self._board.pause, name="io-error-stop",
                             daemon=True).start()

    def _retry_held_requests(self) -> None:
        """Run again the disk requests the ``stop`` policy held (after resume)."""
        for slot in getattr(self._board, "virtio_slots", ()):
            device = getattr(getattr(slot, "device", None), "device", None)
            retry = getattr(device, "retry_held", None)
            if retry is not None:
                with self._board.lock:
                    retry()

    def events(self, timeout: float = 0.0) -> Iterator[MachineEvent]:
        """Events since the last call; waits up to ``timeout`` for the first one."""
        try:
            yield self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                yield self._events.get_nowait()
            except queue.Empty:
                return

    # -- lifecycle ------------------------------------------------------------------------
    def _require_running(self, what: str) -> None:
        if not self._started:
            raise MachineStateError(f"{what}: the machine has not been started")
        if self._board.state == RunState.STOPPED:
            raise MachineStateError(f"{what}: the machine has shut down")

    def start(self, paused: bool = False, loadvm: str | None = None) -> None:
        """Boot the machine (``paused``: as QEMU's ``-S``, call :meth:`resume`).

        ``loadvm``: start from that internal snapshot of the disks instead (QEMU's
        ``-loadvm``; see :meth:`loadvm`); a snapshot that cannot be loaded raises
        one line and nothing starts.
        """
        if self._started:
            raise MachineStateError("start: the machine was already started")
        self.config.start_paused = paused
        if loadvm is not None:
            from kemu import savevm
            board_state = savevm.start_from(self, loadvm)
            self._started = True
            self._board.start_restored(board_state, paused=paused)
            self.has_run = not paused
        else:
            self._started = True
            self._board.start()
        if self.vnc is not None:
            self.vnc.start()          # its I/O thread (after -daemonize's fork, if any)
        _live.add(self)
        if self._stop_reason is not None:
            # stop() came first (a QMP quit while -qmp ...,wait=on held the start)
            self._board.stop()

    @property
    def state(self) -> str:
        """``"created"``, ``"running"``, ``"paused"`` or ``"shutdown"`` (``"inmigrate"``
        while waiting for an incoming migration)."""
        if self._incoming is not None and not self._incoming.is_set():
            return "inmigrate"
        state = self._board.state
        return "shutdown" if state == RunState.STOPPED else state.value

    def pause(self, timeout: float = 10.0) -> None:
        """Stop the vCPUs (as QMP's ``stop``); the guest's clock stops with them.

        The TCG vCPU stops at the start of its next translation block, even
        in a guest that spins; :class:`MachineTimeout` if it has not within
        ``timeout``.
        """
        self._require_running("pause")
        # Stop is reported here, once the vCPUs have stopped and before pause()
        # returns, so that events keep the order things happened in.
        with self._lock:
            report = self._board.state == RunState.RUNNING
            if report:
                self._unreported.add(RunState.PAUSED)
        if not self._board.pause(timeout):
            with self._lock:
                self._unreported.discard(RunState.PAUSED)
            raise MachineTimeout(f"pause: the vCPU did not stop within {timeout:g} s")
        if self._board.state == RunState.STOPPED:
            raise MachineStateError("pause: the machine has shut down")
        if report:
            self._emit(Stop(reason="io-error" if self.io_error else ""))

    def resume(self, timeout: float = 10.0) -> None:
        """Run the vCPUs again (as QMP's ``cont``), after :meth:`pause` or ``start(paused=True)``."""
        self._require_running("resume")
        if self.guest_shut_down:
            raise MachineStateError("Resetting the Virtual Machine is required")
        if self._incoming is None or self._incoming.is_set():
            # as QEMU's cont: disks handed over to a migration are taken back first
            # (refused, in one line, while the destination holds them)
            from kemu.backends.block import activate_all
            from kemu.migration import disk_backends
            activate_all(disk_backends(self))
        with self._lock:
            self.io_error = False
            self._postmigrate = False
            # Resume is reported before resume() returns (as QEMU's cont emits
            # RESUME), not whenever the vCPU thread gets round to running.
            report = self._board.state == RunState.PAUSED
            if report:
                self._unreported.add(RunState.RUNNING)
                self.has_run = True
        if report:
            self._emit(Resume())
        self._board.resume()
        if report:
            # As QEMU's cont: when it returns, query-status says running.
            with self._state_changed:
                self._state_changed.wait_for(
                    lambda: self._board.state != RunState.PAUSED, timeout)
        self._retry_held_requests()

    def stop(self, reason: str = "quit") -> None:
        """End the machine (as QMP's ``quit``); :meth:`wait` gives its exit status.

        ``reason`` is what the Shutdown event says (``"host-signal"``: as QEMU
        ending on SIGTERM); the first stop's reason counts.
        """
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason
        if self._incoming is not None and not self._incoming.is_set():
            self._incoming_failed("")        # quit while waiting for a migration
            return
        self._board.stop()

    def kill(self, timeout: float = 10.0) -> int:
        """End the machine now, without asking the guest, and wait for it; the exit status.

        In-process there is no process to kill: the vCPU ends at once
        (:class:`MachineTimeout` if it has not within ``timeout``) and the
        disks are flushed and closed.
        """
        if not self._started:
            raise MachineStateError("kill: the machine has not been started")
        self._board.stop()
        status = self.wait(timeout)
        if status is None:
            raise MachineTimeout(f"kill: the vCPU did not stop within {timeout:g} s")
        return status

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the machine to end; its exit status (0 = guest powered off), or None."""
        if not self._started:
            raise MachineStateError("wait: the machine has not been started")
        if self._incoming is not None and not self._incoming.is_set():
            if not self._incoming.wait(timeout):
                return None
        if self._incoming_error is not None:
            if self._outcome is None:
                self._outcome = (Outcome("error", 1, self._incoming_error)
                                 if self._incoming_error else Outcome("quit", 0))
                self._board.close()
                self.console._close()
            return self._outcome.status
        outcome = self._board.wait(timeout)
        if outcome is None:
            return None
        with self._lock:
            first = self._outcome is None
            self._outcome = outcome
        if first:
            if outcome.reason == "panic":
                self._emit(GuestPanicked(message=outcome.message or ""))
            reason = outcome.reason
            if reason == "quit" and self._stop_reason is not None:
                reason = self._stop_reason
            self._emit(Shutdown(guest=reason in ("poweroff", "reset", "panic"),
                                reason=reason, status=outcome.status))
        return outcome.status

    def powerdown(self) -> None:
        """Press the machine's power button (as QMP's ``system_powerdown``).

        As in QEMU, a press always succeeds and is reported (:class:`Powerdown`);
        the guest decides what to do.  The default guest powers off (its
        ``acpid`` runs ``poweroff``), after which :meth:`wait` returns 0; a
        guest whose driver for the button is not up yet simply does not react.
        """
        self._require_running("powerdown")
        self._emit(Powerdown())
        self._board.powerdown()

    def reset(self) -> None:
        """A hard reset, as QMP's ``system_reset``: the guest boots again.

        The machine stays running (or paused) as it was; only a
        :class:`Reset` event is reported, as QEMU does.
        """
        self._require_running("reset")
        if self.guest_shut_down:
            # The vCPUs were asked to pause at the power-off; let them get there
            # first, so that the reset leaves the machine stopped (prelaunch).
            self._board.pause()
        with self._lock:
            if self._board.state == RunState.RUNNING:
                self._unreported = {RunState.PAUSED, RunState.RUNNING}
            if self.guest_shut_down:
                # As QEMU: a reset after the guest's power-off leaves the machine
                # in prelaunch, to be started again with cont.
                self.guest_shut_down = False
                self.has_run = False
        try:
            self._board.reset()
        except BaseException:
            with self._lock:
                self._unreported = set()
            raise
        self._emit(Reset())

    # -- snapshots, restore, fork (kemu.snapshot) ---------------------------------------------
    def snapshot(self, directory: str | Path, timeout: float = 10.0) -> dict:
        """Save the whole machine into ``directory`` (see :mod:`kemu.snapshot`); returns
        the snapshot's header.

        The vCPUs stop at their next block start (a clean point: no device
        access half done, disk requests complete), the state, RAM and a copy
        of each writable disk are written, and a running machine runs on
        (no Stop/Resume events; the guest does not see the time it took).
        """
        from kemu import snapshot
        self._require_running("snapshot")
        if not hasattr(self._board, "save_state"):
            raise MachineStateError(f"snapshot: the {self.config.machine} board cannot be "
                                    "saved yet")
        was_running = self._board.state == RunState.RUNNING
        with self._lock:
            if was_running:
                self._unreported = {RunState.PAUSED, RunState.RUNNING}
        if not self._board.pause(timeout):
            raise MachineTimeout(f"snapshot: the vCPU did not stop within {timeout:g} s")
        try:
            with self._board.lock:
                return snapshot.save(self._board, self.config, Path(directory))
        finally:
            if was_running:
                self._board.resume()

    @classmethod
    def restore(cls, directory: str | Path, *, overlay_dir: str | Path | None = None,
                paused: bool = False, verify: bool = True, mac: str | None = None,
                guest_cid: int | None = None,
                console_output: Callable[[bytes], None] | None = None,
                tag: str | None = None) -> "Machine":
        """A new machine running from a snapshot directory (:meth:`snapshot`).

        Its RAM is the snapshot's memory file mapped private (copy-on-write),
        each copied disk gets a new qcow2 overlay over the snapshot's copy in
        ``overlay_dir`` (default: the snapshot directory) named after ``tag``,
        networks get new host backends (a new passt), and the guest's virtual
        counter resumes where it stopped.  ``mac`` and ``guest_cid`` give the
        first NIC and the vsock device new identities (a fork).  A damaged,
        truncated or foreign snapshot raises :class:`~kemu.state.StateError`
        (one line) before anything starts.
        """
        import os

        from kemu import snapshot
        from kemu.state import StateError, check_header, check_ram
        directory = Path(directory)
        header, payload = snapshot.load(directory)
        tag = tag or f"restore-{os.getpid()}-{time.monotonic_ns():x}"
        memory = header.get("memory")
        if not isinstance(memory, dict) or memory.get("file") != snapshot.MEMORY_FILE:
            raise StateError(f"snapshot {directory}: corrupted header (memory)")
        config = snapshot.restored_config(directory, header, payload,
                                          Path(overlay_dir) if overlay_dir else directory, tag)
        _identity(config, mac, guest_cid)
        if memory.get("size") != config.memory:
            raise StateError(f"snapshot {directory}: memory file size does not match -m")
        fd = snapshot.open_memory(directory / snapshot.MEMORY_FILE, config.memory,
                                  memory.get("crcs"), verify)
        try:
            self = cls.__new__(cls)
            self.__init_from_config(config, console_output, ram_fd=fd)
        finally:
            os.close(fd)            # the mapping keeps the file
        try:
            check_header(header, self._board.state_fingerprint(), f"snapshot {directory}")
            check_ram(memory, self._board.memory, f"snapshot {directory}")
            self._started = True
            self._board.start_restored(payload["board"], paused=paused)
        except BaseException:
            self._board.close()
            raise
        self.has_run = not paused
        _live.add(self)
        return self

    def fork(self, n: int, directory: str | Path | None = None) -> list["Machine"]:
        """``n`` running copies of this machine (which runs on), from one snapshot in
        ``directory`` (default: a new temporary directory, left for the caller).

        The copies share the snapshot's memory file copy-on-write, each has its
        own disk overlays, a new MAC (locally administered) on its first NIC and
        the next vsock CIDs after this machine's (host side: the UNIX socket
        ``UDS.CID`` for ``uds=UDS``).
        """
        import os
        import tempfile
        if n < 1:
            raise ValueError("fork: n must be at least 1")
        directory = Path(directory or tempfile.mkdtemp(prefix="kemu-fork-"))
        self.snapshot(directory)
        cid = _guest_cid(self.config)
        copies: list[Machine] = []
        try:
            for i in range(n):
                mac = "52:54:%02x:%02x:%02x:%02x" % tuple(os.urandom(4))
                copies.append(Machine.restore(directory, verify=i == 0, mac=mac,
                                              guest_cid=None if cid is None else cid + 1 + i,
                                              tag=f"fork{i}-{os.getpid()}"))
        except BaseException:
            for vm in copies:
                vm.kill()
            raise
        return copies

    # -- internal snapshots in the qcow2 disks (kemu.savevm; QEMU's savevm/loadvm) ---------------
    def savevm(self, name: str | None = None, *, vmstate: str | None = None,
               devices: list[str] | None = None, overwrite: bool = True):
        """Save the machine as an internal snapshot of its qcow2 disks (HMP's ``savevm``;
        QMP's ``snapshot-save`` with ``overwrite=False``): every writable disk gets a
        snapshot named ``name`` (default ``vm-YYYYMMDDhhmmss``) and the ``vmstate`` node
        (default: the first) also the machine's state and RAM.  A running machine
        pauses for it and runs on.  Returns a :class:`kemu.savevm.SnapshotInfo`."""
        from kemu import savevm
        self._require_running("savevm")
        return savevm.save(self, name, vmstate=vmstate, devices=devices, overwrite=overwrite)

    def loadvm(self, name: str, *, vmstate: str | None = None,
               devices: list[str] | None = None) -> None:
        """Go back to internal snapshot ``name`` (HMP's ``loadvm``): the disks, RAM,
        vCPUs and devices as they were at the savevm.  The snapshot is read and
        checked whole first: a damaged one raises one line and the machine goes on
        as it was."""
        from kemu import savevm
        self._require_running("loadvm")
        savevm.load(self, name, vmstate=vmstate, devices=devices)

    def delvm(self, name: str, devices: list[str] | None = None) -> None:
        """Delete internal snapshot ``name`` from every disk holding it (HMP's ``delvm``)."""
        from kemu import savevm
        savevm.delete(self, name, devices)

    # -- migration (kemu.migration; QMP's migrate, -incoming) ------------------------------------
    @property
    def migration(self):
        """This machine's :class:`kemu.migration.Migration` (settings, current migration)."""
        if self._migration is None:
            from kemu.migration import Migration
            self._migration = Migration(self)
        return self._migration

    def migrate(self, uri: str) -> None:
        """Start a live migration to ``uri`` (QMP's ``migrate``); see :attr:`migration`."""
        self._require_running("migrate")
        self.migration.migrate(uri)

    def start_incoming(self, uri: str | None = None, paused: bool = False) -> None:
        """Wait for a migration instead of booting (``-incoming URI``; None: ``defer``,
        then :meth:`incoming`)."""
        if self._started:
            raise MachineStateError("incoming: the machine was already started")
        if not hasattr(self._board, "start_restored"):
            raise MachineStateError(f"-incoming: the {self.config.machine} board cannot be "
                                    "migrated yet")
        # Its disks are inactive until the switch (built so for -incoming; a machine
        # built without it hands them over now): the source may still be writing them.
        from kemu.backends.block import inactivate_all
        from kemu.migration import disk_backends
        inactivate_all(disk_backends(self))
        self._started = True
        self._incoming = threading.Event()
        self._incoming_paused = paused
        _live.add(self)
        if uri is not None:
            self.incoming(uri)

    def incoming(self, uri: str) -> None:
        """QMP's ``migrate-incoming`` (after ``-incoming defer``)."""
        if self._incoming is None or self._incoming.is_set():
            raise MachineStateError("migrate-incoming: the machine was not started with "
                                    "-incoming")
        if self.migration.incoming is not None:
            raise MachineStateError("The incoming migration has already been started")
        self.migration.incoming_from(uri, self._incoming_paused)

    def _finish_incoming(self, board_state: dict, paused: bool) -> None:
        self._board.start_restored(board_state, paused=paused)
        self.has_run = not paused
        self._incoming.set()

    def _incoming_failed(self, message: str) -> None:
        self._incoming_error = message
        self._incoming.set()
        with self._state_changed:
            self._state_changed.notify_all()

    def registers(self) -> dict[str, int]:
        """The boot CPU's general registers (read while the guest may be running)."""
        if not self._started:
            raise MachineStateError("registers: the machine has not been started")
        return self._board.cpu.registers()

    def dump_guest_memory(self, out) -> None:
        """Write guest RAM and each vCPU's registers to ``out`` as an ELF core
        (:mod:`kemu.dump`); a running machine is paused for it, as QEMU does."""
        from kemu.dump import DumpError, write_core
        if not self._started:
            raise MachineStateError("dump-guest-memory: the machine has not been started")
        if self.config.machine != "virt":
            raise DumpError(f"dump-guest-memory: kemu writes aarch64 cores only, not for "
                            f"the {self.config.machine} board")
        running = self.state == "running"
        if running:
            self.pause()
        try:
            cpus = [cpu.registers() for cpu in getattr(self._board, "cpus", [])] \
                or [self._board.cpu.registers()]
            write_core(out, [(r.base, r.buffer) for r in self._board.memory.regions], cpus)
        finally:
            if running:
                self.resume()

    def vcpu_thread_ids(self) -> list[int]:
        """The host thread id of each vCPU (QMP's ``query-cpus-fast`` ``thread-id``)."""
        return self._board.vcpu_thread_ids()

    def virtio_devices(self) -> list:
        """The virtio devices behind the board's transports, in slot order."""
        return [slot.device.device for slot in getattr(self._board, "virtio_slots", ())
                if getattr(slot.device, "device", None) is not None]

    def memory_map(self) -> list[tuple[int, int, str]]:
        """(base, size, name) of RAM and every device mapping."""
        ram = [(r.base, r.size, "ram") for r in self._board.memory.regions]
        return ram + [(m.base, m.size, m.device.name) for m in self._board.mmio.mappings]

    # -- display ------------------------------------------------------------------------
    @property
    def display(self):
        """The graphical console (:class:`kemu.display.console.DisplayConsole`), or None
        without a graphics adapter or a VNC display."""
        return getattr(self._board, "display", None)

    @property
    def vnc(self):
        """The VNC server (:class:`kemu.display.vnc.VncServer`), or None."""
        return getattr(self._board, "vnc", None)

    def send_keys(self, names: list[str]) -> None:
        """Press ``names`` (QEMU's key names, as HMP ``sendkey ctrl-alt-f1``) together,
        then release them in reverse order, on the virtio keyboards."""
        from kemu.display.keymap import QCODES
        codes = []
        for name in names:
            if name not in QCODES:
                raise KemuError(f"unknown key '{name}'")
            codes.append(QCODES[name])
        self.press_keys(codes)

    def press_keys(self, codes: list[int], hold_ms: int = 0) -> None:
        """Press the Linux key ``codes`` together on the virtio keyboards, and release them
        in reverse order ``hold_ms`` later (at once for 0; a timer, never a wait here)."""
        console = self.display
        if console is None or not console.keyboards:
            raise MachineStateError(f"the {self.config.machine} board has no keyboard "
                                    "(add -device virtio-keyboard-device)")

        def release() -> None:
            with self._board.lock:
                for kbd in console.keyboards:
                    for code in reversed(codes):
                        kbd.key(code, False)

        with self._board.lock:
            for kbd in console.keyboards:
                for code in codes:
                    kbd.key(code, True)
        if hold_ms <= 0:
            release()
            return
        timer = threading.Timer(hold_ms / 1000, release)
        timer.daemon = True
        timer.start()

    def screenshot(self):
        """What the screen shows now, as a Pillow ``Image`` (RGB)."""
        from kemu.display.screendump import surface_image
        if self.display is None:
            raise MachineStateError("screenshot: the machine has no display "
                                    "(-device virtio-gpu-device or -vnc)")
        return surface_image(self.display.surface)

    def screendump(self, filename: str | Path, format: str = "ppm") -> None:
        """Write the screen to ``filename`` as PPM (default, as QEMU) or PNG."""
        from kemu.display.screendump import write_screendump
        if self.display is None:
            raise MachineStateError("screendump: the machine has no display")
        write_screendump(self.display.surface, filename, format)

    @property
    def outcome(self) -> Outcome | None:
        """Why the machine ended (reason, status, message), once it has."""
        return self._outcome

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        if self._started and self._board.state != RunState.STOPPED:
            self.stop()
        if self._started:
            self.wait(30)
