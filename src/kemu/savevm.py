"""QEMU's internal snapshots of a whole machine: savevm, loadvm, delvm, -loadvm.

As QEMU does it: every writable disk must be a qcow2 image, each gets an
internal snapshot of its disk state under the same tag, and one of them
(the first, or the ``vmstate`` node of QMP's ``snapshot-save``) also holds
the machine's state in its VM state area
(:mod:`kemu.backends.qcow2.internal`), so ``qemu-img snapshot -l`` lists the
snapshot with its VM SIZE.  The error messages are QEMU's.

The VM state is kemu's own (QEMU's is not spoken; a QEMU-made one is refused
in one line): the :mod:`kemu.state` stream (header: kind ``savevm``, the
machine's fingerprint, the engine, RAM size and per-MiB CRC-32s; payload:
the board's state) at offset 0, then guest RAM from ``memory.offset``
(cluster aligned): its non-zero MiBs one after the other (:func:`ram_layout`).  A load reads and checks the
whole state (stream checksum, configuration, every RAM CRC) before it
touches the machine, so a damaged snapshot leaves a running machine as it was.
"""

from __future__ import annotations

import io
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from kemu import state as st
from kemu.errors import KemuError
from kemu.state import StateError

CHUNK = 1 << 20
_ZERO = bytes(CHUNK)
#: CRC recorded for an all-zero MiB (not written; reads back as zeros).
ZERO_CHUNK = -1
#: The first bytes of QEMU's own VM state stream (QEMU_VM_FILE_MAGIC).
QEMU_MAGIC = b"QEVM"
NO_VMSTATE_DISK = "no block device can store vmstate for snapshot"


class SnapshotError(KemuError):
    """A savevm/loadvm/delvm that cannot be done (QEMU's message); at -loadvm, kemu
    exits 1 as QEMU does."""

    exit_status = 1


@dataclass
class SnapshotDisk:
    """A disk of the machine as the snapshot commands see it."""

    name: str                  # QEMU's device-or-node name (messages)
    node_name: str             # what QMP's devices/vmstate name
    read_only: bool
    backend: Any

    @property
    def can_snapshot(self) -> bool:
        from kemu.backends.qcow2 import Qcow2Image
        return isinstance(self.backend, Qcow2Image)


def machine_disks(vm) -> list[SnapshotDisk]:
    """The machine's disks in -drive order, with their open backends."""
    from kemu.qmp.machine_info import disks
    from kemu.snapshot import blk_backends_by_name
    by_name = blk_backends_by_name(vm._board)
    return [SnapshotDisk(d.device or d.node_name, d.node_name, d.drive.read_only,
                         by_name.get(d.name)) for d in disks(vm.config)
            if by_name.get(d.name) is not None]


def select_disks(vm, devices: list[str] | None) -> list[SnapshotDisk]:
    """The disks a command works on: all writable ones, or the named nodes
    (QMP's ``devices``), each able to take a snapshot (bdrv_all_can_snapshot)."""
    every = machine_disks(vm)
    if devices is None:
        chosen = [d for d in every if not d.read_only]
    else:
        if not devices:
            raise SnapshotError("At least one device is required for snapshot")
        chosen = []
        for name in devices:
            found = next((d for d in every if d.node_name == name), None)
            if found is None:
                raise SnapshotError(f"No block device node '{name}'")
            chosen.append(found)
    for d in chosen:
        if not d.read_only and not d.can_snapshot:
            raise SnapshotError(f"Device '{d.name}' is writable but does not support snapshots")
    return [d for d in chosen if d.can_snapshot]


def vmstate_disk(disks: list[SnapshotDisk], vmstate: str | None) -> SnapshotDisk:
    """Where the VM state goes (bdrv_all_find_vmstate_bs)."""
    if vmstate is not None:
        found = next((d for d in disks if d.node_name == vmstate), None)
        if found is None:
            raise SnapshotError(f"vmstate block device '{vmstate}' does not exist")
        return found
    writable = [d for d in disks if not d.read_only]
    if not writable:
        raise SnapshotError(NO_VMSTATE_DISK)
    return writable[0]


