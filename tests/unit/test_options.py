"""kemu.options: QEMU's option syntax (keyval and JSON) into one config."""

import pytest

from kemu.errors import ConfigError
from kemu.machines.config import MachineConfig
from kemu.options import device_from_qmp, parse_device, parse_option, parse_qemu_options
from kemu.options.keyval import asks_help, parse_keyval


def test_keyval_implied_key_escape_and_help():
    assert parse_keyval("virt,gic-version=2", "-M", "type") == {"type": "virt",
                                                                 "gic-version": "2"}
    assert parse_keyval("type=virt", "-M", "type") == {"type": "virt"}
    assert parse_keyval("file=a,,b,id=x", "-drive") == {"file": "a,b", "id": "x"}
    assert asks_help("virtio-blk-device,help") and asks_help("?") and not asks_help("x")
    assert not asks_help('{"driver":"help"}')
    with pytest.raises(ConfigError, match="Invalid parameter 'bare'"):
        parse_keyval("virt,bare", "-M", "type")


def test_json_and_keyval_give_the_same_props():
    keyval = parse_option("virtio-blk-device,drive=d0,bootindex=1,share-rw=off", "-device",
                          "driver")
    json_form = parse_option('{"driver":"virtio-blk-device","drive":"d0","bootindex":1,'
                             '"share-rw":false}', "-device", "driver")
    assert keyval == json_form
    nested = parse_option('{"driver":"qcow2","node-name":"f","file":{"driver":"file",'
                          '"filename":"/i,x"}}', "-blockdev")
    assert nested == {"driver": "qcow2", "node-name": "f", "file.driver": "file",
                      "file.filename": "/i,x"}


@pytest.mark.parametrize("text", ['{"driver":', '["x"]', '{"driver":null}'])
def test_bad_json_is_one_config_error(text):
    with pytest.raises(ConfigError):
        parse_option(text, "-device")


def test_device_from_cli_and_qmp_alike():
    a = parse_device('{"driver":"virtio-net-device","netdev":"n0","id":"net0"}')
    b = parse_device("virtio-net-device,netdev=n0,id=net0")
    c = device_from_qmp({"driver": "virtio-net-device", "netdev": "n0", "id": "net0"})
    assert a == b == c and a.driver == "virtio-net-device" and a.props["id"] == "net0"
    with pytest.raises(ConfigError, match="driver"):
        parse_device('{"id":"x"}')


def test_machine_options_merge_and_type_key():
    cfg = parse_qemu_options(["-machine", "type=virt", "-M", "dumpdtb=/tmp/v.dtb"],
                             MachineConfig())
    assert cfg.machine == "virt" and str(cfg.dumpdtb) == "/tmp/v.dtb"


# -- what libvirt passes (issue 13) ------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from kemu.errors import StartupError  # noqa: E402
from kemu.options.objects import secret_value  # noqa: E402

KEMU = [sys.executable, "-m", "kemu.cli"]


