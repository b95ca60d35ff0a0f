"""``-machine TYPE[,PROP=VALUE...]``: the board, QEMU's versioned names, and its properties.

One table (:data:`MACHINE_PROPERTIES`) says which properties each board takes;
the parser accepts exactly those, and QMP's ``qom-list-properties`` on
``TYPE-machine`` lists exactly those.  ``virt-7.2`` is the ``virt`` board
(kemu follows QEMU 7.2's virt), as ``query-machines`` says: name ``virt-7.2``,
alias ``virt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kemu.errors import ConfigError
from kemu.machines.config import MachineConfig
from kemu.options.keyval import parse_bool, parse_keyval

#: QEMU's versioned machine names kemu offers, and the board each one is.
VERSIONED = {"virt-7.2": "virt"}
#: A board's name as query-machines gives it (the alias is the board's own name).
CANONICAL = {board: name for name, board in VERSIONED.items()}


@dataclass(frozen=True)
class MachineProperty:
    name: str
    type: str                 # QOM's type name, as qom-list-properties shows it
    description: str
    apply: Callable[[MachineConfig, str, str], None]


def _gic_version(config: MachineConfig, value: str, option: str) -> None:
    """gic-version as QEMU's virt takes it on TCG: 2, 3, and ``max`` (3 there)."""
    if value in ("2", "3", "max"):
        config.gic_version = 3 if value == "max" else int(value)
    elif value == "host":
        raise ConfigError("gic-version=host requires KVM (kemu's virt board runs on TCG)")
    elif value == "4":
        raise ConfigError("gic-version=4 requires virtualization enabled "
                          "(kemu's virt gives the guest no EL2)")
    else:
        raise ConfigError(f"{option}: gic-version={value}: invalid value "
                          "(valid: 2, 3, host, max)")


def _usb(config: MachineConfig, value: str, option: str) -> None:
    if parse_bool(value, "usb"):
        raise ConfigError(f"{option}: usb=on: kemu's boards have no USB controller")


def _dump_guest_core(config: MachineConfig, value: str, option: str) -> None:
    config.extra["dump_guest_core"] = parse_bool(value, "dump-guest-core")


def _memory_backend(config: MachineConfig, value: str, option: str) -> None:
    config.memory_backend = value


def _dumpdtb(config: MachineConfig, value: str, option: str) -> None:
    config.dumpdtb = Path(value)


def _pcie(config: MachineConfig, value: str, option: str) -> None:
    """microvm's pcie (OnOffAuto): ``auto`` is off, as in QEMU."""
    if value not in ("on", "off", "auto"):
        raise ConfigError(f"{option}: pcie={value}: invalid value (valid: on, off, auto)")
    config.extra["pcie"] = value == "on"


_COMMON = [
    MachineProperty("memory-backend", "link<memory-backend>",
                    "Set RAM backendValid value is ID of hostmem based backend",
                    _memory_backend),
    MachineProperty("dump-guest-core", "bool", "Include guest memory in a core dump",
                    _dump_guest_core),
    MachineProperty("usb", "bool", "Set on/off to enable/disable usb", _usb),
]

#: The properties each board takes (-machine TYPE,PROP=VALUE; qom-list-properties).
MACHINE_PROPERTIES: dict[str, list[MachineProperty]] = {
    "virt": _COMMON + [
        MachineProperty("gic-version", "string",
                        "Set GIC version. Valid values are 2, 3, 4, host and max", _gic_version),
        MachineProperty("dumpdtb", "string", "Dump current dtb to a file and quit", _dumpdtb),
    ],
    "microvm": _COMMON + [
        MachineProperty("pcie", "OnOffAuto", "Enable PCIe", _pcie),
    ],
    "none": list(_COMMON),
}


def board_name(name: str) -> str:
    """The kemu board a -machine type names (``virt-7.2`` is ``virt``)."""
    return VERSIONED.get(name, name)


def apply_machine_option(value: str, option: str, config: MachineConfig) -> str | None:
    """Merge one -machine argument into ``config`` (several merge, as in QEMU); returns
    the board named, if any.  ``accel=kvm:tcg`` lists accelerators to try in order."""
    props = parse_keyval(value, option, "type")
    name = props.pop("type", "")
    if name:
        config.machine = board_name(name)
    accels = props.pop("accel", None)
    if accels is not None:
        config.extra["machine_accels"] = accels.split(":")
    board_props = {p.name: p for p in MACHINE_PROPERTIES.get(config.machine, [])}
    for key, val in props.items():
        prop = board_props.get(key)
        if prop is None:
            type_name = CANONICAL.get(config.machine, config.machine)
            raise ConfigError(f"{option} {value}: Property '{type_name}-machine.{key}' "
                              "not found")
        prop.apply(config, val, option)
    return name or None
