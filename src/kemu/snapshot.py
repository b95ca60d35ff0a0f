"""Machine snapshots in a directory: what ``Machine.snapshot``/``restore``/``fork`` write and read.

A snapshot directory holds:

``state.kemu``
    the stream of :mod:`kemu.state`: its header carries the machine's
    fingerprint (board, CPU model, -smp, RAM size, the devices in their
    slots), the memory file's size and per-MiB CRC-32s and the disks; its
    payload the machine configuration and every vCPU's and device's state.
``memory.ram``
    guest RAM as a sparse file (all-zero MiBs are holes): the RAM regions end
    to end in guest-physical order (RAM offsets, :class:`kemu.memory.GuestMemory`;
    the header lists each region's base and size), which a restored machine
    maps MAP_PRIVATE, each region from its offset: copies share its pages
    until they write them.
``diskN.raw``
    each writable disk as it was at the pause, copied through its backend
    (raw or qcow2, any backing chain) into a sparse raw file.  The running
    machine goes on with its own image; a restored machine gets a new qcow2
    overlay whose backing file is ``diskN.raw``, so copies never see each
    other's writes and the snapshot stays as it was.  (A copy rather than
    freezing the running image under an overlay: the directory is
    self-contained, and the user's image keeps being the one written.)
    Read-only disks are not copied; the restored machine opens the same image.
"""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import replace
from pathlib import Path

from kemu import state as st
from kemu.machines.config import DeviceConfig, DriveConfig, MachineConfig, NetdevConfig
from kemu.machines.rtc import RtcConfig
from kemu.state import StateError

STATE_FILE = "state.kemu"
MEMORY_FILE = "memory.ram"
CHUNK = 1 << 20
_ZERO = bytes(CHUNK)
#: CRC recorded for a chunk that is all zeros (a hole in the memory file).
ZERO_CHUNK = -1


# -- configuration -----------------------------------------------------------------------------
#: The keys of ``config.extra`` that shape the machine itself (-M microvm,pcie=on,
#: acpi=off; KVM eventfds), carried in a snapshot; the rest are the process's own
#: (monitors, QMP sockets, VNC, pidfile) and stay behind.
BOARD_EXTRA = ("acpi", "pcie", "eventfds")


def config_to_plain(config: MachineConfig) -> dict:
    board_extra = {k: config.extra[k] for k in BOARD_EXTRA
                   if isinstance(config.extra.get(k), bool)}
    data = st.to_plain(replace(config, globals={}, extra=board_extra, dumpdtb=None))
    data["globals"] = [[d, p, v] for (d, p), v in config.globals.items()]
    return data


def config_from_plain(data: dict) -> MachineConfig:
    try:
        plain = dict(data)
        globals_ = {(str(d), str(p)): str(v) for d, p, v in plain.pop("globals", [])}
        config = st.from_plain(MachineConfig, plain)
        config.drives = [st.from_plain(DriveConfig, d) if isinstance(d, dict) else d
                         for d in config.drives]
        config.devices = [st.from_plain(DeviceConfig, d) if isinstance(d, dict) else d
                          for d in config.devices]
        config.netdevs = [st.from_plain(NetdevConfig, d) if isinstance(d, dict) else d
                          for d in config.netdevs]
        if isinstance(config.rtc, dict):
            config.rtc = RtcConfig(**config.rtc)
        config.globals = globals_
        config.extra = {k: v for k, v in (config.extra or {}).items()
                        if k in BOARD_EXTRA and isinstance(v, bool)}
        return config
    except (TypeError, ValueError) as e:
        raise StateError(f"snapshot: corrupted machine configuration ({e})") from None


# -- memory -------------------------------------------------------------------------------------
def write_memory(path: Path, memory) -> list[int]:
    """Guest RAM (the regions end to end: RAM offsets) to a sparse file; the CRC-32
    of each MiB (:data:`ZERO_CHUNK` for a hole)."""
    size = memory.size
    crcs: list[int] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for off in range(0, size, CHUNK):
            n = min(CHUNK, size - off)
            if memory.ram_is_zero(off, n):
                crcs.append(ZERO_CHUNK)
                continue
            chunk = memory.ram_read(off, n)
            crcs.append(zlib.crc32(chunk))
            os.pwrite(fd, chunk, off)
    finally:
        os.close(fd)
    return crcs


