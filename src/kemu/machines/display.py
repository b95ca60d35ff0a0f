"""Wiring of the graphics adapter and input devices (``-device virtio-gpu-device``,
``virtio-keyboard-device``, ``virtio-tablet-device``, ``virtio-mouse-device``).

The board's :attr:`display` is a :class:`~kemu.display.console.DisplayConsole`,
made on first use, that the host side (VNC, screendump) reads and feeds.
"""

from __future__ import annotations

from kemu.errors import ConfigError
from kemu.machines.config import DeviceConfig

#: -device DRIVER properties accepted per kind (QEMU's names).
GPU_PROPS = {"id", "xres", "yres", "max_outputs", "max_hostmem", "edid"}
INPUT_PROPS = {"id", "serial"}


def wants_display(argv: list[str]) -> bool:
    """Whether a ``kemu run`` command line asks for a screen (``-vnc`` other than
    ``none``, ``-display vnc=...``, or a graphics adapter)."""
    for opt, value in zip(argv, argv[1:]):
        opt = opt[1:] if opt.startswith("--") else opt
        if opt == "-vnc" and not value.startswith("none"):
            return True
        if opt == "-display" and value.startswith("vnc="):
            return True
        if opt == "-device" and value.split(",")[0] in ("virtio-gpu-device", "virtio-gpu-pci"):
            return True
    return False


def add_default_display_devices(config) -> None:
    """The default guest with a screen: an adapter, a keyboard and a tablet, unless given."""
    from kemu.machines.config import DeviceConfig
    have = {dev.driver.replace("-pci", "-device") for dev in config.devices}
    for driver in ("virtio-gpu-device", "virtio-keyboard-device", "virtio-tablet-device"):
        if driver not in have:
            config.devices.append(DeviceConfig(driver))


def display_note(config) -> str | None:
    """The line ``kemu run`` prints saying where the screen is."""
    vnc = config.extra.get("vnc")
    if vnc is None or not vnc.enabled:
        return None
    return (f"kemu: the screen is on VNC at {vnc.describe()}"
            + (" (password: QMP set_password)" if vnc.password else "")
            + "; the console's shell is on tty1 there")


def display_console(board):
    """The board's graphical console (created on first use)."""
    console = getattr(board, "display", None)
    if console is None:
        from kemu.display.console import DisplayConsole
        console = DisplayConsole(getattr(board, "lock", None))
        board.display = console
    return console


def _int_prop(dev: DeviceConfig, name: str, default: int, lo: int, hi: int) -> int:
    text = dev.props.get(name)
    if text is None:
        return default
    try:
        value = int(text, 0)
    except ValueError:
        raise ConfigError(f"-device {dev.driver}: {name}={text} is not a number") from None
    if not lo <= value <= hi:
        raise ConfigError(f"-device {dev.driver}: {name}={value} out of range {lo}..{hi}")
    return value


def display_device(board, dev: DeviceConfig, kind: str):
    """The virtio device for ``dev``, registered with the board's console."""
    console = display_console(board)
    allowed = GPU_PROPS if kind == "gpu" else INPUT_PROPS
    extra = set(dev.props) - allowed
    if extra:
        raise ConfigError(f"-device {dev.driver}: unsupported property {min(extra)}")
    if kind == "gpu":
        from kemu.devices.virtio import gpu
        if console.has_adapter:
            raise ConfigError(f"-device {dev.driver}: kemu drives one display: "
                              "one graphics adapter per machine")
        _int_prop(dev, "max_outputs", 1, 1, 1)
        edid = dev.props.get("edid", "on")
        if edid not in ("on", "off", "true", "false"):
            raise ConfigError(f"-device {dev.driver}: edid={edid}: expected on or off")
        hostmem = dev.props.get("max_hostmem")
        max_hostmem = gpu.DEFAULT_MAX_HOSTMEM
        if hostmem is not None:
            from kemu.options import parse_size
            max_hostmem = int(hostmem) if hostmem.isdigit() else parse_size(hostmem)
            if not 1 << 20 <= max_hostmem <= 4 << 30:
                raise ConfigError(f"-device {dev.driver}: max_hostmem={hostmem}: "
                                  "expected 1M..4G")
        device = gpu.VirtioGpu(console.surface,
                               xres=_int_prop(dev, "xres", 1280, 1, gpu.MAX_DIMENSION),
                               yres=_int_prop(dev, "yres", 800, 1, gpu.MAX_DIMENSION),
                               max_hostmem=max_hostmem, edid=edid in ("on", "true"))
        console.has_adapter = True
        console.surface.resize(device.xres, device.yres)
        return device
    from kemu.devices.virtio import input_hid
    n = len(console.keyboards) + len(console.tablets) + len(console.mice)
    if kind == "keyboard":
        device = input_hid.VirtioKeyboard(name=f"virtio-keyboard{n}")
        console.keyboards.append(device)
    elif kind == "tablet":
        device = input_hid.VirtioTablet(name=f"virtio-tablet{n}")
        console.tablets.append(device)
    else:
        device = input_hid.VirtioMouse(name=f"virtio-mouse{n}")
        console.mice.append(device)
    return device


def start_vnc(board, config, loop) -> object | None:
    """The VNC server ``-vnc`` / ``-display vnc=`` asked for, on the I/O loop ``loop``;
    events go to the board's ``on_vnc_event(name, data)`` (set by :class:`kemu.Machine`)."""
    options = config.extra.get("vnc")
    if options is None or not options.enabled:
        return None
    from kemu.display.vnc import VncServer
    console = display_console(board)
    if not console.has_adapter:
        console.surface.resize(640, 480)      # blank: no adapter draws it, as in QEMU

    def event(name: str, data: dict) -> None:
        hook = getattr(board, "on_vnc_event", None)
        if hook is not None:
            hook(name, data)
    # The thread starts with the machine (kemu.Machine.start), after -daemonize's fork.
    server = VncServer(console, loop, options, name=config.name or "kemu", on_event=event,
                       start=False)
    board.vnc = server
    return server
