"""QEMU's ``help`` listings: ``-M help``, ``-cpu help``, ``-device help``,
``-device DRIVER,help``, ``-accel help``, ``-netdev help``, ``-chardev help``,
printed as QEMU prints them, for what kemu offers."""

from __future__ import annotations

from kemu.errors import ConfigError
from kemu.options.keyval import split_opts

#: -M help: the boards, with QEMU's description column.
MACHINES = {
    "microvm": "microvm (x86-64, KVM)",
    "virt": "kemu ARM Virtual Machine (AArch64, TCG) (alias of virt-7.2)",
    "virt-7.2": "kemu ARM Virtual Machine, as QEMU 7.2's virt-7.2 (AArch64, TCG)",
    "none": "empty machine",
}

#: -device help: (category, driver, bus) as QEMU groups them.
DEVICES = [
    ("Storage devices", "virtio-blk-device", "virtio-bus"),
    ("Storage devices", "virtio-blk-pci", "PCI, alias \"virtio-blk\""),
    ("Network devices", "virtio-net-device", "virtio-bus"),
    ("Network devices", "virtio-net-pci", "PCI, alias \"virtio-net\""),
    ("Input devices", "virtconsole", "virtio-serial-bus"),
    ("Input devices", "virtio-keyboard-device", "virtio-bus"),
    ("Input devices", "virtio-mouse-device", "virtio-bus"),
    ("Input devices", "virtio-serial-device", "virtio-bus"),
    ("Input devices", "virtio-serial-pci", "PCI, alias \"virtio-serial\""),
    ("Input devices", "virtio-tablet-device", "virtio-bus"),
    ("Display devices", "virtio-gpu-device", "virtio-bus"),
    ("Misc devices", "vhost-vsock-device", "virtio-bus"),
    ("Misc devices", "vhost-vsock-pci", "PCI"),
    ("Misc devices", "virtio-rng-device", "virtio-bus"),
    ("Misc devices", "virtio-rng-pci", "PCI, alias \"virtio-rng\""),
]

#: -device DRIVER,help: the properties kemu takes, (name, type, description).
DEVICE_PROPERTIES: dict[str, list[tuple[str, str, str]]] = {
    "virtio-blk-device": [
        ("drive", "str", "Node name or ID of a block device to use as a backend"),
        ("serial", "str", ""),
        ("bootindex", "int32", "accepted; kemu boots -kernel"),
    ],
    "virtio-net-device": [
        ("mac", "str", "Ethernet 6-byte MAC Address, example: 52:54:00:12:34:56"),
        ("mrg_rxbuf", "bool", "on/off (default: true)"),
        ("netdev", "str", "ID of a netdev to use as a backend"),
    ],
    "virtio-rng-device": [],
    "virtio-serial-device": [("max_ports", "uint32", " (default: 31)")],
    "virtconsole": [("name", "str", "")],
    "virtio-gpu-device": [("edid", "bool", "on/off (default: true)"),
                          ("max_hostmem", "size", " (default: 256 MiB)"),
                          ("max_outputs", "uint32", " (default: 1)"),
                          ("xres", "uint32", " (default: 1280)"),
                          ("yres", "uint32", " (default: 800)")],
    "virtio-keyboard-device": [("serial", "str", "")],
    "virtio-mouse-device": [("serial", "str", "")],
    "virtio-tablet-device": [("serial", "str", "")],
    "vhost-vsock-device": [("guest-cid", "uint64", " (default: 0)"),
                           ("uds", "str", "kemu: the host side's UNIX socket path")],
}