# -- RAM ----------------------------------------------------------------------------------------
def ram_crcs(memory) -> list[int]:
    """The CRC-32 of each MiB of guest RAM by RAM offset (:data:`ZERO_CHUNK`: all zeros)."""
    size = memory.size
    return [ZERO_CHUNK if memory.ram_is_zero(off, min(CHUNK, size - off))
            else zlib.crc32(memory.ram_read(off, min(CHUNK, size - off)))
            for off in range(0, size, CHUNK)]


def ram_layout(crcs: list[int], size: int, offset: int) -> list[tuple[int, int, int | None]]:
    """(RAM offset, length, VM state position or None) of each MiB: the non-zero MiBs
    packed one after the other from ``offset`` (zero MiBs take no room, as QEMU's
    stream skips zero pages)."""
    out, pos = [], offset
    for i, crc in enumerate(crcs):
        n = min(CHUNK, size - i * CHUNK)
        if crc == ZERO_CHUNK:
            out.append((i * CHUNK, n, None))
        else:
            out.append((i * CHUNK, n, pos))
            pos += n
    return out


# -- save ---------------------------------------------------------------------------------------
def vm_clock_ns(board, board_state: dict) -> int:
    """The guest's running time (QEMU's VM CLOCK) in ``board_state``, as the board
    reads it (0 when it cannot)."""
    try:
        return max(0, int(board.vm_clock_ns(board_state)))
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return 0


