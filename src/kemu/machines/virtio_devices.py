"""Virtio devices from a machine configuration, for any board.

A board offers virtio-mmio slots (:func:`attach_transport`); this module turns ``-drive`` and
``-device`` configurations into virtio devices and attaches them, so both
boards get the same devices from the same config.
"""

from __future__ import annotations

import logging

from kemu.backends.block_error import BlockIOErrorInfo
from kemu.errors import ConfigError
from kemu.machines.config import DeviceConfig, DriveConfig, MachineConfig, NetdevConfig

log = logging.getLogger("kemu")

#: -device drivers kemu offers, QEMU's names (the -pci spellings are virtio-pci on a board
#: with PCI, virtio-mmio on one without).
VIRTIO_DRIVERS = {
    "virtio-rng-device": "rng", "virtio-rng-pci": "rng",
    "virtio-blk-device": "blk", "virtio-blk-pci": "blk",
    "virtio-net-device": "net", "virtio-net-pci": "net",
    "virtio-serial-device": "serial", "virtio-serial-pci": "serial", "virtconsole": "virtconsole",
    "vhost-vsock-device": "vsock", "vhost-vsock-pci": "vsock",
    "virtio-vsock-device": "vsock", "virtio-vsock-pci": "vsock",
    "virtio-gpu-device": "gpu", "virtio-gpu-pci": "gpu",
    "virtio-keyboard-device": "keyboard", "virtio-keyboard-pci": "keyboard",
    "virtio-tablet-device": "tablet", "virtio-tablet-pci": "tablet",
    "virtio-mouse-device": "mouse", "virtio-mouse-pci": "mouse",
}
#: Device kinds (machines/display.py) that are virtio-mmio whatever their spelling, for now.
DISPLAY_KINDS = ("gpu", "keyboard", "tablet", "mouse")
#: QEMU's short names of the -pci devices (``-device virtio-blk`` is virtio-blk-pci).
PCI_ALIASES = {"virtio-blk": "virtio-blk-pci", "virtio-net": "virtio-net-pci",
               "virtio-rng": "virtio-rng-pci", "virtio-serial": "virtio-serial-pci"}
VIRTIO_DRIVERS.update({alias: VIRTIO_DRIVERS[name] for alias, name in PCI_ALIASES.items()})


def force_legacy(config: MachineConfig, default: bool) -> bool:
    """``-global virtio-mmio.force-legacy=on|off``: the legacy interface (version 1).

    QEMU 7.2's virtio-mmio defaults to on (its virt board's slots read Version
    1); a board passes its own default (``virtio_legacy_default``).
    """
    value = config.globals.get(("virtio-mmio", "force-legacy"))
    if value is None:
        return default
    if value not in ("on", "off", "true", "false"):
        raise ConfigError(f"-global virtio-mmio.force-legacy={value}: expected on or off")
    return value in ("on", "true")


#: Properties of the PCI placement of a ``*-pci`` device (QEMU's PCIDevice / virtio-pci).
PCI_PROPS = ("addr", "bus", "disable-legacy", "disable-modern", "multifunction")


def pci_placement(board, dev: DeviceConfig) -> tuple[DeviceConfig, int | None] | None:
    """Where a ``*-pci`` -device goes on the board's PCI bus: ``(dev without the PCI
    properties, slot or None for the next free)``; None for a device that is not a
    PCI device or a board without PCI (microvm: the -pci spellings use virtio-mmio)."""
    if (not dev.driver.endswith("-pci") and dev.driver not in PCI_ALIASES
            or getattr(board, "pci", None) is None):
        return None
    props = dict(dev.props)
    bus = props.pop("bus", "pcie.0")
    if bus != "pcie.0":
        raise ConfigError(f"-device {dev.driver}: Bus '{bus}' not found (the PCI bus is pcie.0)")
    if props.pop("disable-legacy", "on") not in ("on", "true", "auto"):
        raise ConfigError(f"-device {dev.driver}: disable-legacy=off: kemu's virtio-pci "
                          "devices are modern only (virtio 1.x)")
    if props.pop("disable-modern", "off") not in ("off", "false"):
        raise ConfigError(f"-device {dev.driver}: disable-modern=on: kemu has no legacy "
                          "virtio-pci interface")
    if props.pop("multifunction", "off") not in ("off", "false"):
        raise ConfigError(f"-device {dev.driver}: multifunction=on is not supported")
    slot = None
    addr = props.pop("addr", None)
    if addr is not None:
        dev_part, _, fn_part = addr.partition(".")
        try:
            slot, function = int(dev_part, 16), int(fn_part or "0", 16)
        except ValueError:
            raise ConfigError(f"-device {dev.driver}: addr={addr}: expected SLOT[.FUNCTION] "
                              "in hex") from None
        if not 0 <= slot < 32 or function != 0:
            raise ConfigError(f"-device {dev.driver}: addr={addr}: slot 0-1f, function 0 only")
    return DeviceConfig(dev.driver, props), slot


