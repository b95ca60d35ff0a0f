"""QMP introspection: what kemu is and can do, from kemu's own tables.

Management tools (libvirt's capability probe) decide what to ask of an
emulator from these answers, so each one is generated from the table that
also drives kemu, never written out by hand:

* ``query-qmp-schema``: from the command table (:class:`kemu.qmp.commands.Commands`)
  and :data:`EVENTS`;
* ``query-machines``, ``qom-list-properties`` on machines: from the builder's boards
  and :data:`kemu.options.machine.MACHINE_PROPERTIES`;
* ``qom-list-types``, ``device-list-properties``: from the ``-device`` table
  (:mod:`kemu.listings`), the ``-object`` and ``-chardev`` tables;
* ``query-cpu-definitions``: from the TCG engine's CPU models;
* ``query-command-line-options``: from the option parsers' own tables.
"""

from __future__ import annotations

from kemu.qmp.protocol import QmpError

#: Every event kemu sends, with its data members (kemu.api emits them).
EVENTS: dict[str, dict[str, type]] = {
    "SHUTDOWN": {"guest": bool, "reason": str},
    "POWERDOWN": {},
    "RESET": {"guest": bool, "reason": str},
    "STOP": {},
    "RESUME": {},
    "GUEST_PANICKED": {"action": str},
    "BLOCK_IO_ERROR": {"device": str, "node-name": str, "operation": str, "action": str,
                       "nospace": bool, "reason": str},
    # kemu.display.vnc: QEMU's VncBasicInfo / VncServerInfo and VncClientInfo objects
    "VNC_CONNECTED": {"server": dict, "client": dict},
    "VNC_INITIALIZED": {"server": dict, "client": dict},
    "VNC_DISCONNECTED": {"server": dict, "client": dict},
    "MIGRATION": {"status": str},
    "MIGRATION_PASS": {"pass": int},
    "DUMP_COMPLETED": {"result": dict, "error": str},     # kemu.dump
    "JOB_STATUS_CHANGE": {"id": str, "status": str},       # kemu.qmp.jobs
}

_BUILTIN = {str: ("str", "string"), int: ("int", "int"), bool: ("bool", "boolean"),
            float: ("number", "number"), list: ("any", "value"), dict: ("any", "value"),
            object: ("any", "value")}

#: Command features (QEMU's 'features' in the schema): -device and device_add take JSON.
FEATURES = {"device_add": ["json-cli", "json-cli-hotplug"]}


def target(config) -> str:
    """The guest architecture (query-target): the emulator's (``kemu-system-x86_64``),
    else the board's: x86_64 for microvm, aarch64 otherwise."""
    from kemu.machines.builder import TARGETS
    return config.target or TARGETS.get(config.machine, "aarch64")


def _object_type(name: str, members: dict[str, type], types: dict[str, dict]) -> str:
    if not members:
        name = "q_empty"
    types[name] = {"name": name, "meta-type": "object",
                   "members": [{"name": key, "type": _BUILTIN[kind][0], "default": None}
                               for key, kind in members.items()]}
    return name


def _enum(name: str, values: list[str], types: dict[str, dict]) -> str:
    types[name] = {"name": name, "meta-type": "enum", "values": sorted(values),
                   "members": [{"name": v} for v in sorted(values)]}
    return name


def _open_args(name: str, discriminator: str, values: list[str],
               types: dict[str, dict]) -> str:
    """Arguments the options package parses (device_add, object-add, blockdev-add):
    a discriminator enum and a ``gen`` object (any further members)."""
    enum = _enum(f"{name}-{discriminator}", values, types)
    types[f"q_obj_{name}-arg"] = {
        "name": f"q_obj_{name}-arg", "meta-type": "object",
        "members": [{"name": discriminator, "type": enum if values else "str"},
                    {"name": "id", "type": "str", "default": None}]}
    return f"q_obj_{name}-arg"


