"""``-fw_cfg [name=]NAME,file=PATH|string=STR`` as QEMU spells and checks it (softmmu/vl.c)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from kemu.devices.fw_cfg import MAX_FILE_PATH
from kemu.errors import ConfigError
from kemu.options.keyval import split_opts


@dataclass(frozen=True)
class FwCfgOption:
    """One named fw_cfg item from the command line."""

    name: str
    file: Path | None = None
    string: str | None = None

    def data(self) -> bytes:
        """The item's bytes: the file's contents, or the string without a NUL (as QEMU)."""
        if self.string is not None:
            return self.string.encode()
        assert self.file is not None
        try:
            return self.file.read_bytes()
        except OSError as e:
            raise ConfigError(f"-fw_cfg: can't load {self.file}: {e.strerror}") from None


def parse_fw_cfg_option(text: str) -> FwCfgOption:
    props: dict[str, str] = {}
    for i, part in enumerate(split_opts(text)):
        key, eq, value = part.partition("=")
        if not eq:
            if i:
                raise ConfigError(f"-fw_cfg: invalid parameter {part!r}")
            key, value = "name", part            # the implied key, as QEMU's
        if key not in ("name", "file", "string", "gen_id"):
            raise ConfigError(f"-fw_cfg: invalid parameter {key!r}")
        props[key] = value
    if props.get("gen_id"):
        raise ConfigError("-fw_cfg: gen_id= (VM generation ID) is not supported by kemu")
    name = props.get("name", "")
    given = [k for k in ("file", "string") if props.get(k)]
    if not name or len(given) != 1:
        raise ConfigError("-fw_cfg: name, plus exactly one of file, string and gen_id, "
                          "are needed")
    if len(name.encode()) > MAX_FILE_PATH - 1:
        raise ConfigError(f"-fw_cfg: name too long (max. {MAX_FILE_PATH - 1} char)")
    if not name.startswith("opt/"):
        print("kemu: warning: externally provided fw_cfg item names should be prefixed "
              'with "opt/"', file=sys.stderr)
    if "file" in given:
        return FwCfgOption(name, file=Path(props["file"]))
    return FwCfgOption(name, string=props["string"])