def attach_transport(board, device, slot: int | None = None, pci: bool = False):
    """Put a virtio device behind a virtio-mmio transport in the board's next free slot
    (the board offers ``memory``, ``virtio_slots``, ``virtio_irq(i)``, ``add_virtio``),
    or, with ``pci``, behind virtio-pci on the board's PCI bus (``board.pci``)."""
    from kemu.devices.virtio.mmio import VirtioMmioTransport
    if pci:
        from kemu.devices.virtio.pci import VirtioPciTransport
        transport = VirtioPciTransport(device, board.memory)
        transport.pci_slot = board.pci.add(transport, slot)
        return transport
    transport = VirtioMmioTransport(device, board.memory,
                                    board.virtio_irq(len(board.virtio_slots)),
                                    legacy=force_legacy(board.config,
                                                        board.virtio_legacy_default))
    board.add_virtio(transport)
    return transport


def open_drive(drive: DriveConfig, snapshot: bool = False, inactive: bool = False):
    """The drive's backend; with ``snapshot`` (-snapshot) a writable drive gets a
    temporary overlay (:mod:`kemu.backends.snapshot`); ``inactive``: for an incoming
    migration, without write locks until activated (:mod:`kemu.backends.block`)."""
    from kemu.backends.block import open_image

    def warn(message: str) -> None:
        log.warning("kemu: warning: %s", message)
    if (snapshot or drive.snapshot) and not drive.read_only:
        from kemu.backends.snapshot import open_snapshot
        return open_snapshot(drive.path, drive.format, locking=drive.locking,
                             on_warning=warn if drive.warn_probed_raw else None)
    return open_image(drive.path, drive.format, drive.read_only,
                      on_warning=warn if drive.warn_probed_raw else None,
                      locking=drive.locking, inactive=inactive)


def attach_devices(board, config: MachineConfig) -> list:
    """Create and attach the virtio devices the config asks for; returns the backends.

    Each backend has ``flush()`` and ``close()``; the board calls them in
    order when the machine ends (the shared I/O loop, if any, comes last).
    """
    backends: list = []
    try:
        _attach(board, config, backends)
    except BaseException:
        for backend in reversed(backends):
            backend.close()
        raise
    return backends