def qmp_schema(table: dict) -> list[dict]:
    """``query-qmp-schema``: SchemaInfo for every command and event kemu has."""
    from kemu.listings import DEVICE_PROPERTIES
    from kemu.options.blockdev import BLOCKDEV_DRIVERS
    from kemu.options.objects import OBJECT_TYPES

    types: dict[str, dict] = {}
    open_args = {"device_add": ("driver", sorted(DEVICE_PROPERTIES)),
                 "object-add": ("qom-type", sorted(OBJECT_TYPES)),
                 "blockdev-add": ("driver", sorted(BLOCKDEV_DRIVERS))}
    out = []
    for name in sorted(set(table) | {"qmp_capabilities"}):
        spec = table[name][1] if name in table else {}
        if name in open_args:
            arg_type = _open_args(name, *open_args[name], types)
        else:
            arg_type = _object_type(f"q_obj_{name}-arg", spec or {}, types)
        entry = {"name": name, "meta-type": "command", "arg-type": arg_type,
                 "ret-type": "any"}
        if name in FEATURES:
            entry["features"] = FEATURES[name]
        out.append(entry)
    for name, members in EVENTS.items():
        out.append({"name": name, "meta-type": "event",
                    "arg-type": _object_type(f"q_obj_{name}-arg", members, types)})
    for name, json_type in {v for v in _BUILTIN.values()}:
        types[name] = {"name": name, "meta-type": "builtin", "json-type": json_type}
    return out + list(types.values())


# -- boards, devices, objects ----------------------------------------------------------------

def _machines(tgt: str) -> list[str]:
    from kemu.machines.builder import MACHINES, TARGETS
    return [m for m in MACHINES if TARGETS.get(m, tgt) == tgt]


def query_machines(config) -> list[dict]:
    """The boards of this emulator's target that run on the accelerator in use
    (libvirt probes once per accelerator: kemu's microvm is not offered on TCG)."""
    from kemu.machines.builder import board_accels
    from kemu.options.machine import CANONICAL
    out = []
    tgt = target(config)
    for board in _machines(tgt):
        if config.accel not in board_accels(board, tgt):
            continue
        info = {"name": CANONICAL.get(board, board), "hotpluggable-cpus": False,
                "numa-mem-supported": False, "deprecated": False, "cpu-max": _max_cpus(board)}
        if board in CANONICAL:
            info["alias"] = board
        if board == "virt":
            info.update({"default-cpu-type": "cortex-a57-arm-cpu",
                         "default-ram-id": "mach-virt.ram"})
        elif board == "microvm":
            info.update({"default-cpu-type": "host-x86_64-cpu", "default-ram-id": "microvm.ram"})
        out.append(info)
    return out


def _max_cpus(board: str) -> int:
    if board == "virt":                 # with gic-version=3 (libvirt picks it past 8)
        from kemu.machines.arm64_virt import MAX_CPUS_GICV3
        return MAX_CPUS_GICV3
    if board == "microvm":
        from kemu.machines import x86_microvm
        return x86_microvm.MAX_VCPUS
    return 1


def cpu_models(config) -> list[str]:
    if target(config) == "x86_64":
        from kemu.options.argv import X86_CPU_MODELS
        return list(X86_CPU_MODELS)
    from kemu.accel.tcg.aarch64 import CPU_MODELS
    return sorted(CPU_MODELS)


def _cpu_type(config, model: str) -> str:
    return f"{model}-{'x86_64' if target(config) == 'x86_64' else 'arm'}-cpu"


def query_cpu_definitions(config) -> list[dict]:
    return [{"name": m, "typename": _cpu_type(config, m), "static": False,
             "migration-safe": False, "deprecated": False} for m in cpu_models(config)]


