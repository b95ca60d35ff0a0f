"""QEMU's option syntax, both forms (QEMU's util/keyval.c, qemu-options.hx):

* keyval: ``value,key=value,...`` where the first part without ``=`` belongs
  to an *implied* key (``-M virt`` is ``type=virt``, ``-device virtio-rng-device``
  is ``driver=virtio-rng-device``), ``,,`` is a literal comma (``file=a,,b.img``
  names ``a,b.img``), and a trailing ``help`` (or ``?``) asks for a listing;
* JSON: ``-device {"driver":"virtio-blk-device","drive":"d0"}``, as libvirt
  writes -device, -blockdev and -object; nested objects are flattened to the
  dotted keys keyval uses (``{"file":{"driver":"file"}}`` is ``file.driver=file``).

Both give one flat ``{key: str}`` dict, values in QEMU's spelling (JSON true is
``on``), so whatever consumes an option sees one form.
"""

from __future__ import annotations

import json
import re

from kemu.errors import ConfigError

#: QEMU's booleans in option values.
TRUE = ("on", "yes", "true", "y")
FALSE = ("off", "no", "false", "n")
HELP = ("help", "?")

SIZE = re.compile(r"^(\d+)([KMGTPE]?)(i?B?)$", re.IGNORECASE)


def split_opts(text: str) -> list[str]:
    """Split at single commas; each ``,,`` becomes one comma inside its part."""
    parts = [""]
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text.startswith(",,", i):
                parts[-1] += ","
                i += 2
                continue
            parts.append("")
        else:
            parts[-1] += c
        i += 1
    return parts


def asks_help(text: str) -> bool:
    """``help`` / ``?`` alone or as the last keyval part (``-device virtio-blk-device,help``)."""
    if text.lstrip().startswith("{"):
        return False
    parts = split_opts(text)
    return parts[-1] in HELP


def parse_keyval(text: str, option: str, implied: str | None = None) -> dict[str, str]:
    """``value,key=value,...`` as an ordered dict; the leading bare value goes to ``implied``.

    A later key overrides an earlier one, as in QEMU.  A bare part that is
    not the first (and not ``help``) is QEMU's boolean shorthand ``key`` =
    ``key=on`` only for the keys callers accept; here it is an error.
    """
    props: dict[str, str] = {}
    for i, part in enumerate(split_opts(text)):
        key, eq, value = part.partition("=")
        if eq:
            if not key:
                raise ConfigError(f"{option} {text}: Invalid parameter ''")
            props[key] = value
        elif i == 0 and implied is not None:
            if part:
                props[implied] = part
        elif part in HELP:
            props["help"] = "on"
        elif part == "" and i == len(split_opts(text)) - 1:
            continue                      # a trailing comma, as QEMU allows
        else:
            raise ConfigError(f"{option} {text}: Invalid parameter '{part}'")
    return props


def _flatten(obj: dict, prefix: str, out: dict[str, str], option: str) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _flatten(value, name + ".", out, option)
        elif isinstance(value, bool):
            out[name] = "on" if value else "off"
        elif isinstance(value, (int, float, str)):
            out[name] = str(value)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    _flatten(item, f"{name}.{i}.", out, option)
                else:
                    out[f"{name}.{i}"] = str(item)
        elif value is None and name == "backing":
            out[name] = "null"         # BlockdevRefOrNull: no backing file (libvirt's qcow2)
        elif value is None:
            raise ConfigError(f"{option}: Invalid parameter type for '{name}', expected: "
                              "a value")


def parse_json(text: str, option: str) -> dict[str, str]:
    """A JSON object argument (``{"driver":...}``), flattened to dotted keyval keys."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{option}: JSON parse error: {str(e).split(':')[0]}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{option}: JSON argument must be an object")
    out: dict[str, str] = {}
    try:
        _flatten(obj, "", out, option)
    except RecursionError:
        raise ConfigError(f"{option}: JSON nesting too deep") from None
    return out


def qmp_arguments(args: dict, command: str) -> dict[str, str]:
    """A QMP command's arguments (device_add, object-add, blockdev-add) in the same
    flat form as the command line's JSON argument."""
    out: dict[str, str] = {}
    _flatten(args, "", out, command)
    return out


def parse_option(text: str, option: str, implied: str | None = None) -> dict[str, str]:
    """An option's argument in either form: JSON if it starts with ``{``, else keyval."""
    if text.lstrip().startswith("{"):
        return parse_json(text, option)
    return parse_keyval(text, option, implied)


def parse_bool(value: str, what: str) -> bool:
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ConfigError(f"{what}={value}: Parameter '{what}' expects 'on' or 'off'")


def parse_size(text: str, default_unit: str = "M") -> int:
    """QEMU's sizes: ``256`` (in ``default_unit``), ``256M``, ``2G``, ``512MiB``."""
    m = SIZE.match(text.strip())
    if not m:
        raise ConfigError(f"invalid size {text!r}")
    unit = (m.group(2) or default_unit).upper()
    return int(m.group(1)) << {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50,
                               "E": 60}[unit]


def head_and_props(text: str, option: str, first_key: str) -> tuple[str, dict[str, str]]:
    """``value,key=value,...`` split into the implied key's value and the rest."""
    props = parse_keyval(text, option, first_key)
    return props.pop(first_key, ""), props


def add_by_id(table: dict, item_id: str, item, where: str) -> None:
    """Add an -object / -chardev to its table; an id used twice is QEMU's error."""
    from kemu.errors import StartupError
    if item_id in table:
        raise StartupError(f"{where}: attempt to add duplicate property '{item_id}' to "
                           "object (type 'container')")
    table[item_id] = item