def _attach(board, config: MachineConfig, backends: list) -> None:
    from kemu.devices.virtio.blk import VirtioBlk
    from kemu.devices.virtio.rng import VirtioRng

    net = _NetWiring(board, config, backends)
    consoles: list = []
    ports = 0
    by_id: dict[str, DriveConfig] = {}
    claimed: set[str] = set()
    for drive in config.drives:
        if drive.id is not None:
            if drive.id in by_id:
                raise ConfigError(f"-drive: duplicate id {drive.id!r}")
            by_id[drive.id] = drive
    for dev in config.devices:
        if dev.driver not in VIRTIO_DRIVERS:
            raise ConfigError(f"-device {dev.driver}: unsupported device "
                              f"(have: {', '.join(sorted(VIRTIO_DRIVERS))})")
    # Drives without an id (if=virtio) become virtio-blk devices in order, as
    # QEMU does: virtio-blk-pci on a board with PCI (virt), virtio-mmio otherwise;
    # drives with an id wait for a -device virtio-blk-*,drive=ID.
    on_pci = getattr(board, "pci", None) is not None
    for index, drive in enumerate(config.drives):
        if drive.id is None:
            backend = open_drive(drive, config.snapshot, "incoming" in config.extra)
            backends.append(backend)
            attach_transport(board, VirtioBlk(backend, serial=f"kemu-disk{index}",
                                          read_only=drive.read_only,
                                          name=f"virtio-blk{index}",
                                          **_error_policy(board, drive, index)),
                             pci=on_pci and drive.interface != "virtio-mmio")
    for dev in config.devices:
        kind = VIRTIO_DRIVERS[dev.driver]
        placement = pci_placement(board, dev)
        if placement is not None:
            dev, slot = placement
        where = {"slot": slot, "pci": True} if placement is not None else {}
        if kind == "rng":
            attach_transport(board, VirtioRng(), **where)
        elif kind == "blk":
            drive_id = dev.props.get("drive")
            if drive_id is None or drive_id not in by_id:
                raise ConfigError(f"-device {dev.driver}: needs drive=ID naming a -drive")
            if drive_id in claimed:
                raise ConfigError(f"-device {dev.driver}: drive {drive_id!r} is already in use")
            claimed.add(drive_id)
            drive = by_id[drive_id]
            backend = open_drive(drive, config.snapshot, "incoming" in config.extra)
            backends.append(backend)
            transport = attach_transport(
                board, VirtioBlk(backend, serial=dev.props.get("serial", drive_id),
                                 read_only=drive.read_only, name=f"virtio-blk-{drive_id}",
                                 **_error_policy(board, drive, config.drives.index(drive))),
                **where)
            _boot_device(board, dev, transport, "disk")
        elif kind == "net":
            _boot_device(board, dev, attach_transport(board, net.nic(dev), **where), "net")
        elif kind == "vsock":
            attach_transport(board, net.vsock(dev), **where)
        elif kind in DISPLAY_KINDS:
            from kemu.machines.display import display_device
            attach_transport(board, display_device(board, dev, kind), **where)
        elif kind == "serial":
            consoles.append(_console(board, dev, len(consoles), where))
        elif kind == "virtconsole":
            # The port of the preceding virtio-serial-device (kemu's has exactly one).
            if len(consoles) <= ports:
                raise ConfigError("-device virtconsole: needs a -device virtio-serial-device "
                                  "before it (one virtconsole per virtio-serial-device)")
            ports += 1
    unclaimed = set(by_id) - claimed
    if unclaimed:
        raise ConfigError(f"-drive id={min(unclaimed)}: no -device uses this drive")
    if config.extra.get("vnc") is not None:
        from kemu.machines.display import start_vnc
        server = start_vnc(board, config, net.loop)
        if server is not None:
            backends.append(server)        # closed before the loop it runs on
    net.finish()


def _boot_device(board, dev: DeviceConfig, transport, kind: str) -> None:
    """A ``bootindex=`` device's Open Firmware path in the board's boot order, as
    QEMU's virt spells it for the firmware's "bootorder" (fw_cfg)."""
    index = dev.props.get("bootindex")
    order = getattr(board, "boot_devices", None)
    if index is None or order is None:
        return
    try:
        number = int(index)
    except ValueError:
        raise ConfigError(f"-device {dev.driver}: bootindex={index}: expected a number") \
            from None
    if any(n == number for n, _ in order):
        raise ConfigError(f"-device {dev.driver}: bootindex {number} used by two devices")
    slot = getattr(transport, "pci_slot", None)
    if slot is not None:
        leaf = "scsi@{:x}/disk@0,0" if kind == "disk" else "ethernet@{:x}/ethernet-phy@0"
        path = "/pci@ffffffffffffffff/" + leaf.format(slot)
    elif kind == "disk":
        path = f"/virtio-mmio@{board.virtio_slots[-1].base:016x}/disk@0,0"
    else:
        path = f"/virtio-mmio@{board.virtio_slots[-1].base:016x}/ethernet-phy@0"
    order.append((number, path))


def _error_policy(board, drive: DriveConfig, index: int) -> dict:
    """werror/rerror of a drive, and its failures reported to the board's
    ``on_block_io_error`` (set by :class:`kemu.Machine`) under QEMU's names:
    the drive id or ``virtio<N>`` (as query-block), node ``#block<N>``."""
    device = drive.id or f"virtio{index}"

    def report(operation: str, action: str, err: int) -> None:
        hook = getattr(board, "on_block_io_error", None)
        if hook is not None:
            hook(BlockIOErrorInfo(device, f"#block{index:03d}", operation, action, err))
    return {"werror": drive.werror, "rerror": drive.rerror, "on_io_error": report}


def _console(board, dev: DeviceConfig, index: int, where: dict):
    """A one-port virtio-console whose output goes to the machine's console (stdout).

    Input typed on the terminal keeps going to the serial port (ttyAMA0).
    """
    from kemu.backends.serial import SerialBackend
    from kemu.devices.virtio.console import VirtioConsole

    extra = set(dev.props) - {"id", "max_ports"}
    if extra:
        raise ConfigError(f"-device {dev.driver}: unsupported property {min(extra)}")
    sink = getattr(board, "console", None)
    backend = SerialBackend(sink.write if sink is not None else (lambda data: None))
    device = VirtioConsole(backend, name=f"virtio-console{index}")
    attach_transport(board, device, **where)
    return device


