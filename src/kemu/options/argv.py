"""The QEMU command line as a :class:`MachineConfig`: kemu's option model in one place.

Every option's argument goes through :mod:`kemu.options.keyval` (keyval or
JSON, ``,,``, implied keys); the per-option parsers live beside this module
(:mod:`.drive`, :mod:`.device`, :mod:`.netdev`, :mod:`.sockets`).  Nothing
here opens a file or starts a device: that is the machine builder's job.
"""

from __future__ import annotations

from pathlib import Path

from kemu.errors import ConfigError
from kemu.machines.builder import ACCELS, board_accels
from kemu.machines.config import DriveConfig, MachineConfig
from kemu.options.accepted import ACCEPTED, check_no_acpi
from kemu.options.blockdev import parse_blockdev, resolve_device_drives
from kemu.options.chardev import parse_chardev, parse_mon, serial_chardev, serial_shorthand
from kemu.options.device import parse_device
from kemu.options.machine import apply_machine_option
from kemu.options.objects import apply_memory_backend, parse_object
from kemu.options.drive import parse_drive
from kemu.options.isa_serial import take_isa_serial
from kemu.options.keyval import add_by_id, head_and_props, parse_bool, parse_keyval, parse_size
from kemu.options.netdev import legacy_net, parse_netdev, parse_nic
from kemu.options.sockets import parse_qmp_option, parse_socket_option

#: Options that take an argument / that do not, in QEMU's spelling.
WITH_ARG = {"-M", "-machine", "-cpu", "-m", "-smp", "-kernel", "-initrd", "-append",
            "-serial", "-accel", "-name", "-display", "-monitor", "-drive", "-device", "-disk",
            "-qmp", "-pidfile", "-netdev", "-nic", "-net", "-rtc", "-dtb", "-global",
            "-fw_cfg", "-object", "-chardev", "-mon", "-blockdev", "-vnc",
            "-incoming", "-loadvm", "-bios", "-hda", "-hdb", "-hdc", "-hdd", "-cdrom"} | {
                name for name, (takes_arg, _) in ACCEPTED.items() if takes_arg}
FLAGS = {"-nographic", "-no-reboot", "-S", "-enable-kvm", "-nodefaults", "-daemonize",
         "-snapshot", "-no-shutdown"} | {
             name for name, (takes_arg, _) in ACCEPTED.items() if not takes_arg}
#: QEMU options kemu knows of but does not offer (yet).
NOT_YET = {"-gdb", "-s"}
#: QEMU's -hdX / -cdrom shorthands: the -drive index they stand for.
DRIVE_SHORTHANDS = {"-hda": 0, "-hdb": 1, "-hdc": 2, "-hdd": 3, "-cdrom": 2}

#: The -global DRIVER.PROPERTY pairs kemu acts on.
KNOWN_GLOBALS = {("virtio-mmio", "force-legacy")}


def parse_global(text: str) -> dict[tuple[str, str], str]:
    """QEMU's ``-global DRIVER.PROP=VALUE`` (or ``driver=D,property=P,value=V``)."""
    if text.startswith("driver="):
        props = parse_keyval(text, "-global")
        try:
            return {(props["driver"], props["property"]): props["value"]}
        except KeyError as e:
            raise ConfigError(f"-global {text}: {e.args[0]}= is missing") from None
    target, eq, value = text.partition("=")
    driver, dot, prop = target.rpartition(".")
    if not (eq and dot and driver and prop):
        raise ConfigError(f"-global {text}: expected DRIVER.PROPERTY=VALUE")
    return {(driver, prop): value}


#: The accelerator each board implies when -accel is not given, and the reverse
#: (from the builder's table of which board runs on which accelerator).
ACCEL_FOR_MACHINE = {machine: accels[0] for machine, accels in ACCELS.items()}
MACHINE_FOR_ACCEL = {accel: machine for machine, accel in ACCEL_FOR_MACHINE.items()
                     if machine != "none"}