#: What a -pci device takes besides its virtio device's properties (QEMU's PCIDevice, virtio-pci).
PCI_PROPERTIES = [
    ("addr", "int32", "Slot and optional function number, example: 06.0 or 06 (default: -1)"),
    ("bus", "str", "kemu: pcie.0"),
    ("disable-legacy", "OnOffAuto", "kemu: on only (modern virtio-pci)"),
    ("disable-modern", "bool", "kemu: false only"),
    ("multifunction", "bool", "kemu: false only"),
]
#: -device DRIVER,help of the -pci devices.  Kept out of DEVICE_PROPERTIES, which QMP
#: offers (qom-list-types, device-list-properties): a client such as libvirt that
#: sees virtio-*-pci there places devices behind pcie-root-port bridges, which kemu
#: does not have yet.
PCI_DEVICE_PROPERTIES = {
    d.removesuffix("-device") + "-pci": sorted(DEVICE_PROPERTIES[d] + PCI_PROPERTIES)
    for d in ("virtio-blk-device", "virtio-net-device", "virtio-rng-device",
              "virtio-serial-device", "vhost-vsock-device")}

ACCELS = ["kvm", "tcg"]
NETDEVS = ["tap", "user"]
CHARDEVS = ["file", "null", "pty", "socket", "stdio"]


def _cpus(machine: str) -> list[str]:
    if machine == "microvm":
        from kemu.options.argv import X86_CPU_MODELS
        return list(X86_CPU_MODELS)
    from kemu.accel.tcg.aarch64 import CPU_MODELS
    return sorted(CPU_MODELS)


def _device_properties(driver: str) -> str:
    props = DEVICE_PROPERTIES.get(driver, PCI_DEVICE_PROPERTIES.get(driver))
    if props is None:
        raise ConfigError(f"-device {driver},help: '{driver}' is not a valid device model name")
    lines = [f"{driver} options:"]
    for name, kind, desc in props:
        head = f"  {name}=<{kind}>"
        lines.append(f"{head:<24} - {desc}" if desc else head)
    return "\n".join(lines) + "\n"


def _devices() -> str:
    out, category = [], None
    for cat, name, bus in DEVICES:
        if cat != category:
            if category is not None:
                out.append("")
            out.append(f"{cat}:")
            category = cat
        out.append(f'name "{name}", bus {bus}')
    return "\n".join(out) + "\n"


def _machines_of(target: str | None) -> dict[str, str]:
    """-M help's rows for an emulator of ``target`` (None: every board)."""
    from kemu.machines.builder import TARGETS
    from kemu.options.machine import board_name
    return {name: desc for name, desc in MACHINES.items()
            if target is None or TARGETS.get(board_name(name), target) == target}


def listing(argv: list[str], target: str | None = None) -> str | None:
    """The listing an option asks for with ``help`` (or ``?``), or None if none does;
    ``target``: the emulator's (``kemu-system-x86_64``), whose boards alone are listed."""
    machine = "microvm" if target == "x86_64" else "virt"
    for i, arg in enumerate(argv[:-1]):
        if arg.lstrip("-") in ("M", "machine"):
            machine = split_opts(argv[i + 1])[0].removeprefix("type=")
    for i, arg in enumerate(argv[:-1]):
        opt, value = arg.lstrip("-"), argv[i + 1]
        parts = split_opts(value)
        asks = value in ("help", "?") or (len(parts) > 1 and parts[-1] in ("help", "?"))
        if not arg.startswith("-") or not asks:
            continue
        if opt in ("M", "machine"):
            return "Supported machines are:\n" + "".join(
                f"{name:<20} {desc}\n" for name, desc in sorted(_machines_of(target).items()))
        if opt == "cpu":
            return "Available CPUs:\n" + "".join(f"  {c}\n" for c in _cpus(machine))
        if opt == "device":
            return _devices() if value in ("help", "?") else _device_properties(parts[0])
        if opt == "accel":
            return "Accelerators supported in kemu:\n" + "".join(f"{a}\n" for a in ACCELS)
        if opt == "netdev":
            return "Available netdev backend types:\n" + "".join(f"{n}\n" for n in NETDEVS)
        if opt == "chardev":
            return "Available chardev backend types: \n" + "".join(f"  {c}\n" for c in CHARDEVS)
    return None
