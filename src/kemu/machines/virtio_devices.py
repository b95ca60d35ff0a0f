"""Virtio devices from a machine configuration, for any board.

A board offers ``attach_virtio(device)``; this module turns ``-drive`` and
``-device`` configurations into virtio devices and attaches them, so both
boards get the same devices from the same config.
"""

from __future__ import annotations

from kemu.errors import ConfigError
from kemu.machines.config import DeviceConfig, DriveConfig, MachineConfig

#: -device drivers kemu offers, QEMU's names (the -pci spellings map to mmio).
VIRTIO_DRIVERS = {
    "virtio-rng-device": "rng", "virtio-rng-pci": "rng",
    "virtio-blk-device": "blk", "virtio-blk-pci": "blk",
}


def open_drive(drive: DriveConfig):
    from kemu.backends.block import open_image
    return open_image(drive.path, drive.format, drive.read_only)


def attach_devices(board, config: MachineConfig) -> list:
    """Create and attach the virtio devices the config asks for; returns the backends."""
    from kemu.devices.virtio.blk import VirtioBlk
    from kemu.devices.virtio.rng import VirtioRng

    backends = []
    by_id: dict[str, DriveConfig] = {}
    claimed: set[str] = set()
    for drive in config.drives:
        if drive.id is not None:
            if drive.id in by_id:
                raise ConfigError(f"-drive: duplicate id {drive.id!r}")
            by_id[drive.id] = drive
    for dev in config.devices:
        if dev.driver not in VIRTIO_DRIVERS:
            raise ConfigError(f"-device {dev.driver}: unsupported device "
                              f"(have: {', '.join(sorted(VIRTIO_DRIVERS))})")
    # Drives without an id (if=virtio) become virtio-blk devices in order,
    # as QEMU does; drives with an id wait for a -device virtio-blk-device,drive=ID.
    for index, drive in enumerate(config.drives):
        if drive.id is None:
            backend = open_drive(drive)
            backends.append(backend)
            board.attach_virtio(VirtioBlk(backend, serial=f"kemu-disk{index}",
                                          read_only=drive.read_only,
                                          name=f"virtio-blk{index}"))
    for dev in config.devices:
        kind = VIRTIO_DRIVERS[dev.driver]
        if kind == "rng":
            board.attach_virtio(VirtioRng())
        elif kind == "blk":
            drive_id = dev.props.get("drive")
            if drive_id is None or drive_id not in by_id:
                raise ConfigError(f"-device {dev.driver}: needs drive=ID naming a -drive")
            if drive_id in claimed:
                raise ConfigError(f"-device {dev.driver}: drive {drive_id!r} is already in use")
            claimed.add(drive_id)
            drive = by_id[drive_id]
            backend = open_drive(drive)
            backends.append(backend)
            board.attach_virtio(VirtioBlk(backend, serial=dev.props.get("serial", drive_id),
                                          read_only=drive.read_only, name=f"virtio-blk-{drive_id}"))
    unclaimed = set(by_id) - claimed
    if unclaimed:
        raise ConfigError(f"-drive id={sorted(unclaimed)[0]}: no -device uses this drive")
    return backends


def parse_drive(text: str) -> DriveConfig:
    """QEMU's ``-drive file=...,format=...,if=virtio,readonly=on,id=...,cache=...``."""
    from pathlib import Path
    props: dict[str, str] = {}
    for part in text.split(","):
        if "=" not in part:
            raise ConfigError(f"-drive: invalid parameter {part!r}")
        k, v = part.split("=", 1)
        props[k] = v
    if "file" not in props:
        raise ConfigError("-drive: file= is required")
    iface = props.pop("if", "virtio" if "id" not in props else "none")
    if iface not in ("virtio", "none"):
        raise ConfigError(f"-drive if={iface}: only if=virtio (and if=none with -device) "
                          "are supported")
    fmt = props.pop("format", None)
    if fmt not in (None, "raw", "qcow2"):
        raise ConfigError(f"-drive format={fmt}: supported formats are raw and qcow2")
    ro = props.pop("readonly", "off")
    if ro not in ("on", "off"):
        raise ConfigError(f"-drive readonly={ro}: expected on or off")
    cache = props.pop("cache", "writeback")
    if cache not in ("writeback", "writethrough", "none", "directsync", "unsafe"):
        raise ConfigError(f"-drive cache={cache}: unknown cache mode")
    drive_id = props.pop("id", None)
    drive = DriveConfig(Path(props.pop("file")), fmt, ro == "on",
                        drive_id if iface == "none" else None, cache)
    props.pop("media", None)
    if props:
        raise ConfigError(f"-drive: unsupported parameter {next(iter(props))}")
    return drive


def parse_device(text: str) -> DeviceConfig:
    parts = text.split(",")
    props = {}
    for part in parts[1:]:
        if "=" not in part:
            raise ConfigError(f"-device {parts[0]}: invalid parameter {part!r}")
        k, v = part.split("=", 1)
        props[k] = v
    return DeviceConfig(parts[0], props)
