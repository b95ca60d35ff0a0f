"""``-blockdev`` (keyval or JSON) and QMP's ``blockdev-add``: block nodes, and the
drives that ``-device ...,drive=NODE`` makes of them.

A ``file`` node is a host file (``filename``); a ``raw`` or ``qcow2`` node reads
the node its ``file`` names (or one given inline: ``file.driver=file,
file.filename=...``).  As in QEMU, a node's file is opened (here: checked)
when the option is read, so a missing file is one line and exit status 1.
"""

from __future__ import annotations

import os
from pathlib import Path

from kemu.errors import ConfigError, StartupError
from kemu.machines.config import BlockdevConfig, DriveConfig, MachineConfig
from kemu.options.keyval import parse_bool, parse_option

#: driver -> the options kemu takes for it (QEMU's names; see BlockdevOptions*).
BLOCKDEV_DRIVERS: dict[str, set[str]] = {
    "file": {"filename", "locking", "aio", "aio-max-batch", "drop-cache",
             "x-check-cache-dropped", "pr-manager"},
    "raw": {"file", "offset", "size"},
    "qcow2": {"file", "backing", "lazy-refcounts", "pass-discard-request",
              "pass-discard-snapshot", "pass-discard-other", "cache-size",
              "l2-cache-size", "refcount-cache-size", "cache-clean-interval"},
}
#: Options of every node (BlockdevOptions' base members).
COMMON = {"driver", "node-name", "read-only", "auto-read-only", "discard", "cache.direct",
          "cache.no-flush", "detect-zeroes", "force-share"}


def parse_blockdev(text: str, config: MachineConfig, option: str = "-blockdev") -> str:
    """Add the node(s) of one -blockdev to ``config``; returns the top node's name."""
    props = parse_option(text, option)
    return add_blockdev(props, config, f"{option} {text}")


def add_blockdev(props: dict[str, str], config: MachineConfig, where: str,
                 prefix: str = "") -> str:
    props = dict(props)
    driver = props.pop("driver", "")
    if not driver:
        raise ConfigError(f"{where}: Parameter '{prefix}driver' is missing")
    if driver not in BLOCKDEV_DRIVERS:
        raise StartupError(f"{where}: Parameter '{prefix}driver' does not accept value "
                           f"'{driver}' (kemu has {', '.join(sorted(BLOCKDEV_DRIVERS))})")
    child = {k[5:]: v for k, v in props.items() if k.startswith("file.")}
    props = {k: v for k, v in props.items() if not k.startswith("file.")}
    node = props.pop("node-name", "")
    if not node:
        if prefix:
            node = f"#block{len(config.blockdevs):03d}"
        else:
            raise StartupError(f"{where}: A node-name is required")
    if node in config.blockdevs:
        raise StartupError(f"{where}: Duplicate nodes with node-name='{node}'")
    for key in props:
        if key not in BLOCKDEV_DRIVERS[driver] | COMMON:
            raise StartupError(f"{where}: Invalid parameter '{prefix}{key}'")
    for key in ("read-only", "auto-read-only", "cache.direct", "cache.no-flush",
                "force-share"):
        if key in props:
            parse_bool(props[key], key)
    if props.get("backing") not in (None, "null", ""):
        raise StartupError(f"{where}: backing={props['backing']}: kemu opens qcow2 "
                           "images without a backing file")
    read_only = parse_bool(props.get("read-only", "off"), "read-only")
    file_node = None
    if driver == "file":
        filename = props.get("filename", "")
        if not filename:
            raise StartupError(f"{where}: Parameter '{prefix}filename' is missing")
        try:
            os.stat(filename)
        except OSError as e:
            raise StartupError(f"{where}: Could not open '{filename}': "
                               f"{e.strerror or e}") from None
        if props.get("aio", "threads") not in ("threads", "native", "io_uring"):
            raise StartupError(f"{where}: aio={props['aio']}: expected threads, native "
                               "or io_uring")
    else:
        if child:
            file_node = add_blockdev(child, config, where, prefix=f"{prefix}file.")
        else:
            file_node = props.pop("file", "")
            if not file_node:
                raise StartupError(f"{where}: Parameter '{prefix}file' is missing")
            if file_node not in config.blockdevs:
                raise StartupError(f"{where}: Cannot find device='' nor "
                                   f"node-name='{file_node}'")
        props.pop("file", None)
    config.blockdevs[node] = BlockdevConfig(driver, node, props, file_node, read_only)
    return node


def drive_for_node(config: MachineConfig, node: str) -> DriveConfig:
    """The disk a device gets when its ``drive=`` names block node ``node``."""
    top = config.blockdevs[node]
    protocol = top if top.file is None else config.blockdevs[top.file]
    if protocol.driver != "file":
        raise StartupError(f"-blockdev node-name={node}: a {top.driver} node needs a file "
                           "node beneath it")
    fmt = "raw" if top.file is None else top.driver
    p = protocol.props
    direct = parse_bool(p.get("cache.direct", top.props.get("cache.direct", "off")),
                        "cache.direct")
    no_flush = parse_bool(top.props.get("cache.no-flush", "off"), "cache.no-flush")
    cache = "unsafe" if no_flush else ("none" if direct else "writeback")
    read_only = top.read_only or protocol.read_only
    return DriveConfig(Path(p["filename"]), fmt, read_only, node,
                       cache, warn_probed_raw=False,
                       locking=p.get("locking", "auto"), aio=p.get("aio", "threads"),
                       node_name=node)


def resolve_device_drives(config: MachineConfig) -> None:
    """Each -device drive= names a -drive id or a block node (QEMU looks up both)."""
    drive_ids = {d.id for d in config.drives if d.id is not None}
    for dev in config.devices:
        name = dev.props.get("drive")
        if name is None or name in drive_ids:
            continue
        if name not in config.blockdevs:
            raise StartupError(f"-device {dev.driver}: Property '{dev.driver}.drive' can't "
                               f"find value '{name}'")
        config.drives.append(drive_for_node(config, name))
        drive_ids.add(name)
