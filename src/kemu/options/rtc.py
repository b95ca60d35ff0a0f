"""``-rtc [base=utc|localtime|DATE][,clock=host|rt|vm][,driftfix=none|slew]``
(what each value means: :mod:`kemu.machines.rtc`)."""

from __future__ import annotations

from kemu.errors import ConfigError
from kemu.machines.rtc import BASES, CLOCKS, RtcConfig, parse_date
from kemu.options.keyval import split_opts


def parse_rtc_option(text: str) -> RtcConfig:
    props: dict[str, str] = {}
    for part in split_opts(text):
        key, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"-rtc: invalid parameter {part!r}")
        if key not in ("base", "clock", "driftfix"):
            raise ConfigError(f"-rtc: unsupported parameter {key!r}")
        props[key] = value
    base = props.get("base", "utc")
    if base not in BASES:
        parse_date(base)
    clock = props.get("clock", "host")
    if clock not in CLOCKS:
        raise ConfigError(f"-rtc clock={clock}: expected host, rt or vm")
    driftfix = props.get("driftfix", "none")
    if driftfix not in ("none", "slew"):
        raise ConfigError(f"-rtc driftfix={driftfix}: expected none or slew")
    return RtcConfig(base, clock, driftfix)
