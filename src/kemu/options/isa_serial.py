"""``-device isa-serial,chardev=ID``: the x86-64 board's COM1 on a chardev.

libvirt gives an x86 domain's ``<serial>`` this way (``-chardev pty,id=charserial0
-device {"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}``),
where for aarch64 it passes ``-serial chardev:ID``.  kemu's microvm board has one
16550 UART, at COM1 (QEMU's isa-serial index 0: port 0x3f8, IRQ 4); the device
connects that UART to the chardev, exactly as ``-serial chardev:ID`` does.  Any
other port, a second isa-serial, or a board without an ISA bus is refused in one
line.
"""

from __future__ import annotations

from kemu.errors import ConfigError
from kemu.machines.config import DeviceConfig, MachineConfig

DRIVER = "isa-serial"
#: QEMU's isa-serial properties, and the one value each may take on kemu's COM1.
COM1 = {"index": 0, "iobase": 0x3F8, "irq": 4}
PROPERTIES = {"chardev", "id", "wakeup", *COM1}


def take_isa_serial(config: MachineConfig, serial: str | None) -> str | None:
    """Take the isa-serial device out of ``config.devices`` (it is the board's own
    UART, not a virtio device) and return the serial setting it makes:
    ``chardev:ID``, or ``none`` without a chardev; ``serial`` when there is none."""
    found = [d for d in config.devices if d.driver == DRIVER]
    if not found:
        return serial
    where = f"-device {DRIVER}"
    if config.machine != "microvm":
        raise ConfigError(f"{where}: No 'ISA' bus found for device '{DRIVER}' "
                          f"(kemu's {config.machine} board has none)")
    if len(found) > 1:
        raise ConfigError(f"{where}: kemu's microvm board has one serial port (COM1)")
    dev = found[0]
    _check(dev, where)
    if serial is not None:
        raise ConfigError(f"{where}: COM1 is already the -serial {serial} port")
    config.devices = [d for d in config.devices if d is not dev]
    # Listed under /machine/peripheral by its id (qom-list), as QEMU lists it.
    config.extra["board_devices"] = [dev]
    cd_id = dev.props.get("chardev")
    if cd_id is None:
        return "none"
    if cd_id not in config.chardevs:
        raise ConfigError(f"{where}: Property '{DRIVER}.chardev' can't find value '{cd_id}'")
    return f"chardev:{cd_id}"


def _check(dev: DeviceConfig, where: str) -> None:
    for key, value in dev.props.items():
        if key not in PROPERTIES:
            raise ConfigError(f"{where}: Property '{DRIVER}.{key}' not found")
        if key in COM1:
            try:
                number = int(value, 0)
            except ValueError:
                raise ConfigError(f"{where}: Parameter '{key}' expects a number") from None
            if number != COM1[key]:
                raise ConfigError(f"{where}: {key}={value}: kemu's microvm board has its "
                                  "serial port at COM1 only (index=0, iobase=0x3f8, irq=4)")