def open_memory(path: Path, size: int, crcs: list, verify: bool = True) -> int:
    """The memory file's fd, checked against the header (size, and the CRC of
    every non-zero MiB with ``verify``)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise StateError(f"snapshot: cannot open {path}: {e.strerror}") from None
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise StateError(f"snapshot: {path.name} is {actual} bytes, its header says {size} "
                             f"(truncated?)")
        if not isinstance(crcs, list) or len(crcs) != (size + CHUNK - 1) // CHUNK:
            raise StateError("snapshot: corrupted header (memory checksums)")
        if verify:
            for i, crc in enumerate(crcs):
                if crc != ZERO_CHUNK and zlib.crc32(os.pread(fd, CHUNK, i * CHUNK)) != crc:
                    raise StateError(f"snapshot: {path.name} is corrupted (MiB {i} does not "
                                     f"match its checksum)")
        return fd
    except BaseException:
        os.close(fd)
        raise


# -- disks -----------------------------------------------------------------------------------------
def copy_disk(backend, path: Path) -> None:
    """The disk's contents as seen by the guest into a sparse raw file."""
    size = backend.size() if callable(backend.size) else backend.size
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for off in range(0, size, CHUNK):
            data = backend.read(off, min(CHUNK, size - off))
            if data != _ZERO[:len(data)]:
                os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def blk_backends_by_name(board) -> dict[str, object]:
    """The backend of each virtio-blk device (virtio-mmio and virtio-pci), by device name."""
    from kemu.devices.virtio.blk import VirtioBlk
    devices = [slot.device.device for slot in getattr(board, "virtio_slots", ())]
    pci = getattr(board, "pci", None)
    devices += pci.devices() if pci is not None else []
    return {d.name: d.backend for d in devices if isinstance(d, VirtioBlk)}


def blk_backends_by_drive(board, config: MachineConfig) -> dict[int, object]:
    """The backend of each -drive (by index in ``config.drives``)."""
    by_name = blk_backends_by_name(board)
    out = {}
    for i, drive in enumerate(config.drives):
        name = f"virtio-blk-{drive.id}" if drive.id is not None else f"virtio-blk{i}"
        if name in by_name:
            out[i] = by_name[name]
    return out


# -- whole snapshots ---------------------------------------------------------------------------
def save(board, config: MachineConfig, directory: Path) -> dict:
    """Write the paused ``board`` into ``directory``; returns the header.

    The caller holds the machine paused and its lock (no device or DMA moves).
    """
    directory.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    machine_state = board.save_state()
    memory = board.memory
    crcs = write_memory(directory / MEMORY_FILE, memory)
    disks = []
    for i, backend in blk_backends_by_drive(board, config).items():
        drive = config.drives[i]
        backend.flush()
        if drive.read_only:
            disks.append({"drive": i, "file": None})
            continue
        name = f"disk{i}.raw"
        copy_disk(backend, directory / name)
        disks.append({"drive": i, "file": name})
    header = {"machine": board.state_fingerprint(), "engine": board_engine(board),
              "memory": {"file": MEMORY_FILE, "size": memory.size,
                         "regions": memory.ram_layout(), "crcs": crcs},
              "disks": disks, "created": time.time(),
              "save_seconds": round(time.monotonic() - started, 4)}
    tmp = directory / (STATE_FILE + ".tmp")
    with open(tmp, "wb") as f:
        st.write_stream(f, header, {"config": config_to_plain(config), "board": machine_state})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / STATE_FILE)
    return header


def board_engine(board) -> str:
    """The CPU engine build a board's saved vCPUs depend on ("" for KVM: the kernel
    structures are checked field by field on restore)."""
    engine_id = getattr(board, "engine_id", None)
    return engine_id() if engine_id is not None else ""


def load(directory: Path) -> tuple[dict, dict]:
    """The header and payload of a snapshot directory, checked (one line on any fault)."""
    path = Path(directory) / STATE_FILE
    try:
        f = open(path, "rb")
    except OSError as e:
        raise StateError(f"snapshot: cannot open {path}: {e.strerror}") from None
    with f:
        header = st.read_header(f, f"snapshot {path}")
        payload = st.read_payload(f, header, f"snapshot {path}")
    if not isinstance(payload, dict) or "config" not in payload or "board" not in payload:
        raise StateError(f"snapshot {path}: corrupted payload")
    if header.get("engine"):
        from kemu.accel.tcg.aarch64 import engine_build
        if header["engine"] != engine_build():
            raise StateError(f"snapshot {path}: made by TCG engine {header['engine']}, this "
                             f"kemu runs {engine_build()}")
    return header, payload


def restored_config(directory: Path, header: dict, payload: dict, overlay_dir: Path,
                    tag: str) -> MachineConfig:
    """The snapshot's configuration, each copied disk replaced by a fresh qcow2
    overlay (in ``overlay_dir``, named with ``tag``) over the snapshot's copy."""
    from kemu.backends.qcow2.create import create_qcow2
    config = config_from_plain(payload["config"])
    config.snapshot = False
    overlay_dir.mkdir(parents=True, exist_ok=True)
    for disk in header.get("disks", []):
        try:
            i, name = int(disk["drive"]), disk["file"]
            drive = config.drives[i]
        except (KeyError, TypeError, ValueError, IndexError):
            raise StateError("snapshot: corrupted header (disks)") from None
        if name is None:
            continue
        base = (Path(directory) / str(name)).absolute()
        if base.parent != Path(directory).absolute() or not base.is_file():
            raise StateError(f"snapshot: disk file {name} is missing")
        overlay = overlay_dir / f"{tag}-disk{i}.qcow2"
        create_qcow2(overlay, base.stat().st_size, backing_file=str(base), backing_format="raw")
        config.drives[i] = replace(drive, path=overlay, format="qcow2", snapshot=False,
                                   warn_probed_raw=False)
    return config