def parse_qemu_options(argv: list[str], config: MachineConfig) -> MachineConfig:
    serial = None
    machine_given = accel_given = memory_given = cpu_given = False
    mons: list[str] = []                  # -mon, resolved after every -chardev
    nodefaults = False
    legacy_net_values: list[str] = []     # -net user/tap/nic, paired at the end
    i = 0
    while i < len(argv):
        arg = argv[i]
        opt = arg[1:] if arg.startswith("--") and len(arg) > 2 else arg
        if opt in FLAGS:
            value = None
            i += 1
        elif opt in WITH_ARG:
            if i + 1 >= len(argv):
                raise ConfigError(f"{opt}: requires an argument")
            value = argv[i + 1]
            i += 2
        elif opt in NOT_YET:
            raise ConfigError(f"{opt}: not supported by this version of kemu")
        elif arg.startswith("-"):
            raise ConfigError(f"{arg}: unknown option (try 'kemu --help')")
        else:
            raise ConfigError(f"unexpected argument {arg!r} (QEMU-style options start with -)")

        if opt in ("-M", "-machine"):
            # Like QEMU, several -machine options merge: -M virt -machine dumpdtb=F.
            if apply_machine_option(value, opt, config):
                machine_given = True
        elif opt == "-cpu":
            config.cpu = value
            cpu_given = True
        elif opt == "-dtb":
            config.dtb = Path(value)
        elif opt == "-global":
            for key in parse_global(value):
                if key not in KNOWN_GLOBALS:
                    raise ConfigError(f"-global {value}: unsupported property "
                                      f"(kemu knows {', '.join('.'.join(k) for k in KNOWN_GLOBALS)})")
            config.globals.update(parse_global(value))
        elif opt == "-m":
            size, extra = head_and_props(value, opt, "size")
            if extra:
                raise ConfigError(f"-m: unsupported parameter {next(iter(extra))}")
            config.memory = parse_size(size)
            memory_given = True
        elif opt == "-smp":
            config.smp = parse_smp(value)
        elif opt == "-kernel":
            config.kernel = Path(value)
        elif opt == "-initrd":
            config.initrd = Path(value)
        elif opt == "-append":
            config.append = f"{config.extra.get('append_base', '')} {value}".strip()
        elif opt == "-nographic":
            pass            # no display; the console is on stdio unless -serial says else
        elif opt == "-nodefaults":
            nodefaults = True
        elif opt == "-serial":
            if value.startswith("chardev:"):
                serial = value          # resolved once every -chardev is known
            elif (implicit := serial_shorthand(value, config)) is not None:
                serial = implicit
            elif value not in ("stdio", "mon:stdio", "none", "null"):
                raise ConfigError(f"-serial {value}: kemu takes stdio, mon:stdio, none, null, "
                                  "pty, file:PATH and chardev:ID")
            else:
                serial = value
        elif opt == "-no-reboot":
            config.no_reboot = True
        elif opt == "-S":
            config.start_paused = True
        elif opt == "-accel":
            name, _extra = head_and_props(value, opt, "accel")
            config.accel = name
            accel_given = True
        elif opt == "-enable-kvm":
            config.accel = "kvm"
            accel_given = True
        elif opt == "-name":
            config.name, extra = head_and_props(value, opt, "guest")
            for key in extra:
                if key not in ("debug-threads", "process"):
                    raise ConfigError(f"-name: Invalid parameter '{key}'")
        elif opt == "-object":
            obj = parse_object(value)
            add_by_id(config.objects, obj.id, obj, f"-object {value}")
        elif opt == "-chardev":
            cd = parse_chardev(value)
            add_by_id(config.chardevs, cd.id, cd, f"-chardev {value}")
        elif opt == "-mon":
            mons.append(value)          # resolved once every -chardev is known
        elif opt == "-blockdev":
            parse_blockdev(value, config)
        elif opt == "-no-shutdown":
            config.no_shutdown = True
        elif opt in ACCEPTED:
            ACCEPTED[opt][1](value, config)
        elif opt in ("-display", "-vnc"):
            from kemu.options.display import parse_display_option, parse_vnc_option
            if opt == "-vnc":
                config.extra["vnc"] = parse_vnc_option(value)
            else:
                config.extra["display"], vnc = parse_display_option(value)
                if vnc is not None:
                    config.extra["vnc"] = vnc
        elif opt == "-monitor":
            if value == "stdio":
                config.extra["monitor_stdio"] = True
                config.extra.setdefault("monitors", []).append("stdio")
            elif value not in ("none", "null"):
                address = parse_socket_option(value, "-monitor")
                config.extra.setdefault("monitor_sockets", []).append(address)
                config.extra.setdefault("monitors", []).append(address.describe())
        elif opt == "-drive":
            drive = parse_drive(value)
            (config.pflash if drive.interface == "pflash" else config.drives).append(drive)
        elif opt in DRIVE_SHORTHANDS:
            # As QEMU's vl.c: -hda F is -drive file=F,index=0,media=disk on the board's
            # default interface (virtio on virt); -cdrom F is index=2,media=cdrom (read-only).
            media = "cdrom" if opt == "-cdrom" else "disk"
            config.drives.append(parse_drive(f"file={value.replace(',', ',,')},if=virtio,"
                                             f"index={DRIVE_SHORTHANDS[opt]},media={media}"))
        elif opt == "-bios":
            config.bios = Path(value)
        elif opt == "-disk":    # kemu's own --disk PATH: a virtio disk, format detected
            config.drives.append(DriveConfig(Path(value), warn_probed_raw=False))
        elif opt == "-device":
            config.devices.append(parse_device(value))
        elif opt == "-netdev":
            netdev = parse_netdev(netdev_keyval(value))
            if not netdev.id:
                raise ConfigError(f"-netdev {netdev.type}: id= is required")
            config.netdevs.append(netdev)
        elif opt == "-nic":
            if value != "none":
                netdev, nic = parse_nic(value, len(config.netdevs))
                config.netdevs.append(netdev)
                config.devices.append(nic)
        elif opt == "-net":
            legacy_net_values.append(value)
        elif opt == "-qmp":
            config.extra.setdefault("qmp", []).append(parse_qmp_option(value))
        elif opt == "-pidfile":
            config.extra["pidfile"] = Path(value)
        elif opt == "-daemonize":
            config.extra["daemonize"] = True
        elif opt == "-rtc":
            from kemu.options.rtc import parse_rtc_option
            config.rtc = parse_rtc_option(value)
        elif opt == "-snapshot":
            config.snapshot = True
        elif opt == "-incoming":
            if value != "defer":
                from kemu.migration import parse_uri
                parse_uri(value)           # checked now: one line at parse time
            config.extra["incoming"] = value
        elif opt == "-loadvm":
            config.extra["loadvm"] = value   # start from that internal snapshot (kemu.savevm)
        elif opt == "-fw_cfg":
            from kemu.options.fw_cfg import parse_fw_cfg_option
            config.fw_cfg.append(parse_fw_cfg_option(value))
    legacy_net(legacy_net_values, config)
    for value in mons:
        parse_mon(value, config)
    serial = take_isa_serial(config, serial)
    if serial is not None and serial.startswith("chardev:"):
        serial = serial_chardev(serial, config)
    apply_memory_backend(config, memory_given)
    resolve_device_drives(config)
    if _choose_machine_accel(config):
        accel_given = True
    check_no_acpi(config)
    if cpu_given and config.machine == "microvm":
        config.cpu = x86_cpu_model(config.cpu)
    if config.fw_cfg and config.machine != "virt":
        raise ConfigError(f"-fw_cfg: kemu's {config.machine} board has no fw_cfg device "
                          "(virt has)")
    # An emulator of one target (kemu-system-x86_64) keeps its board whatever -accel says.
    if accel_given and (machine_given or config.target) and config.accel not in (
            board_accels(config.machine, config.target) or (config.accel,)):
        raise ConfigError(board_accel_mismatch(config.machine, config.accel, config.target))
    if accel_given and not machine_given and not config.target:
        config.machine = MACHINE_FOR_ACCEL.get(config.accel, config.machine)
    elif machine_given and not accel_given:
        config.accel = ACCEL_FOR_MACHINE.get(config.machine, config.accel)
    # As QEMU: -nodefaults leaves the board without a serial console unless -serial
    # gives one (-nographic then changes nothing); else the console is on stdio.
    if serial is None and nodefaults:
        serial = "none"
    if config.extra.get("monitor_stdio"):
        if serial in (None, "stdio", "mon:stdio"):
            raise ConfigError("cannot use stdio by multiple character devices "
                              "(-monitor stdio wants -serial none or a -serial elsewhere)")
        if config.extra.get("daemonize"):
            raise ConfigError("-daemonize cannot be used with -monitor stdio")
    config.extra["serial"] = serial or "mon:stdio"
    if config.extra.get("daemonize") and config.extra["serial"] in ("stdio", "mon:stdio"):
        raise ConfigError("-daemonize cannot be used with a serial console on stdio "
                          "(use -serial none -display none)")
    return config


