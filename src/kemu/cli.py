"""The ``kemu`` command: QEMU's option spelling, plus a few subcommands.

The command line becomes a :class:`MachineConfig` in :mod:`kemu.options`
(QEMU's option model, one place); this module picks the subcommand and runs
the machine.  Every error becomes one line on stderr and exit status 2
(1 when the guest fails).

    kemu [QEMU options]            boot what the options say
    kemu run [QEMU options]        boot the default guest (options on top)
    kemu guest build [--arch A]    build the default guest ahead of time (reuses a
                                   complete cache; --rebuild to build it again)
    kemu img SUBCOMMAND ...        disk image tool (qemu-img's everyday subset)
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from kemu.errors import ConfigError, KemuError
from kemu.machines.builder import ACCELS
from kemu.machines.config import MachineConfig, MiB
from kemu.options.argv import (
    ACCEL_FOR_MACHINE,
    MACHINE_FOR_ACCEL,
    board_accel_mismatch,
    parse_qemu_options,
)
from kemu.options.keyval import head_and_props
from kemu.pvm_notice import SilenceReporter, prepare_for_pvm

USAGE = """\
usage: kemu [QEMU-style options]
       kemu run [--accel kvm|tcg] [--arch aarch64|x86_64] [QEMU-style options]
                                         boot the default guest on its serial console
                                         (x86-64 on KVM where /dev/kvm is hardware-backed,
                                         else aarch64 on TCG)
       kemu guest build [--arch aarch64] [--rebuild]
                                         build the default guest (or reuse a complete
                                         cache) and print its paths
       kemu img create|info|check|convert ...
       kemu-system-x86_64 | kemu-system-aarch64 [QEMU-style options]
                                         kemu for one target's boards only, as QEMU's
                                         binaries (libvirt's <emulator>)

QEMU-style options: -M/-machine virt|virt-7.2|microvm|none[,PROP=V]  -accel tcg|kvm  -enable-kvm  -cpu MODEL
  -m SIZE  -smp N (microvm; 1 on virt)
  -kernel FILE (virt: arm64 Image, ELF or raw binary)  -initrd FILE  -append CMDLINE
  -dtb FILE  -machine dumpdtb=FILE (virt)  -global virtio-mmio.force-legacy=on|off
  -nographic  -serial stdio|mon:stdio|none
  -no-reboot  -S  -name NAME  -display none|vnc=[HOST]:N  -nodefaults
  -vnc [HOST]:N|unix:PATH|none[,password=on][,share=allow-exclusive|force-shared|ignore]
  -monitor stdio|none|unix:PATH,server=on[,wait=off]|tcp:HOST:PORT,server=on[,wait=off]
  -drive file=IMG[,format=raw|qcow2][,if=virtio|none,id=ID][,readonly=on][,cache=MODE]
         [,aio=threads|native|io_uring][,snapshot=on] (aio= is accepted; kemu's disk
         I/O is synchronous pread/pwrite, in the thread that takes the queue notify)
         (virt: if=virtio is virtio-blk-pci, as -hda FILE and -cdrom FILE, read-only)
  -bios FILE | -drive if=pflash,format=raw,file=IMG[,readonly=on][,unit=0|1]
         (virt: UEFI firmware in CFI flash, e.g. /usr/share/qemu-efi-aarch64/QEMU_EFI.fd;
         -kernel/-initrd/-append then go to the firmware through fw_cfg)
  -boot [order=..][,menu=on|off][,strict=on|off][,splash-time=MS] (to the firmware)
  -snapshot  (writes go to temporary qcow2 overlays, deleted at exit; images untouched)
  -rtc [base=utc|localtime|YYYY-MM-DD[THH:MM:SS]][,clock=host|rt|vm][,driftfix=none|slew]
  -fw_cfg [name=]opt/NAME,file=PATH|string=STR  (virt: an item in QEMU's fw_cfg device)
  -device virtio-blk-device,drive=ID | virtio-rng-device | virtio-net-device,netdev=ID[,mac=M]
  -netdev user,id=ID[,hostfwd=tcp::HOSTPORT-:GUESTPORT]  (user-mode networking by passt)
  -netdev tap,id=ID,ifname=NAME,script=no,downscript=no
  -nic user[,hostfwd=...][,mac=M] | tap,ifname=NAME
  -qmp unix:PATH|tcp:HOST:PORT[,server=on[,wait=off]] (no server=on: connect out)
  -pidfile FILE  -daemonize  -no-shutdown (guest power-off stops; kemu stays up until quit)
  -object memory-backend-ram|memory-backend-file,id=ID,size=S[,mem-path=F][,share=on]
          | secret,id=ID,data=D|file=F  (and -machine memory-backend=ID)
  -chardev socket,id=ID,path=P|host=H,port=N|fd=N[,server=on][,wait=off] | pty|file|stdio|null
  -mon chardev=ID[,mode=control|readline]  -serial chardev:ID
  -device isa-serial,chardev=ID[,index=0]  (microvm: COM1 on that chardev)
  -blockdev driver=file,filename=F,node-name=N | driver=raw|qcow2,file=N,node-name=M
  -device DRIVER,drive=NODE|ID,...  (keyval or JSON: -device '{"driver":...}')
  accepted as QEMU does: -no-user-config -no-acpi -uuid -overcommit mem-lock=off
                         -audiodev none -sandbox off -msg timestamp=on
  -incoming unix:PATH|tcp:HOST:PORT|exec:CMD|fd:N|defer  (wait for a migration; virt board)
  -loadvm TAG  (start from an internal snapshot of the qcow2 disks, made by savevm)
  -M help  -cpu help  -device help  -device DRIVER,help  -accel help  -netdev help  -chardev help
kemu's own: --disk IMG (a virtio disk, format detected)
            --net user[,hostfwd=...] (a virtio NIC on user-mode networking, as -nic user)
In the console: Ctrl-A x quits, Ctrl-A c switches to the monitor and back, Ctrl-A h prints help.
"""

def run_machine(config: MachineConfig) -> int:
    """Run a machine on the terminal through the same API programs use.

    SIGTERM, SIGHUP and SIGINT end it as they end QEMU: the vCPUs stop, the
    disks are flushed, SHUTDOWN (reason ``host-signal``) goes to QMP clients,
    the sockets and pidfile kemu made are removed, one line on stderr, status 0.
    """
    from kemu.api import Machine
    from kemu.backends.unix_socket import write_pidfile

    if config.dumpdtb is not None:
        from kemu.machines.arm64_virt import dump_device_tree
        dump_device_tree(config)
        print(f"kemu: info: dtb dumped to {config.dumpdtb}. Exiting.", file=sys.stderr)
        return 0
    from kemu.console import ConsoleOutput, write_stdout
    from kemu.host_signals import HostSignals

    holder: list = []          # the machine, once it exists

    def on_signal(_termination) -> None:
        if holder:
            holder[0].stop(reason="host-signal")

    signals = HostSignals(on_signal)
    signals.install()
    serial = config.extra.get("serial", "mon:stdio")
    stdio = serial in ("stdio", "mon:stdio") or config.extra.get("monitor_stdio")
    output = ConsoleOutput(sys.stdout.fileno()) if stdio else None
    chardev = None
    try:
        on_stdio = output is not None and serial in ("stdio", "mon:stdio")
        pvm_note = prepare_for_pvm(config)
        sink = output.write if on_stdio else None
        chardev = _serial_chardev(config)
        if chardev is not None:
            sink = chardev.write
        silence = SilenceReporter(sink) if pvm_note and sink else None
        vm = Machine.from_config(config, silence.write if silence else sink)
        for note in (config.extra.get("note"), pvm_note):
            # After set-up, so that a bad option or file is still exactly one line.
            if note:
                print(note, file=sys.stderr)
        if silence:
            silence.start()
        ready_fd = _daemonize() if config.extra.get("daemonize") else None
        # Threads started from here on (vCPUs, QMP, console output) leave these
        # signals to the "signals" thread, which learns who sent them.
        signals.block()
        holder.append(vm)
        if chardev is not None:
            chardev.start(vm.console.write)
        servers = []
        if config.extra.get("qmp"):
            from kemu.qmp.server import QmpServer   # asyncio: imported only when needed
            servers = [QmpServer(vm, address) for address in config.extra["qmp"]]
        if config.extra.get("monitor_sockets"):
            from kemu.monitor.server import MonitorServer
            servers += [MonitorServer(_hmp(vm), address)
                        for address in config.extra["monitor_sockets"]]
        pidfile = config.extra.get("pidfile")
        owned = []

        def started() -> None:
            """The machine exists (running, or paused under -S): open the monitors.

            As in QEMU, clients never see a machine that is still being set up;
            with wait=on the machine starts only once a client has connected.
            """
            for server in servers:
                if not server.address.wait:
                    server.start()
            if pidfile is not None:
                owned.append(write_pidfile(str(pidfile)))
            if ready_fd is not None:
                _daemon_ready(ready_fd)

        try:
            for server in servers:
                if server.address.wait:
                    server.start()
            status = _run_on_terminal(vm, config, serial, started, signals,
                                      output.write if output is not None else write_stdout)
        finally:
            for server in servers:
                server.close()
            for path in owned:
                path.remove()
    finally:
        signals.uninstall()
        if chardev is not None:
            chardev.close()
        dropped = output.close() if output is not None else 0
    if dropped:
        print(f"kemu: {dropped} bytes of console output dropped (stdout was not read)",
              file=sys.stderr)
    if signals.received is not None:
        print(f"kemu: {signals.received.describe()}", file=sys.stderr)
        return 0        # as QEMU 7.2: a clean shutdown on a signal exits 0
    return status


def _serial_chardev(config: MachineConfig):
    """The serial port's pty or file chardev (``-serial chardev:ID``), opened; None
    when the console is elsewhere.  Its path is what query-chardev reports."""
    cd_id = config.extra.get("serial_chardev")
    if cd_id is None:
        return None
    from kemu.backends.chardev import open_chardev
    chardev = open_chardev(config.chardevs[cd_id])
    config.extra.setdefault("chardev_filenames", {})[cd_id] = chardev.filename
    if config.chardevs[cd_id].backend == "pty":
        # As QEMU, on stderr (libvirt reads the path from query-chardev).
        print(f"char device redirected to {chardev.path} (label {cd_id})", file=sys.stderr)
    return chardev


def _daemonize() -> int:
    """QEMU's -daemonize: detach from the terminal once the machine is set up.

    As QEMU's, the parent process waits on a pipe and exits only when the
    daemon says it is ready (:func:`_daemon_ready`: the pidfile, the QMP and
    monitor sockets exist), with status 0; with 1 when the daemon failed
    first (its one-line error is still on stderr).  Returns the pipe's
    write end, in the daemon.
    """
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            ready = pipe.read() == b"ready"
        os._exit(0 if ready else 1)
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    os.close(null)
    return write_end


def _daemon_ready(write_end: int) -> None:
    """Tell the waiting parent that the daemon is ready; stderr goes quiet."""
    os.write(write_end, b"ready")
    os.close(write_end)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 2)
    os.close(null)


def _hmp(vm):
    """The human monitor's command table over a machine's QMP commands."""
    from kemu.monitor.hmp import Hmp
    from kemu.qmp.commands import Commands
    return Hmp(Commands(vm))


def _run_on_terminal(vm, config: MachineConfig, serial: str,
                     started: Callable[[], None], signals,
                     write_console: Callable[[bytes], None]) -> int:
    from kemu.console import StdioConsole

    quit_requested = []

    def on_quit() -> None:
        quit_requested.append(True)
        vm.stop()

    monitor = None
    if serial == "mon:stdio" or config.extra.get("monitor_stdio"):
        from kemu.monitor.session import MonitorSession
        monitor = MonitorSession(_hmp(vm), write_console)
    stdio = None
    if serial in ("stdio", "mon:stdio") or config.extra.get("monitor_stdio"):
        stdio = StdioConsole(vm.console.write, on_quit, escapes=serial == "mon:stdio",
                             monitor=monitor,
                             monitor_only=bool(config.extra.get("monitor_stdio")))
    incoming = config.extra.get("incoming")
    if incoming is not None:
        # -incoming URI|defer: wait for a migration instead of booting (-S: stay paused after)
        vm.start_incoming(None if incoming == "defer" else incoming, paused=config.start_paused)
    else:
        vm.start(paused=config.start_paused, loadvm=config.extra.get("loadvm"))
    try:
        if signals.received is not None:      # a signal during set-up
            vm.stop(reason="host-signal")
        started()
        if stdio is not None:
            stdio.start()
        while vm.wait(0.5) is None:
            pass
    except BaseException:
        vm.stop()
        vm.wait(10)
        raise
    finally:
        if stdio is not None:
            stdio.restore()
    if signals.received is not None:
        return 0
    if quit_requested:
        print("\r\nkemu: terminated", file=sys.stderr)
        return 0
    outcome = vm.outcome
    if outcome.message:
        print(f"\r\nkemu: {outcome.message}", file=sys.stderr)
    return outcome.status


#: The default guest's architecture per accelerator, and the reverse.
ARCH_FOR_ACCEL = {"kvm": "x86_64", "tcg": "aarch64"}
ACCEL_FOR_ARCH = {arch: accel for accel, arch in ARCH_FOR_ACCEL.items()}


def choose_default_guest(arch: str | None, accel: str | None) -> tuple[str, str, str | None]:
    """(arch, accel, note) for ``kemu run``: what the user asked for, else x86-64 on
    KVM where /dev/kvm is hardware-backed (it boots fastest) and aarch64 on TCG
    elsewhere; ``note`` is the one line saying so when kemu chose."""
    if accel is not None and accel not in ARCH_FOR_ACCEL:
        raise ConfigError(f"--accel {accel}: unknown accelerator (kvm or tcg)")
    if arch is not None and arch not in ACCEL_FOR_ARCH:
        raise ConfigError(f"--arch {arch}: no default guest for it (aarch64 or x86_64)")
    if arch and accel:
        if ARCH_FOR_ACCEL[accel] != arch:
            raise ConfigError(f"the {arch} guest does not run on {accel} "
                              f"(use --accel {ACCEL_FOR_ARCH[arch]})")
        return arch, accel, None
    if accel:
        return ARCH_FOR_ACCEL[accel], accel, None
    if arch:
        return arch, ACCEL_FOR_ARCH[arch], None
    from kemu.accel.kvm import is_pvm, kvm_is_hardware_backed, kvm_unavailable_reason
    if kvm_is_hardware_backed():
        return "x86_64", "kvm", "kemu: x86-64 guest on KVM (/dev/kvm is hardware-backed)"
    why = ("/dev/kvm is PVM, where KVM emulates the guest kernel's code in software"
           if is_pvm()
           else (kvm_unavailable_reason() or "no usable /dev/kvm").split(" (")[0].split(":")[0])
    return "aarch64", "tcg", f"kemu: aarch64 guest on TCG ({why})"


def cmd_run(argv: list[str]) -> int:
    from kemu.guest.debian import default_guest

    arch = accel = None
    rest = []
    i = 0
    while i < len(argv):
        if argv[i] in ("--arch", "--accel", "-accel") and i + 1 < len(argv):
            if argv[i] == "--arch":
                arch = argv[i + 1]
            else:
                accel = head_and_props(argv[i + 1], argv[i], "accel")[0]
            i += 2
            continue
        if argv[i] in ("-enable-kvm", "--enable-kvm"):
            accel = "kvm"
            i += 1
            continue
        if argv[i] in ("-h", "--help"):
            print(USAGE)
            return 0
        rest.append(argv[i])
        i += 1
    machine = next((head_and_props(rest[i + 1], rest[i], "type")[0] for i in range(len(rest) - 1)
                    if rest[i] in ("-M", "-machine", "--machine")), None)
    if machine in ACCELS:
        if accel is not None and accel not in ACCELS[machine]:
            raise ConfigError(board_accel_mismatch(machine, accel))
        accel = accel or ACCEL_FOR_MACHINE[machine]
    arch, accel, note = choose_default_guest(arch, accel)
    from kemu.machines.display import wants_display
    screen = wants_display(rest)
    # A screen needs a kernel with DRM: the guest's display flavour (built on first use).
    image = default_guest(f"{arch}-display" if screen else arch,
                          show_progress=sys.stderr.isatty())
    config = MachineConfig(kernel=image.kernel, initrd=image.initrd, append=image.append,
                           memory=256 * MiB, cpu="cortex-a57" if arch == "aarch64" else "host",
                           accel=accel, machine=MACHINE_FOR_ACCEL[accel])
    config.extra["append_base"] = image.append
    if note:
        config.extra["note"] = note     # printed once the machine is set up
    parse_qemu_options(rest, config)
    if screen:
        from kemu.machines.display import add_default_display_devices, display_note
        add_default_display_devices(config)
        config.extra["note"] = "\n".join(filter(None, (config.extra.get("note"),
                                                        display_note(config))))
    return run_machine(config)


def cmd_guest(argv: list[str]) -> int:
    import argparse

    from kemu.guest.debian import build_guest, cached_guest, guest_dir

    parser = argparse.ArgumentParser(prog="kemu guest")
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="build the default guest from distribution packages")
    b.add_argument("--arch", default="aarch64", choices=("aarch64", "x86_64"))
    b.add_argument("--screen", action="store_true",
                   help="the display flavour (a kernel with DRM, for -vnc): what "
                        "'kemu run -vnc' boots")
    b.add_argument("--rebuild", action="store_true",
                   help="build again even if the cache is complete (packages still "
                        "matching apt's hashes are not downloaded again)")
    args = parser.parse_args(argv)
    name = f"{args.arch}-display" if args.screen else args.arch
    image = None if args.rebuild else cached_guest(name, check_packages=True)
    if image is None:
        image = build_guest(name, show_progress=sys.stderr.isatty())
    else:
        print(f"kemu: reusing the complete cached guest in {guest_dir(name)} "
              "(--rebuild to build it again)", file=sys.stderr)
    print(f"kernel:  {image.kernel}\ninitrd:  {image.initrd}\nappend:  {image.append}")
    return 0


def cmd_img(argv: list[str]) -> int:
    try:
        from kemu.img import main as img_main
    except ImportError:
        raise ConfigError("kemu img is not available in this build") from None
    return img_main(argv)


def _print_listing(argv: list[str], target: str | None = None) -> bool:
    """QEMU's ``-M help``, ``-device help``, ...: print the listing, True if asked."""
    from kemu.listings import listing
    text = listing(argv, target)
    if text is not None:
        sys.stdout.write(text)
    return text is not None


#: The machine an emulator of one target (``kemu-system-ARCH``) starts from.
TARGET_DEFAULTS = {"aarch64": {"machine": "virt", "accel": "tcg", "cpu": "cortex-a57"},
                   "x86_64": {"machine": "microvm", "accel": "kvm", "cpu": "host"}}


def main_x86_64() -> int:
    """``kemu-system-x86_64``: kemu as an emulator of one target, as QEMU's binaries are
    (what libvirt's ``<emulator>`` names): query-target says x86_64 even for the
    probe's ``-machine none``, and only x86-64 boards are offered."""
    return main(target="x86_64")


def main_aarch64() -> int:
    """``kemu-system-aarch64``: kemu for aarch64 guests only (see :func:`main_x86_64`)."""
    return main(target="aarch64")


def main(argv: list[str] | None = None, target: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"kemu-system-{target}" if target else "kemu"
    try:
        if not argv or argv[0] in ("-h", "--help", "-help"):
            print(USAGE)
            return 0 if argv else 2
        if argv[0] in ("--version", "-version"):
            from importlib.metadata import version
            print(f"kemu {version('kemu')}")
            return 0
        if _print_listing(argv[1:] if argv[0] == "run" and target is None else argv, target):
            return 0
        if target is None and argv[0] == "run":
            return cmd_run(argv[1:])
        if target is None and argv[0] == "guest":
            return cmd_guest(argv[1:])
        if target is None and argv[0] == "img":
            return cmd_img(argv[1:])
        config = parse_qemu_options(argv, MachineConfig(target=target,
                                                        **TARGET_DEFAULTS.get(target, {})))
        if (config.kernel is None and config.dumpdtb is None and config.machine != "none"
                and config.bios is None and not config.pflash):
            raise ConfigError("no kernel given: use -kernel FILE, or firmware with -bios FILE "
                              "(or 'kemu run' for the default guest)")
        return run_machine(config)
    except KemuError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in kemu: one line, the traceback on request
        if os.environ.get("KEMU_DEBUG"):
            raise
        print(f"{prog}: internal error: {type(e).__name__}: {e} (set KEMU_DEBUG=1 for "
              "details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
