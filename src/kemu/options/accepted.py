"""Options management tools pass that change nothing kemu does, checked as QEMU
checks them: each value kemu honours by construction is accepted, any other
is refused in one line saying why.

    -overcommit mem-lock=off,cpu-pm=off   (kemu neither locks guest RAM nor passes
                                           CPU power management through)
    -uuid UUID                            (the machine's UUID; kemu's boards have no
                                           firmware table to put it in)
    -boot order=,once=,menu=,strict=,splash-time=  (checked as QEMU checks them; menu,
                                           strict and splash-time reach the firmware
                                           through fw_cfg on virt)
    -audiodev none / {"driver":"none"}    (kemu has no sound devices)
    -sandbox off                          (kemu has no seccomp sandbox: on is refused)
    -msg timestamp=on|off,guest-name=...  (the prefix of error messages)
    -no-acpi                              (virt: kemu's virt has no ACPI tables)
"""

from __future__ import annotations

import uuid as uuid_module

from kemu.errors import ConfigError
from kemu.machines.config import MachineConfig
from kemu.options.keyval import parse_bool, parse_keyval, parse_option


def _only(props: dict[str, str], option: str, allowed: dict[str, tuple[str, ...] | None]) -> None:
    for key, value in props.items():
        if key not in allowed:
            raise ConfigError(f"{option}: Invalid parameter '{key}'")
        ok = allowed[key]
        if ok is not None and value not in ok:
            raise ConfigError(f"{option}: {key}={value}: kemu takes "
                              f"{' or '.join(f'{key}={v}' for v in ok)}")


OFF = ("off", "false", "no")


def overcommit(value: str, config: MachineConfig) -> None:
    props = parse_keyval(value, "-overcommit")
    for key in props:
        if key in ("mem-lock", "cpu-pm") and props[key] not in OFF:
            raise ConfigError(f"-overcommit {key}={props[key]}: kemu does not "
                              f"{'lock guest RAM in host memory' if key == 'mem-lock' else 'pass CPU power management to the guest'} "
                              f"({key}=off)")
    _only(props, "-overcommit", {"mem-lock": OFF, "cpu-pm": OFF})


def uuid(value: str, config: MachineConfig) -> None:
    try:
        config.extra["uuid"] = str(uuid_module.UUID(value))
    except ValueError:
        raise ConfigError(f"-uuid {value}: Fail to parse UUID string") from None


def boot(value: str, config: MachineConfig) -> None:
    """QEMU's -boot: order/once letters as validate_bootdevices checks them; menu,
    strict and splash-time kept for the firmware (fw_cfg on virt)."""
    props = parse_keyval(value, "-boot", "order")
    _only(props, "-boot", {"order": None, "once": None, "strict": None, "menu": None,
                           "reboot-timeout": None, "splash-time": None, "splash": None})
    for key in ("order", "once"):
        seen = set()
        for letter in props.get(key, ""):
            if not "a" <= letter <= "p":
                raise ConfigError(f"Invalid boot device: '{letter}'")
            if letter in seen:
                raise ConfigError(f"Boot device '{letter}' was given twice")
            seen.add(letter)
    boot_config = {}
    for key in ("strict", "menu"):
        if key in props:
            boot_config[key] = parse_bool(props[key], key)
    for key in ("splash-time", "reboot-timeout"):
        if key in props:
            try:
                number = int(props[key])
            except ValueError:
                number = -2
            if not -1 <= number <= 0xFFFF:
                raise ConfigError(f"-boot {key}={props[key]}: expected a number of "
                                  "milliseconds up to 65535")
            boot_config[key] = number
    config.extra["boot"] = boot_config


def audiodev(value: str, config: MachineConfig) -> None:
    props = parse_option(value, "-audiodev", "driver")
    if props.get("driver") != "none":
        raise ConfigError(f"-audiodev {value}: kemu has no sound devices (driver=none)")
    _only(props, "-audiodev", {"driver": None, "id": None, "timer-period": None})


def sandbox(value: str, config: MachineConfig) -> None:
    props = parse_keyval(value, "-sandbox", "enable")
    if parse_bool(props.get("enable", "off"), "sandbox"):
        raise ConfigError("-sandbox on: kemu has no seccomp sandbox; it would run "
                          "unconfined (use -sandbox off)")


def msg(value: str, config: MachineConfig) -> None:
    props = parse_keyval(value, "-msg")
    for key in props:
        if key not in ("timestamp", "guest-name"):
            raise ConfigError(f"-msg: Invalid parameter '{key}'")
        parse_bool(props[key], key)
    config.extra["msg_timestamp"] = parse_bool(props.get("timestamp", "off"), "timestamp")


def no_acpi(value: str | None, config: MachineConfig) -> None:
    config.extra["no_acpi"] = True


#: option -> (takes an argument, handler)
ACCEPTED = {
    "-overcommit": (True, overcommit),
    "-uuid": (True, uuid),
    "-boot": (True, boot),
    "-audiodev": (True, audiodev),
    "-sandbox": (True, sandbox),
    "-msg": (True, msg),
    "-no-acpi": (False, no_acpi),
    "-no-user-config": (False, lambda value, config: None),   # kemu reads no config files
}


def check_no_acpi(config: MachineConfig) -> None:
    if config.extra.get("no_acpi") and config.machine == "microvm":
        raise ConfigError("-no-acpi: kemu's microvm board describes its devices in ACPI "
                          "tables and cannot leave them out")


#: query-command-line-options: the QemuOpts-style options and their parameters, as
#: the parsers here and in kemu.options take them (-chardev's come from its table).
PARAMETERS: dict[str, list[str]] = {
    "overcommit": ["mem-lock", "cpu-pm"],
    "boot-opts": ["order", "once", "strict", "menu", "reboot-timeout", "splash-time",
                  "splash"],
    "msg": ["timestamp", "guest-name"],
    "name": ["guest", "process", "debug-threads"],
    "smp-opts": ["cpus", "sockets", "dies", "clusters", "cores", "threads", "maxcpus"],
    "mon": ["chardev", "mode", "pretty", "id"],
    "rtc": ["base", "clock", "driftfix"],
    "memory": ["size"],
    "drive": ["file", "format", "if", "id", "readonly", "cache", "aio", "snapshot",
              "werror", "rerror", "media", "file.locking", "unit", "index"],
}
