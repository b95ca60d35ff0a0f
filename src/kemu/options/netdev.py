"""``-netdev``, ``-nic`` and the old ``-net`` pairs: network backends and their NICs."""

from __future__ import annotations

from kemu.errors import ConfigError
from kemu.machines.config import DeviceConfig, MachineConfig, NetdevConfig
from kemu.options.keyval import split_opts


NETDEV_TYPES = ("user", "tap")


def parse_netdev(text: str, option: str = "-netdev") -> NetdevConfig:
    """QEMU's ``-netdev user,id=ID[,hostfwd=...]...`` / ``tap,id=ID,ifname=NAME,script=no``."""
    parts = split_opts(text)
    kind = parts[0]
    if kind not in NETDEV_TYPES:
        raise ConfigError(f"{option} {kind}: unsupported network backend "
                          f"(have: {', '.join(NETDEV_TYPES)})")
    nd = NetdevConfig(kind, "")
    for part in parts[1:]:
        if "=" not in part:
            raise ConfigError(f"{option} {kind}: invalid parameter {part!r}")
        k, v = part.split("=", 1)
        if k == "id":
            nd.id = v
        elif k == "hostfwd" and kind == "user":
            from kemu.backends.passt import parse_hostfwd
            parse_hostfwd(v)          # checked now: one line at parse time
            nd.hostfwd.append(v)
        elif k == "ifname" and kind == "tap":
            nd.props["ifname"] = v
        elif k in ("script", "downscript") and kind == "tap":
            if v != "no":
                raise ConfigError(f"{option} tap: {k}={v}: kemu runs no scripts; use {k}=no "
                                  "and configure the interface beforehand")
        elif k in ("ipv4", "ipv6") and kind == "user" and v in ("on", "off"):
            pass                      # passt serves both
        else:
            raise ConfigError(f"{option} {kind}: unsupported parameter {k}")
    return nd


def parse_nic(text: str, index: int, option: str = "-nic") -> tuple[NetdevConfig, DeviceConfig]:
    """QEMU's ``-nic user[,hostfwd=...][,mac=...][,model=virtio]``: a netdev and its NIC."""
    parts = split_opts(text)
    nic_props: dict[str, str] = {}
    rest = [parts[0]]
    # As QEMU: the board's default NIC, virtio-net-pci (virtio-mmio on a board
    # without PCI); model=virtio is QEMU's alias of virtio-net-pci.
    model = "virtio-net-pci"
    for part in parts[1:]:
        k, _, v = part.partition("=")
        if k in ("mac", "macaddr"):
            nic_props["mac"] = v
        elif k == "model":
            if v not in ("virtio", "virtio-net-device", "virtio-net-pci"):
                raise ConfigError(f"{option}: model={v}: kemu has virtio-net only")
            model = "virtio-net-pci" if v == "virtio" else v
        else:
            rest.append(part)
    nd = parse_netdev(",".join(p.replace(",", ",,") for p in rest), option)
    if not nd.id:
        nd.id = f"__{option.lstrip('-')}{index}"
    nic_props["netdev"] = nd.id
    return nd, DeviceConfig(model, nic_props)


def legacy_net(values: list[str], config: MachineConfig) -> None:
    """QEMU's old ``-net nic[,model=..,macaddr=..] -net user|tap,...`` pairs, and kemu's
    ``--net user[,hostfwd=...]``: one virtio NIC per backend (``-net nic`` alone: user)."""
    nic_opts = [v.split(",", 1)[1] if "," in v else "" for v in values if v.split(",")[0] == "nic"]
    backends = [v for v in values if v.split(",")[0] not in ("nic", "none")]
    if nic_opts and not backends:
        backends = ["user"]
    for i, backend in enumerate(backends):
        extra = nic_opts[i] if i < len(nic_opts) else ""
        netdev, nic = parse_nic(f"{backend},{extra}".rstrip(","), len(config.netdevs), "-net")
        config.netdevs.append(netdev)
        config.devices.append(nic)