def board_accel_mismatch(machine: str, accel: str, target: str | None = None) -> str:
    runs_on = ACCELS[machine][0]
    other = MACHINE_FOR_ACCEL.get(accel, machine)
    if target is not None and other != machine:
        return (f"the {machine} board runs on {runs_on.upper()} here, not {accel.upper()} "
                f"(use -accel {runs_on}; the {target} emulator has no {accel.upper()} board)")
    return (f"the {machine} board runs on {runs_on.upper()} here, not {accel.upper()} "
            f"(use -accel {runs_on}, or -M {other} for {accel})")


#: The -cpu models of the microvm board: KVM runs the guest on the host's CPU, with
#: the features KVM_GET_SUPPORTED_CPUID reports (QEMU's ``max`` is the same on KVM).
X86_CPU_MODELS = ("host", "max")


def x86_cpu_model(value: str) -> str:
    """``-cpu host[,migratable=on|off]`` on microvm (libvirt's host-passthrough)."""
    model, props = head_and_props(value, "-cpu", "model")
    if model not in X86_CPU_MODELS:
        raise ConfigError(f"-cpu {model}: kemu's microvm runs the guest on the host's CPU "
                          f"(-cpu {' or '.join(X86_CPU_MODELS)}); no other model is emulated")
    for key, val in props.items():
        if key != "migratable":
            raise ConfigError(f"-cpu {value}: kemu takes no CPU property '{key}' on microvm")
        parse_bool(val, key)
    return model


