"""``-device`` in both forms, and QMP's ``device_add`` arguments: one :class:`DeviceConfig`.

``-device virtio-blk-device,drive=d0,id=disk0`` and
``-device {"driver":"virtio-blk-device","drive":"d0","id":"disk0"}`` give the same
config; QMP's ``device_add`` takes the JSON form's object as its arguments.
"""

from __future__ import annotations

from kemu.errors import ConfigError
from kemu.machines.config import DeviceConfig
from kemu.options.keyval import parse_option, qmp_arguments


def parse_device(text: str, option: str = "-device") -> DeviceConfig:
    """``-device DRIVER[,PROP=VALUE...]`` or ``-device {"driver": DRIVER, ...}``."""
    props = parse_option(text, option, implied="driver")
    return device_from_props(props, option)


def device_from_qmp(args: dict) -> DeviceConfig:
    """QMP ``device_add``'s arguments (the JSON form's object)."""
    return device_from_props(qmp_arguments(args, "device_add"), "device_add")


def device_from_props(props: dict[str, str], option: str) -> DeviceConfig:
    props = dict(props)
    driver = props.pop("driver", "")
    if not driver:
        raise ConfigError(f"{option}: Parameter 'driver' is missing")
    props.pop("help", None)
    return DeviceConfig(driver, props)
