"""QMP's view of a running machine's parts, in QEMU's shapes: chardevs, block
devices and nodes, the QOM tree's peripherals; and the device, object and
block-node commands, which parse their arguments with kemu.options as the
command line does.
"""

from __future__ import annotations

from dataclasses import dataclass

from kemu.errors import KemuError
from kemu.machines.config import DriveConfig
from kemu.qmp.protocol import QmpError


@dataclass(frozen=True)
class Disk:
    """A drive as QMP names it: ``device`` (the -drive id, ``virtio<N>``, or "" for
    -blockdev nodes), ``qdev`` (the QOM path of the virtio device), ``name`` (kemu's
    device name, to find its counters)."""

    drive: DriveConfig
    device: str
    qdev: str
    name: str
    node_name: str


def disks(config) -> list[Disk]:
    owners = {d.props.get("drive"): d for d in config.devices if "drive" in d.props}
    anon = 0
    out = []
    for index, drive in enumerate(config.drives):
        dev = owners.get(drive.id) if drive.id is not None else None
        if dev is not None and "id" in dev.props:
            qdev = f"/machine/peripheral/{dev.props['id']}/virtio-backend"
        else:
            qdev = f"/machine/peripheral-anon/device[{anon}]/virtio-backend"
            anon += 1
        device = "" if drive.node_name else (drive.id or f"virtio{index}")
        name = f"virtio-blk-{drive.id}" if drive.id is not None else f"virtio-blk{index}"
        out.append(Disk(drive, device, qdev, name,
                        drive.node_name or f"#block{index:03d}"))
    return out


def _image(drive: DriveConfig) -> dict:
    from kemu.backends.block import detect_format
    from kemu.img import image_info
    try:
        return image_info(drive.path, drive.format or detect_format(drive.path),
                          force_share=True)
    except (OSError, KemuError):
        # The image went away or changed under the machine: what the drive was opened as.
        return {"filename": str(drive.path), "format": drive.format or "raw",
                "virtual-size": 0, "dirty-flag": False}