def parse_smp(value: str) -> int:
    """``-smp N[,cpus=N][,sockets=S][,dies=D][,cores=C][,threads=T][,maxcpus=M]``: the
    topology must multiply out to the CPU count; kemu plugs no CPUs later (maxcpus=N)."""
    props = parse_keyval(value, "-smp", "cpus")
    try:
        numbers = {k: int(v) for k, v in props.items()}
    except ValueError:
        raise ConfigError(f"-smp: invalid CPU count {value!r}") from None
    for key in numbers:
        if key not in ("cpus", "sockets", "dies", "clusters", "cores", "threads", "maxcpus"):
            raise ConfigError(f"-smp: Invalid parameter '{key}'")
    topology = 1
    for key in ("sockets", "dies", "clusters", "cores", "threads"):
        topology *= numbers.get(key, 1)
    cpus = numbers.get("cpus", topology)
    if cpus < 1:
        raise ConfigError("-smp: need at least one CPU")
    if any(k in numbers for k in ("sockets", "cores", "threads")) and topology != cpus:
        raise ConfigError(f"-smp {value}: Invalid CPU topology: product of the hierarchy "
                          f"must match maxcpus: {topology} != {cpus}")
    if numbers.get("maxcpus", cpus) != cpus:
        raise ConfigError(f"-smp {value}: kemu does not hot-plug CPUs (maxcpus=cpus)")
    return cpus


def netdev_keyval(value: str) -> str:
    """A JSON -netdev (``{"type":"user","id":"n0"}``) in keyval form."""
    if not value.lstrip().startswith("{"):
        return value
    from kemu.options.keyval import parse_json
    props = parse_json(value, "-netdev")
    kind = props.pop("type", "")
    return ",".join([kind] + [f"{k}={v.replace(',', ',,')}" for k, v in props.items()])


def _choose_machine_accel(config: MachineConfig) -> bool:
    """``-machine accel=kvm:tcg``: the first listed accelerator the board runs on (and,
    as QEMU, that is usable here when another one follows: KVM needs /dev/kvm)."""
    wanted = config.extra.pop("machine_accels", None)
    if wanted is None:
        return False
    runs_on = board_accels(config.machine, config.target)
    candidates = [a for a in wanted if a in runs_on]
    for n, accel in enumerate(candidates):
        if accel == "kvm" and n + 1 < len(candidates):
            from kemu.accel.kvm import kvm_unavailable_reason
            if kvm_unavailable_reason() is not None:
                continue
        config.accel = accel
        return True
    raise ConfigError(f"-machine accel={':'.join(wanted)}: the {config.machine} board runs "
                      f"on {'/'.join(runs_on)}")