#: Board devices that are there without -device (not user-creatable), by target.
BOARD_DEVICES = {"aarch64": [("pl011", "sys-bus-device"), ("pl031", "sys-bus-device"),
                             ("arm_gic", "arm_gic_common"), ("virtio-mmio", "sys-bus-device")],
                 "x86_64": [("isa-serial", "isa-device"), ("mc146818rtc", "isa-device"),
                            ("i8042", "isa-device"), ("virtio-mmio", "sys-bus-device")]}


def qom_types(config) -> list[dict]:
    from kemu.listings import DEVICE_PROPERTIES
    from kemu.options.chardev import CHARDEV_BACKENDS
    from kemu.options.machine import CANONICAL
    from kemu.options.objects import OBJECT_TYPES
    tgt = target(config)
    out = [{"name": d, "parent": "virtserialport" if d == "virtconsole" else "virtio-device"}
           for d in sorted(DEVICE_PROPERTIES)]
    out += [{"name": n, "parent": p} for n, p in BOARD_DEVICES[tgt]]
    out += [{"name": f"{CANONICAL.get(b, b)}-machine", "parent": "machine"}
            for b in _machines(tgt)]
    out += [{"name": _cpu_type(config, m), "parent": f"{tgt if tgt == 'x86_64' else 'arm'}-cpu"}
            for m in cpu_models(config)]
    out += [{"name": t, "parent": "memory-backend" if t.startswith("memory") else "object"}
            for t in sorted(OBJECT_TYPES)]
    out += [{"name": f"chardev-{b}", "parent": "chardev"} for b in sorted(CHARDEV_BACKENDS)]
    out += [{"name": f"{a}-accel", "parent": "accel"} for a in accelerators(config)]
    return out


def accelerators(config) -> list[str]:
    """The accelerators this target's boards run on (QOM's ``tcg-accel``, ``kvm-accel``)."""
    from kemu.machines.builder import ACCELS
    return sorted({a for b in _machines(target(config)) if b != "none" for a in ACCELS[b]})


def _not_found(kind: str, name: str) -> QmpError:
    return QmpError(f"{kind} '{name}' not found", "DeviceNotFound")


def device_list_properties(typename: str) -> list[dict]:
    from kemu.listings import DEVICE_PROPERTIES
    if typename not in DEVICE_PROPERTIES:
        raise _not_found("Device", typename)
    return [{"name": n, "type": t, **({"description": d.strip()} if d.strip() else {})}
            for n, t, d in DEVICE_PROPERTIES[typename]]


def qom_list_properties(config, typename: str) -> list[dict]:
    from kemu.listings import DEVICE_PROPERTIES
    from kemu.options.machine import MACHINE_PROPERTIES, board_name
    from kemu.options.objects import OBJECT_TYPES
    base = [{"name": "type", "type": "string"}]
    if typename.endswith("-machine"):
        board = board_name(typename.removesuffix("-machine"))
        if board in _machines(target(config)):
            return base + [{"name": p.name, "type": p.type, "description": p.description}
                           for p in MACHINE_PROPERTIES[board]]
    if typename in OBJECT_TYPES:
        return base + [{"name": n, "type": t, "description": d}
                       for n, (t, d) in OBJECT_TYPES[typename].items()]
    if typename in DEVICE_PROPERTIES:
        return base + device_list_properties(typename)
    if typename in {_cpu_type(config, m) for m in cpu_models(config)}:
        return base
    raise _not_found("Class", typename)


def command_line_options(option: str | None) -> list[dict]:
    """``query-command-line-options``: the keyval options and the parameters each takes."""
    from kemu.options.accepted import PARAMETERS
    from kemu.options.chardev import CHARDEV_BACKENDS
    table = dict(PARAMETERS)
    table["chardev"] = sorted({"backend", "id"} | set().union(*CHARDEV_BACKENDS.values()))
    out = [{"option": name, "parameters": [{"name": p, "type": "string"} for p in params]}
           for name, params in sorted(table.items()) if option in (None, name)]
    if option is not None and not out:
        raise QmpError(f"invalid option name: {option}")
    return out
