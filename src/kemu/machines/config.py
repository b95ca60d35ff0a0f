"""Machine configuration: plain data made by the CLI or the Python API."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kemu.machines.rtc import RtcConfig

MiB = 1 << 20


@dataclass
class DriveConfig:
    """A disk (QEMU's ``-drive``): a host image behind a virtio-blk device."""

    path: Path
    format: str | None = None      # "raw", "qcow2", or None to detect
    read_only: bool = False
    id: str | None = None
    cache: str = "writeback"       # "writeback" or "writethrough" / "none" / "directsync"
    #: Warn, as QEMU does, when no format was given and the image probes as raw
    #: (-drive without format=; kemu's --disk asks for detection and stays quiet).
    warn_probed_raw: bool = True
    #: QEMU's file.locking: "auto" (lock if the file system can), "on", "off".
    locking: str = "auto"
    #: QEMU's werror= / rerror= (kemu.backends.block_error): what a failed host write / read does.
    werror: str = "enospc"
    rerror: str = "report"
    #: QEMU's aio=: accepted (threads, native, io_uring); kemu's disk I/O is
    #: synchronous pread/pwrite whichever is given.
    aio: str = "threads"
    #: Writes go to a temporary overlay (-snapshot, or -drive snapshot=on).
    snapshot: bool = False
    #: The format node's name when the drive came from -blockdev nodes.
    node_name: str | None = None
    #: QEMU's if= and unit=: "virtio" (-drive if=virtio: a virtio-blk disk, PCI on a
    #: board with PCI as QEMU's), "pflash" (a flash bank); "virtio-mmio", the default
    #: of kemu's own configs (API, --disk), stays on virtio-mmio, whose devices have
    #: saved state (snapshots, fork).
    interface: str = "virtio-mmio"
    unit: int | None = None


@dataclass
class ObjectConfig:
    """A user-creatable object (QEMU's ``-object TYPE,id=ID,...``): a memory
    backend or a secret; ``props`` in QEMU's spelling."""

    qom_type: str
    id: str
    props: dict[str, str] = field(default_factory=dict)


@dataclass
class ChardevConfig:
    """A character device (QEMU's ``-chardev BACKEND,id=ID,...``): ``socket``
    (a path, an address or a passed ``fd``), ``pty``, ``file``, ``stdio``, ``null``."""

    backend: str
    id: str
    props: dict[str, str] = field(default_factory=dict)


@dataclass
class BlockdevConfig:
    """A block node (QEMU's ``-blockdev``): a ``file`` protocol node or a ``raw`` /
    ``qcow2`` format node over the node named by ``file``."""

    driver: str
    node_name: str
    props: dict[str, str] = field(default_factory=dict)
    file: str | None = None      # the child node's name (format nodes)
    read_only: bool = False


@dataclass
class DeviceConfig:
    """A device (QEMU's ``-device``) by driver name, with its properties."""

    driver: str
    props: dict[str, str] = field(default_factory=dict)


@dataclass
class NetdevConfig:
    """A network backend (QEMU's ``-netdev TYPE,id=ID,...``): ``user`` (passt) or ``tap``."""

    type: str
    id: str
    #: QEMU's hostfwd= values, in order (``user`` only).
    hostfwd: list[str] = field(default_factory=list)
    props: dict[str, str] = field(default_factory=dict)


@dataclass
class MachineConfig:
    #: The emulator's guest architecture (``kemu-system-x86_64``: "x86_64"); None for
    #: the generic ``kemu``, where the board decides (query-target).
    target: str | None = None
    machine: str = "virt"
    accel: str = "tcg"
    cpu: str = "cortex-a57"
    smp: int = 1
    memory: int = 128 * MiB
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    #: On a guest reset, stop the machine instead of rebooting it (-no-reboot).
    no_reboot: bool = False
    #: Start with the CPUs stopped (-S).
    start_paused: bool = False
    name: str | None = None
    drives: list[DriveConfig] = field(default_factory=list)
    devices: list[DeviceConfig] = field(default_factory=list)
    netdevs: list[NetdevConfig] = field(default_factory=list)
    #: -rtc: where the real-time clock starts and what clock it follows.
    rtc: RtcConfig = field(default_factory=RtcConfig)
    #: -snapshot: writes to the disks go to temporary overlays, deleted at exit.
    snapshot: bool = False
    #: -fw_cfg name=...,file=...|string=...: named fw_cfg items (virt).
    fw_cfg: list = field(default_factory=list)
    #: -dtb FILE: this device tree instead of the board's own (virt).
    dtb: Path | None = None
    #: -bios FILE: firmware loaded into the first flash bank (virt).
    bios: Path | None = None
    #: -drive if=pflash: flash bank images (virt: unit 0 code, unit 1 variables).
    pflash: list[DriveConfig] = field(default_factory=list)
    #: -machine dumpdtb=FILE: write the board's device tree there and exit (virt).
    dumpdtb: Path | None = None
    #: -machine gic-version=2|3 (virt; ``max`` is 3 on TCG, as in QEMU).
    gic_version: int = 2
    #: -machine memory-backend=ID: guest RAM is that -object's memory.
    memory_backend: str | None = None
    #: -object, -chardev and -blockdev by id / node name, in command-line order.
    objects: dict[str, ObjectConfig] = field(default_factory=dict)
    chardevs: dict[str, ChardevConfig] = field(default_factory=dict)
    blockdevs: dict[str, BlockdevConfig] = field(default_factory=dict)
    #: -no-shutdown: a guest power-off stops the machine; the process stays up.
    no_shutdown: bool = False
    #: -global DRIVER.PROP=VALUE, as ``{(driver, prop): value}``.
    globals: dict[tuple[str, str], str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