def write_vmstate(board, img) -> tuple[int, dict]:
    """The paused board's state and RAM into ``img``'s VM state area; its size and
    the board's state."""
    from kemu.backends.qcow2 import internal
    from kemu.snapshot import board_engine
    memory = board.memory
    board_state = board.save_state()
    crcs = ram_crcs(memory)
    cs = img.cluster_size
    stream = b""
    offset = 0
    body = st.dumps({"board": board_state})
    for _ in range(3):     # the offset is in the header: settle on one that fits
        header = {"kind": "savevm", "machine": board.state_fingerprint(),
                  "engine": board_engine(board), "created": time.time(),
                  "memory": {"size": memory.size, "regions": memory.ram_layout(),
                             "offset": offset, "crcs": crcs}}
        stream = st.encode_stream(header, None, body=body)
        want = -(-len(stream) // cs) * cs
        if want == offset:
            break
        offset = want
    internal.clear_vmstate(img)
    internal.write_vmstate(img, 0, stream)
    end = offset
    for off, n, pos in ram_layout(crcs, memory.size, offset):
        if pos is not None:
            internal.write_vmstate(img, pos, memory.ram_read(off, n))
            end = pos + n
    return end, board_state


@dataclass
class SnapshotInfo:
    """What savevm made, per disk."""

    name: str
    vm_state_size: int
    disks: list[str] = field(default_factory=list)


def save(vm, name: str | None = None, *, vmstate: str | None = None,
         devices: list[str] | None = None, overwrite: bool = True) -> SnapshotInfo:
    """QEMU's save_snapshot: pause, state and RAM into the vmstate disk, a snapshot of
    every disk, resume (``overwrite``: an older snapshot of that name goes first,
    as HMP's savevm; else it is an error, as QMP's snapshot-save)."""
    from kemu.backends.qcow2 import internal
    board = vm._board
    if not hasattr(board, "save_state"):
        raise SnapshotError(f"savevm: the {vm.config.machine} board cannot be saved yet")
    disks = select_disks(vm, devices)
    target = vmstate_disk(disks, vmstate)
    if not target.can_snapshot or target.read_only:
        raise SnapshotError(f"Device '{target.name}' does not support VM state snapshots")
    if not name:
        name = time.strftime("vm-%Y%m%d%H%M%S")
    existing = [d for d in disks if internal.find_snapshot(d.backend, name) >= 0]
    if existing and not overwrite:
        raise SnapshotError(f"Snapshot '{name}' already exists in one or more devices")
    was_running = vm.state == "running"
    vm.pause()              # (also in prelaunch: the clocks are read at the pause)
    try:
        with board.lock:
            for d in existing:
                while internal.find_snapshot(d.backend, name) >= 0:
                    internal.delete(d.backend, name)
            for d in disks:
                d.backend.flush()
            size, board_state = write_vmstate(board, target.backend)
            clock = vm_clock_ns(board, board_state)
            for d in disks:
                internal.create(d.backend, name, vm_state_size=size if d is target else 0,
                                vm_clock_nsec=clock)
    except KemuError as e:
        raise SnapshotError(f"Error while creating snapshot on '{target.name}': {e}") \
            from None
    finally:
        if was_running:
            vm.resume()
    return SnapshotInfo(name, size, [d.node_name for d in disks])


# -- load ---------------------------------------------------------------------------------------
class _Stream(io.RawIOBase):
    """The VM state area as a file, for kemu.state's readers."""

    def __init__(self, reader) -> None:
        self.reader = reader
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        n = max(0, min(n, self.reader.size - self.pos))
        data = self.reader.read(self.pos, n)
        self.pos += len(data)
        return data


@dataclass
class LoadedState:
    """A snapshot's VM state, checked, ready to be put in place."""

    name: str
    board_state: dict
    reader: Any
    #: (RAM offset, length, VM state position or None for zeros), per MiB
    layout: list[tuple[int, int, int | None]]


def read_vmstate(vm, disk: SnapshotDisk, name: str) -> LoadedState:
    """Read and check the VM state of snapshot ``name`` on ``disk`` (nothing changes)."""
    from kemu.backends.qcow2 import internal
    img = disk.backend
    entries = internal.snapshots(img)
    i = internal.find_snapshot(img, name)
    if i < 0:
        raise SnapshotError("Snapshot can not be found")
    sn = entries[i]
    if sn.vm_state_size == 0:
        raise SnapshotError("This is a disk-only snapshot. Revert to it  offline using qemu-img")
    reader = internal.VmStateReader(img, sn)
    what = f"snapshot '{name}'"
    head = reader.read(0, min(8, reader.size))
    if head[:4] == QEMU_MAGIC:
        raise StateError(f"{what}: its VM state was saved by QEMU, which kemu cannot load "
                         "(kemu loads the VM states it saved itself)")
    f = _Stream(reader)
    header = st.read_header(f, what)
    payload = st.read_payload(f, header, what)
    if header.get("kind") != "savevm" or not isinstance(payload, dict) or \
            not isinstance(payload.get("board"), dict):
        raise StateError(f"{what}: not a kemu VM state")
    board = vm._board
    st.check_header(header, board.state_fingerprint(), what)
    from kemu.snapshot import board_engine
    engine = board_engine(board)
    if header.get("engine", "") != engine:
        raise StateError(f"{what}: made by CPU engine {header.get('engine') or 'kvm'!r}, "
                         f"this machine runs {engine or 'kvm'!r}")
    memory = header.get("memory")
    try:
        size, offset, crcs = int(memory["size"]), int(memory["offset"]), list(memory["crcs"])
    except (KeyError, TypeError, ValueError):
        raise StateError(f"{what}: corrupted header (memory)") from None
    st.check_ram(memory, board.memory, what)
    if offset < f.pos or len(crcs) != -(-size // CHUNK) or \
            not all(isinstance(c, int) for c in crcs):
        raise StateError(f"{what}: corrupted header (memory)")
    layout = ram_layout(crcs, size, offset)
    end = max([pos + n for _, n, pos in layout if pos is not None], default=offset)
    if end > reader.size:
        raise StateError(f"{what}: truncated VM state (RAM up to byte {end}, the snapshot "
                         f"holds {reader.size})")
    scratch = bytearray(CHUNK)
    for i, (_, n, pos) in enumerate(layout):
        if pos is None:
            continue
        view = memoryview(scratch)[:n]
        reader.read_into(pos, view)
        if zlib.crc32(view) != crcs[i]:
            raise StateError(f"{what}: the VM state is corrupted (RAM MiB {i} does not match "
                             "its checksum)")
    return LoadedState(name, payload["board"], reader, layout)


def fill_ram(board, loaded: LoadedState, fresh: bool = False) -> None:
    """The saved RAM into the board's (``fresh``: it is all zeros already)."""
    memory = board.memory
    for off, n, pos in loaded.layout:
        if pos is None:
            if not fresh and not memory.ram_is_zero(off, n):
                memory.ram_write(off, _ZERO[:n])
            continue
        for at, view in memory.ram_views(off, n):
            loaded.reader.read_into(pos + at, view)


def prepare_load(vm, name: str, vmstate: str | None = None,
                 devices: list[str] | None = None) -> tuple[list[SnapshotDisk], LoadedState]:
    """QEMU's load_snapshot checks, and the VM state read and checked."""
    from kemu.backends.qcow2 import internal
    if not hasattr(vm._board, "load_state"):
        raise SnapshotError(f"loadvm: the {vm.config.machine} board cannot be loaded yet")
    disks = select_disks(vm, devices)
    target = vmstate_disk(disks, vmstate)
    missing = [d for d in disks if internal.find_snapshot(d.backend, name) < 0]
    if missing:
        raise SnapshotError(f"Snapshot '{name}' does not exist in one or more devices")
    return disks, read_vmstate(vm, target, name)


def start_from(vm, name: str) -> dict:
    """-loadvm: the disks at snapshot ``name`` and its RAM in place in a machine not
    started yet; the board state to start from (any failure: one line, exit 1)."""
    try:
        disks, loaded = prepare_load(vm, name)
        with vm._board.lock:
            goto_disks(disks, name)
            fill_ram(vm._board, loaded, fresh=True)
    except SnapshotError:
        raise
    except KemuError as e:
        raise SnapshotError(str(e)) from None
    return loaded.board_state


def goto_disks(disks: list[SnapshotDisk], name: str) -> None:
    from kemu.backends.qcow2 import internal
    for d in disks:
        try:
            internal.apply(d.backend, name)
        except KemuError as e:
            raise SnapshotError(f"Could not load snapshot '{name}' on '{d.name}': {e}") \
                from None


def load(vm, name: str, *, vmstate: str | None = None,
         devices: list[str] | None = None) -> None:
    """QEMU's load_snapshot into a machine that runs (or is paused): everything is
    checked first; then the disks go back to the snapshot, RAM and state are put
    in place, and a running machine runs on from the snapshot."""
    disks, loaded = prepare_load(vm, name, vmstate, devices)
    board = vm._board
    was_running = vm.state == "running"
    vm.pause()
    try:
        with board.lock:
            for d in disks:
                d.backend.flush()
            goto_disks(disks, name)
            fill_ram(board, loaded)
        board.load_state(loaded.board_state)
    finally:
        if was_running:
            vm.resume()


def delete(vm, name: str, devices: list[str] | None = None) -> None:
    """QEMU's bdrv_all_delete_snapshot: from every disk that has it (none: no error)."""
    from kemu.backends.qcow2 import internal
    disks = select_disks(vm, devices)
    with vm._board.lock:
        for d in disks:
            try:
                while internal.find_snapshot(d.backend, name) >= 0:
                    internal.delete(d.backend, name)
            except KemuError as e:
                raise SnapshotError(f"Could not delete snapshot '{name}' on '{d.name}': {e}") \
                    from None


def info_snapshots(vm) -> str:
    """HMP's ``info snapshots`` (hmp_info_snapshots), lines ending in CR LF."""
    from kemu.backends.qcow2 import internal
    from kemu.backends.qcow2.snapshots import HEADER_ROW, format_row
    try:
        disks = select_disks(vm, None)
        target = vmstate_disk(disks, None)
    except SnapshotError as e:
        return f"{e}\r\n"
    own = internal.snapshots(target.backend)
    names = [{sn.name for sn in internal.snapshots(d.backend)} for d in disks]
    everywhere = [sn for sn in own if all(sn.name in n for n in names)]
    if not everywhere:
        return "There is no snapshot available.\r\n"
    lines = ["List of snapshots present on all disks:", HEADER_ROW]
    lines += [format_row("--", sn.name, sn.vm_state_size, sn.date_sec, sn.vm_clock_nsec,
                         sn.icount) for sn in everywhere]
    return "\r\n".join(lines) + "\r\n"