class _NetWiring:
    """-netdev backends and the NICs using them; one I/O loop for all host I/O."""

    def __init__(self, board, config: MachineConfig, backends: list) -> None:
        self.board = board
        self.backends = backends
        self.netdevs: dict[str, NetdevConfig] = {}
        self.claimed: set[str] = set()
        self.nics = 0
        self._loop = None
        for nd in config.netdevs:
            if nd.id in self.netdevs:
                raise ConfigError(f"-netdev: duplicate id {nd.id!r}")
            self.netdevs[nd.id] = nd

    @property
    def loop(self):
        board_loop = getattr(self.board, "io_loop", None)
        if board_loop is not None:
            return board_loop         # the board's own I/O thread; the board closes it
        if self._loop is None:
            import threading

            from kemu.backends.ioloop import IoLoop
            self._loop = IoLoop(getattr(self.board, "lock", None) or threading.RLock())
        return self._loop

    def nic(self, dev: DeviceConfig):
        from kemu.devices.virtio.net import VirtioNet, default_mac, parse_mac

        props = dict(dev.props)
        netdev_id = props.pop("netdev", None)
        if netdev_id is None or netdev_id not in self.netdevs:
            raise ConfigError(f"-device {dev.driver}: needs netdev=ID naming a -netdev")
        if netdev_id in self.claimed:
            raise ConfigError(f"-device {dev.driver}: netdev {netdev_id!r} is already in use")
        self.claimed.add(netdev_id)
        mac = parse_mac(props.pop("mac")) if "mac" in props else default_mac(self.nics)
        mrg = props.pop("mrg_rxbuf", "on")
        if mrg not in ("on", "off"):
            raise ConfigError(f"-device {dev.driver}: mrg_rxbuf={mrg}: expected on or off")
        csum = props.pop("guest_csum", "on")
        if csum not in ("on", "off"):
            raise ConfigError(f"-device {dev.driver}: guest_csum={csum}: expected on or off")
        props.pop("id", None)
        if props:
            raise ConfigError(f"-device {dev.driver}: unsupported property {next(iter(props))}")
        netdev = self.netdevs[netdev_id]
        backend = self._backend(netdev)
        self.backends.append(backend)
        self.nics += 1
        # passt's frames come from its own stack over a local socket: their checksums
        # are right by construction.  TAP frames may come from anywhere: verified.
        return VirtioNet(backend, mac, mrg_rxbuf=mrg == "on",
                         rx_checksums_valid=csum == "on" and netdev.type == "user",
                         name=f"virtio-net-{netdev_id}")

    def vsock(self, dev: DeviceConfig):
        """``vhost-vsock-device,guest-cid=N[,uds=PATH]``: the host side on UNIX sockets."""
        from kemu.devices.virtio.vsock import RESERVED_CIDS, VirtioVsock

        props = dict(dev.props)
        props.pop("id", None)
        try:
            cid = int(props.pop("guest-cid"), 0)
        except KeyError:
            raise ConfigError(f"-device {dev.driver}: guest-cid= is required") from None
        except ValueError:
            raise ConfigError(f"-device {dev.driver}: guest-cid must be a number") from None
        if cid in RESERVED_CIDS or not 0 < cid < 1 << 32:
            raise ConfigError(f"-device {dev.driver}: guest-cid={cid} is reserved or out of range")
        uds = props.pop("uds", None)
        if props:
            raise ConfigError(f"-device {dev.driver}: unsupported property {next(iter(props))}")
        backend = None
        if uds is not None:
            from kemu.backends.vsock_uds import UdsVsockBackend
            backend = UdsVsockBackend(self.loop, uds)
            self.backends.append(backend)
        return VirtioVsock(cid, backend, name=f"virtio-vsock-{cid}")

    def _backend(self, nd: NetdevConfig):
        if nd.type == "user":
            from kemu.backends.passt import PasstBackend, parse_hostfwd
            return PasstBackend(self.loop, [parse_hostfwd(h) for h in nd.hostfwd],
                                name=f"passt-{nd.id}")
        from kemu.backends.tap import TapBackend
        return TapBackend(self.loop, nd.props.get("ifname", ""), name=f"tap-{nd.id}")

    def finish(self) -> None:
        unclaimed = set(self.netdevs) - self.claimed
        if unclaimed:
            raise ConfigError(f"-netdev id={min(unclaimed)}: no -device uses this netdev")
        if self._loop is not None:
            self.backends.append(self._loop)   # closed after the backends using it
