"""``-object TYPE,id=ID,...`` (keyval or JSON) and QMP's ``object-add``: memory
backends and secrets.

Types and properties are one table (:data:`OBJECT_TYPES`): the parser takes
exactly those, ``qom-list-properties`` lists exactly those.
"""

from __future__ import annotations

import base64
import os

from kemu.errors import ConfigError, StartupError
from kemu.machines.config import MachineConfig, ObjectConfig
from kemu.options.keyval import parse_bool, parse_option, parse_size

#: type -> {property: (QOM type, description)}
OBJECT_TYPES: dict[str, dict[str, tuple[str, str]]] = {
    "memory-backend-ram": {
        "size": ("int", "Size of the memory region (ex: 500M)"),
        "share": ("bool", "Mark the memory as private to QEMU or shared"),
        "dump": ("bool", "Set to 'off' to exclude from core dump"),
        "merge": ("bool", "Mark memory as mergeable"),
        "prealloc": ("bool", "Preallocate memory"),
    },
    "memory-backend-file": {
        "size": ("int", "Size of the memory region (ex: 500M)"),
        "share": ("bool", "Mark the memory as private to QEMU or shared"),
        "mem-path": ("string", "File to be used as backing store for the memory"),
        "dump": ("bool", "Set to 'off' to exclude from core dump"),
        "merge": ("bool", "Mark memory as mergeable"),
        "prealloc": ("bool", "Preallocate memory"),
        "discard-data": ("bool", "Discard the file's data when the backend goes"),
    },
    "secret": {
        "data": ("string", "The secret's value (inline)"),
        "file": ("string", "A file holding the secret's value"),
        "format": ("QCryptoSecretFormat", "raw or base64"),
        "keyid": ("string", "The id of a secret the data is encrypted with"),
        "iv": ("string", "The initialization vector (base64)"),
    },
}

#: Properties kemu takes and ignores, as QEMU's defaults make them (merge and
#: prealloc: kemu asks the host for nothing special; dump: no core dumps of RAM).
_NO_OP = {"dump", "merge", "prealloc", "discard-data"}


def parse_object(text: str, option: str = "-object") -> ObjectConfig:
    props = parse_option(text, option, implied="qom-type")
    return object_from_props(props, f"{option} {text}")


def object_from_props(props: dict[str, str], where: str) -> ObjectConfig:
    props = dict(props)
    qom_type = props.pop("qom-type", "")
    if not qom_type:
        raise ConfigError(f"{where}: Parameter 'qom-type' is missing")
    if qom_type not in OBJECT_TYPES:
        raise StartupError(f"{where}: Parameter 'qom-type' does not accept value '{qom_type}'")
    obj_id = props.pop("id", "")
    if not obj_id:
        raise StartupError(f"{where}: Parameter 'id' is missing")
    known = OBJECT_TYPES[qom_type]
    for key in props:
        if key not in known:
            raise StartupError(f"{where}: Property '{qom_type}.{key}' not found")
    obj = ObjectConfig(qom_type, obj_id, props)
    _check(obj, where)
    return obj


def _check(obj: ObjectConfig, where: str) -> None:
    p = obj.props
    for key in ("share", "dump", "merge", "prealloc", "discard-data"):
        if key in p:
            parse_bool(p[key], key)
    if obj.qom_type.startswith("memory-backend"):
        if "size" not in p:
            raise StartupError(f"{where}: can't create backend with size 0")
        size = parse_size(p["size"], default_unit="B")
        if size <= 0 or size % 4096:
            raise StartupError(f"{where}: size={p['size']}: must be a positive multiple "
                               "of the page size")
        if obj.qom_type == "memory-backend-file" and not p.get("mem-path"):
            raise StartupError(f"{where}: mem-path property not set")
    elif obj.qom_type == "secret":
        if ("data" in p) == ("file" in p):
            raise StartupError(f"{where}: Either 'data' or 'file' must be provided")
        if p.get("format", "raw") not in ("raw", "base64"):
            raise StartupError(f"{where}: format={p['format']}: expected raw or base64")
        if "keyid" in p:
            raise StartupError(f"{where}: keyid: kemu takes secrets in the clear "
                               "(data= or file=), not encrypted with another secret")
        secret_value(obj)          # a file that cannot be read fails now, as in QEMU


def secret_value(obj: ObjectConfig) -> bytes:
    """A secret object's bytes (from data= or file=, decoded per format=)."""
    if "file" in obj.props:
        try:
            with open(obj.props["file"], "rb") as f:
                data = f.read(1 << 20)
        except OSError as e:
            raise StartupError(f"-object secret,id={obj.id}: Unable to read "
                               f"{obj.props['file']}: {e.strerror or e}") from None
    else:
        data = obj.props["data"].encode()
    if obj.props.get("format", "raw") == "base64":
        try:
            return base64.b64decode(data, validate=True)
        except ValueError:
            raise StartupError(f"-object secret,id={obj.id}: the data is not "
                               "valid base64") from None
    return data



def memory_backend(config: MachineConfig) -> ObjectConfig | None:
    """The -object that -machine memory-backend= names (checked), or None."""
    if config.memory_backend is None:
        return None
    obj = config.objects.get(config.memory_backend)
    if obj is None or not obj.qom_type.startswith("memory-backend"):
        raise StartupError(f"-machine memory-backend={config.memory_backend}: "
                           "Memory backend not found" if obj is None else
                           f"-machine memory-backend={config.memory_backend}: "
                           f"'{obj.qom_type}' is not a memory backend")
    return obj


def apply_memory_backend(config: MachineConfig, memory_given: bool) -> None:
    """Size guest RAM from the backend; with -m too, the two must agree (as QEMU)."""
    obj = memory_backend(config)
    if obj is None:
        return
    size = parse_size(obj.props["size"], default_unit="B")
    if memory_given and size != config.memory:
        raise StartupError("Machine memory size does not match the size of the memory "
                           "backend")
    config.memory = size
    path = obj.props.get("mem-path")
    if path is not None and os.path.isdir(path):
        raise StartupError(f"-object {obj.qom_type},id={obj.id}: mem-path={path}: kemu "
                           "maps a file, not a directory of temporary files")


def ram_regions(config: MachineConfig, layout: list[tuple[int, int]],
                backing: int | None = None):
    """Guest RAM for a board's ``(base, size)`` layout, from -machine memory-backend=
    when given (the file's pages in layout order; shared with share=on), or
    from ``backing``, a snapshot's memory file (the regions end to end, mapped
    private: a restored machine)."""
    from kemu.memory import RamRegion
    if backing is not None:
        regions, offset = [], 0
        for base, size in layout:
            regions.append(RamRegion(base, size, offset=offset, backing=backing))
            offset += size
        return regions
    obj = memory_backend(config)
    if obj is None:
        return [RamRegion(base, size) for base, size in layout]
    shared = parse_bool(obj.props.get("share", "off"), "share")
    path = obj.props.get("mem-path")
    regions, offset = [], 0
    for base, size in layout:
        regions.append(RamRegion(base, size, obj.id, path=path, offset=offset, shared=shared))
        offset += size
    return regions
