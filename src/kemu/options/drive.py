"""``-drive``: a disk image behind a virtio-blk device (QEMU's legacy block option)."""

from __future__ import annotations

from kemu.backends.block_error import DEFAULT_RERROR, DEFAULT_WERROR, ON_ERROR
from kemu.errors import ConfigError
from kemu.machines.config import DriveConfig
from kemu.options.keyval import split_opts


#: QEMU's -drive aio= values; kemu does synchronous pread/pwrite with any of them.
AIO_MODES = ("threads", "native", "io_uring")


def _number(value: str | None, key: str) -> int | None:
    if value is None:
        return None
    try:
        number = int(value, 0)
    except ValueError:
        number = -1
    if number < 0:
        raise ConfigError(f"-drive {key}={value}: expected a non-negative number")
    return number


def parse_drive(text: str) -> DriveConfig:
    """QEMU's ``-drive file=...,format=...,if=virtio,readonly=on,id=...,cache=...``."""
    from pathlib import Path
    props: dict[str, str] = {}
    for part in split_opts(text):
        if "=" not in part:
            raise ConfigError(f"-drive: invalid parameter {part!r}")
        k, v = part.split("=", 1)
        props[k] = v
    if "file" not in props:
        raise ConfigError("-drive: file= is required")
    iface = props.pop("if", "virtio" if "id" not in props else "none")
    if iface not in ("virtio", "none", "pflash"):
        raise ConfigError(f"-drive if={iface}: only if=virtio, if=pflash (and if=none with "
                          "-device) are supported")
    unit = _number(props.pop("unit", None), "unit")
    index = _number(props.pop("index", None), "index")
    if unit is not None and index is not None:
        raise ConfigError("-drive: index cannot be used with bus and unit")
    media = props.pop("media", "disk")
    if media not in ("disk", "cdrom"):
        raise ConfigError(f"-drive media={media}: invalid media")
    if media == "cdrom":
        props["readonly"] = "on"      # as QEMU's drive_new
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
    if "locking" in props:
        # as QEMU: locking belongs to the file (protocol) layer, not to the format
        raise ConfigError(f"-drive: Block format '{fmt or 'raw'}' does not support the option "
                          f"'locking' (use file.locking)")
    locking = props.pop("file.locking", "auto")
    if locking not in ("on", "off", "auto"):
        raise ConfigError(f"-drive file.locking={locking}: expected on, off or auto")
    policies = {}
    for key, default in (("werror", DEFAULT_WERROR), ("rerror", DEFAULT_RERROR)):
        policies[key] = props.pop(key, default)
        if policies[key] not in ON_ERROR:
            raise ConfigError(f"-drive {key}={policies[key]}: expected one of "
                              f"{', '.join(ON_ERROR)}")
    aio = props.pop("aio", "threads")
    if aio not in AIO_MODES:
        raise ConfigError(f"-drive aio={aio}: expected threads, native or io_uring")
    if aio == "native" and cache not in ("none", "directsync"):
        # as QEMU (raw_open_common): Linux AIO needs O_DIRECT
        raise ConfigError("-drive aio=native was specified, but it requires cache.direct=on "
                          "(cache=none or cache=directsync)")
    snapshot = props.pop("snapshot", "off")
    if snapshot not in ("on", "off"):
        raise ConfigError(f"-drive snapshot={snapshot}: expected on or off")
    drive = DriveConfig(Path(props.pop("file")), fmt, ro == "on",
                        drive_id if iface == "none" else None, cache, locking=locking,
                        aio=aio, snapshot=snapshot == "on", **policies)
    drive.interface = iface
    drive.unit = unit if unit is not None else index
    if props:
        raise ConfigError(f"-drive: unsupported parameter {next(iter(props))}")
    return drive