def _node_info(disk: Disk) -> dict:
    d = disk.drive
    image = _image(d)
    return {"node-name": disk.node_name, "file": str(d.path), "ro": d.read_only,
            "drv": image["format"], "image": image, "encrypted": False,
            "backing_file_depth": 0, "detect_zeroes": "off", "write_threshold": 0,
            "cache": {"writeback": d.cache != "writethrough",
                      "direct": d.cache in ("none", "directsync"),
                      "no-flush": d.cache == "unsafe"},
            "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}


def query_block(config) -> list[dict]:
    return [{"device": disk.device, "qdev": disk.qdev, "locked": False, "removable": False,
             "type": "unknown", "inserted": _node_info(disk)} for disk in disks(config)]


def query_named_block_nodes(config) -> list[dict]:
    return [_node_info(disk) for disk in disks(config)]


def query_blockstats(vm) -> list[dict]:
    devices = {getattr(dev, "name", ""): dev for dev in vm.virtio_devices()}
    out = []
    for disk in disks(vm.config):
        counters = getattr(devices.get(disk.name), "stats", None)
        stats = {key: getattr(counters, key, 0) for key in
                 ("rd_bytes", "wr_bytes", "rd_operations", "wr_operations",
                  "flush_operations", "wr_highest_offset")}
        stats.update({"rd_total_time_ns": 0, "wr_total_time_ns": 0,
                      "flush_total_time_ns": 0, "rd_merged": 0, "wr_merged": 0,
                      "unmap_operations": 0, "unmap_bytes": 0, "unmap_merged": 0,
                      "unmap_total_time_ns": 0, "failed_rd_operations": 0,
                      "failed_wr_operations": 0, "failed_flush_operations": 0,
                      "failed_unmap_operations": 0, "invalid_rd_operations": 0,
                      "invalid_wr_operations": 0, "invalid_flush_operations": 0,
                      "invalid_unmap_operations": 0, "account_invalid": False,
                      "account_failed": False, "idle_time_ns": 0, "timed_stats": []})
        out.append({"device": disk.device, "qdev": disk.qdev, "node-name": disk.node_name,
                    "stats": stats})
    return out


def query_chardev(config) -> list[dict]:
    filenames = config.extra.get("chardev_filenames", {})
    out = []
    for cd in config.chardevs.values():
        if cd.id in filenames:
            filename = filenames[cd.id]
        elif cd.backend == "socket":
            from kemu.options.chardev import socket_address
            filename = socket_address(cd).describe()
        else:
            filename = cd.backend
        out.append({"label": cd.id, "filename": filename, "frontend-open": True})
    return out


def qom_list(config, path: str) -> list[dict]:
    path = path.rstrip("/") or "/"
    if path == "/":
        return [{"name": "machine", "type": "child<container>"},
                {"name": "objects", "type": "child<container>"}]
    if path == "/machine":
        return [{"name": n, "type": "child<container>"}
                for n in ("peripheral", "peripheral-anon", "unattached")]
    if path == "/machine/peripheral":
        return [{"name": d.props["id"], "type": f"child<{d.driver}>"}
                for d in [*config.devices, *config.extra.get("board_devices", ())]
                if "id" in d.props]
    if path == "/objects":
        return [{"name": o.id, "type": f"child<{o.qom_type}>"} for o in config.objects.values()]
    if path in ("/machine/peripheral-anon", "/machine/unattached"):
        return []
    raise QmpError(f"Device '{path}' not found", "DeviceNotFound")


# -- commands that add and remove parts ------------------------------------------------------

def device_add(config, args: dict) -> None:
    """Parsed as -device is; kemu's boards put devices on virtio-mmio slots, which
    (as in QEMU) take no hot-plugged devices."""
    from kemu.options.device import device_from_qmp
    try:
        dev = device_from_qmp(args)
    except KemuError as e:
        raise QmpError(str(e).removeprefix("device_add: ")) from None
    from kemu.listings import DEVICE_PROPERTIES
    if dev.driver not in DEVICE_PROPERTIES:
        raise QmpError(f"'{dev.driver}' is not a valid device model name")
    raise QmpError("Bus 'virtio-mmio-bus.0' does not support hotplugging")


def device_del(config, args: dict) -> None:
    dev_id = args.get("id", "")
    if not any(d.props.get("id") == dev_id for d in config.devices):
        raise QmpError(f"Device '{dev_id}' not found", "DeviceNotFound")
    raise QmpError(f"Bus 'virtio-mmio-bus.0' does not support hotplugging "
                   f"(device '{dev_id}' stays)")


def object_add(config, args: dict) -> None:
    from kemu.options.keyval import add_by_id, qmp_arguments
    from kemu.options.objects import object_from_props
    try:
        obj = object_from_props(qmp_arguments(args, "object-add"), "object-add")
        if obj.qom_type != "secret":
            raise QmpError(f"object-add {obj.qom_type}: kemu cannot add memory to a "
                           "machine that exists")
        add_by_id(config.objects, obj.id, obj, "object-add")
    except KemuError as e:
        raise QmpError(str(e).removeprefix("object-add: ")) from None


def object_del(config, args: dict) -> None:
    obj_id = args.get("id", "")
    obj = config.objects.get(obj_id)
    if obj is None:
        raise QmpError(f"object '{obj_id}' not found")
    if obj_id == config.memory_backend:
        raise QmpError(f"object '{obj_id}' is in use, can not be deleted")
    del config.objects[obj_id]


def blockdev_add(config, args: dict) -> None:
    from kemu.options.blockdev import add_blockdev
    from kemu.options.keyval import qmp_arguments
    try:
        add_blockdev(qmp_arguments(args, "blockdev-add"), config, "blockdev-add")
    except KemuError as e:
        raise QmpError(str(e).removeprefix("blockdev-add: ")) from None


def blockdev_del(config, args: dict) -> None:
    node = args.get("node-name", "")
    if node not in config.blockdevs:
        raise QmpError(f"Failed to find node with node-name='{node}'")
    users = [d.node_name for d in config.drives] + [
        b.file for b in config.blockdevs.values()]
    if node in users:
        raise QmpError(f"Node '{node}' is busy: node is used as backing hd of a device")
    del config.blockdevs[node]