def libvirt_argv(tmp_path, monitor_fd: int) -> list[str]:
    """A domain's command line as libvirt 9.0 writes it (recorded from its log)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    key = tmp_path / "master-key.aes"
    key.write_bytes(os.urandom(32))
    return [
        "-name", "guest=kemu1,debug-threads=on", "-S",
        "-object", json.dumps({"qom-type": "secret", "id": "masterKey0", "format": "raw",
                               "file": str(key)}),
        "-machine", "virt-7.2,usb=off,gic-version=2,dump-guest-core=off,"
                    "memory-backend=mach-virt.ram",
        "-accel", "tcg", "-cpu", "cortex-a57", "-m", "256",
        "-object", '{"qom-type":"memory-backend-ram","id":"mach-virt.ram","size":268435456}',
        "-overcommit", "mem-lock=off", "-smp", "1,sockets=1,cores=1,threads=1",
        "-uuid", "642282aa-97a9-4650-acfb-6ad494469802", "-display", "none",
        "-no-user-config", "-nodefaults",
        "-chardev", f"socket,id=charmonitor,fd={monitor_fd},server=on,wait=off",
        "-mon", "chardev=charmonitor,id=monitor,mode=control",
        "-rtc", "base=utc", "-no-shutdown", "-no-acpi", "-boot", "strict=on",
        "-kernel", "/k",
        "-blockdev", json.dumps({"driver": "file", "filename": str(disk),
                                 "node-name": "libvirt-1-storage", "auto-read-only": True,
                                 "discard": "unmap"}),
        "-blockdev", '{"node-name":"libvirt-1-format","read-only":false,"driver":"raw",'
                     '"file":"libvirt-1-storage"}',
        "-device", '{"driver":"virtio-blk-device","drive":"libvirt-1-format",'
                   '"id":"virtio-disk0","bootindex":1}',
        "-netdev", '{"type":"user","id":"hostnet0"}',
        "-device", '{"driver":"virtio-net-device","netdev":"hostnet0","id":"net0",'
                   '"mac":"52:54:00:ab:13:89"}',
        "-chardev", "pty,id=charserial0", "-serial", "chardev:charserial0",
        "-audiodev", '{"id":"audio1","driver":"none"}', "-msg", "timestamp=on"]


def test_libvirts_command_line_becomes_one_config(tmp_path):
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "mon.sock"))
    listener.listen()
    cfg = parse_qemu_options(libvirt_argv(tmp_path, listener.fileno()), MachineConfig())
    listener.close()
    assert (cfg.machine, cfg.accel, cfg.memory, cfg.smp) == ("virt", "tcg", 256 << 20, 1)
    assert cfg.memory_backend == "mach-virt.ram" and cfg.no_shutdown and cfg.start_paused
    assert cfg.extra["qmp"][0].kind == "fd" and not cfg.extra["qmp"][0].wait
    assert cfg.extra["serial"] == "chardev:charserial0"
    assert cfg.chardevs["charserial0"].backend == "pty"
    [drive] = cfg.drives
    assert (drive.id, drive.node_name, drive.format, drive.read_only) == (
        "libvirt-1-format", "libvirt-1-format", "raw", False)
    assert drive.path == tmp_path / "disk.img"
    assert [d.driver for d in cfg.devices] == ["virtio-blk-device", "virtio-net-device"]
    assert cfg.netdevs[0].id == "hostnet0" and cfg.extra["uuid"].startswith("642282aa")
    assert len(secret_value(cfg.objects["masterKey0"])) == 32


@pytest.mark.parametrize("argv,message", [
    (["-object", "frobnicator,id=x"], "Parameter 'qom-type' does not accept value"),
    (["-blockdev", '{"driver":"file","filename":"/nonexistent/d.img","node-name":"f"}'],
     "Could not open '/nonexistent/d.img': No such file or directory"),
    (["-device", "virtio-blk-device,drive=nothing"],
     "Property 'virtio-blk-device.drive' can't find value 'nothing'"),
    (["-M", "virt,memory-backend=ram0"], "Memory backend not found"),
    (["-object", "memory-backend-ram,id=r,size=64M", "-m", "128",
      "-M", "virt,memory-backend=r"], "does not match the size of the memory backend"),
    (["-mon", "chardev=nothere,mode=control"], 'chardev "nothere" not found'),
])
def test_what_qemu_refuses_at_start_is_a_startup_error(argv, message):
    with pytest.raises(StartupError, match=message):
        parse_qemu_options(argv, MachineConfig())


@pytest.mark.parametrize("argv", [
    ["-M", "virt,gic-version=host"], ["-M", "virt,usb=on"], ["-M", "virt,frob=1"],
    ["-overcommit", "mem-lock=on"], ["-sandbox", "on,obsolete=deny"], ["-boot", "order=z"],
    ["-audiodev", "pa,id=a"], ["-smp", "2,sockets=1,cores=1,threads=1"], ["-uuid", "nope"],
    ["-chardev", "vc,id=c"], ["-chardev", "socket,id=c"], ["-M", "microvm", "-no-acpi"],
])
def test_what_kemu_does_not_do_is_refused_in_one_line(argv):
    with pytest.raises(ConfigError):
        parse_qemu_options(argv, MachineConfig())


def test_accepted_as_qemu_does():
    cfg = parse_qemu_options(["-sandbox", "off", "-msg", "timestamp=on", "-boot",
                              "order=c,strict=on", "-overcommit", "mem-lock=off,cpu-pm=off",
                              "-smp", "2,sockets=1,cores=2,threads=1", "-M", "virt-7.2"],
                             MachineConfig())
    assert cfg.smp == 2 and cfg.machine == "virt"


def test_probe_command_line_gives_the_none_machine_without_serial():
    cfg = parse_qemu_options(["-S", "-no-user-config", "-nodefaults", "-nographic",
                              "-machine", "none,accel=kvm:tcg", "-qmp",
                              "unix:/tmp/p.sock,server=on,wait=off", "-pidfile", "/tmp/p.pid",
                              "-daemonize"], MachineConfig())
    assert (cfg.machine, cfg.accel, cfg.extra["serial"]) == ("none", "tcg", "none")


@pytest.mark.parametrize("argv,message", [
    (["-object", "frobnicator,id=x"], "Parameter 'qom-type' does not accept value"),
    (["-blockdev", '{"driver":"file","filename":"/nonexistent/d.img","node-name":"f"}'],
     "Could not open '/nonexistent/d.img'"),
    (["-device", "virtio-blk-device,drive=nothing"], "can't find value 'nothing'"),
])
def test_startup_errors_exit_1_with_one_line(argv, message):
    proc = subprocess.run(KEMU + ["-kernel", "/k"] + argv, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("kemu: ") and message in line


def test_memory_backend_file_shared_and_private(tmp_path):
    from kemu.memory import RamRegion
    path = tmp_path / "ram"
    shared = RamRegion(0x4000_0000, 1 << 20, "r", path=str(path), shared=True)
    shared.buffer[0:5] = b"hello"
    shared.buffer.flush()
    assert path.read_bytes()[:5] == b"hello" and path.stat().st_size == 1 << 20
    shared.close()
    private = RamRegion(0x4000_0000, 1 << 20, "r", path=str(path))
    assert private.buffer[0:5] == b"hello"
    private.buffer[0:5] = b"xxxxx"
    private.close()
    assert path.read_bytes()[:5] == b"hello"
