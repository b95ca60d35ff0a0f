"""-device virtio-gpu-device / keyboard / tablet / mouse, -vnc and -display, and the QMP
display commands, on a real virt machine that is built but not started (no guest)."""

import socket
import struct

import pytest

from kemu.api import Machine
from kemu.options import parse_qemu_options
from kemu.display.surface import Rect
from kemu.errors import ConfigError
from kemu.machines.config import MachineConfig
from kemu.machines.display import add_default_display_devices, wants_display
from kemu.qmp.commands import Commands
from kemu.qmp.protocol import QmpError


@pytest.fixture
def kernel(tmp_path):
    path = tmp_path / "raw.bin"
    path.write_bytes(b"\x00\x00\x00\x14" * 16)      # a raw binary: b . (never run here)
    return path


def free_display():
    with socket.socket() as s:
        for n in range(1000, 2000):
            try:
                s.bind(("127.0.0.1", 5900 + n))
                return n
            except OSError:
                continue
    pytest.skip("no free port")


def test_cli_spellings():
    c = parse_qemu_options(["-vnc", ":3,password=on"], MachineConfig())
    assert c.extra["vnc"].port == 5903 and c.extra["vnc"].password
    c = parse_qemu_options(["-display", "vnc=127.0.0.1:4"], MachineConfig())
    assert c.extra["display"] == "vnc" and c.extra["vnc"].port == 5904
    c = parse_qemu_options(["-display", "none"], MachineConfig())
    assert c.extra["display"] == "none" and "vnc" not in c.extra
    for bad in (["-display", "gtk"], ["-vnc", "5901"], ["-vnc", ":1,websocket=on"]):
        with pytest.raises(ConfigError):
            parse_qemu_options(bad, MachineConfig())
    assert wants_display(["-m", "256", "-vnc", ":1"])
    assert wants_display(["-device", "virtio-gpu-device,xres=800"])
    assert not wants_display(["-vnc", "none"]) and not wants_display(["-display", "none"])
    c = MachineConfig()
    parse_qemu_options(["-device", "virtio-gpu-device,xres=640"], c)
    add_default_display_devices(c)
    assert [d.driver for d in c.devices] == ["virtio-gpu-device", "virtio-keyboard-device",
                                             "virtio-tablet-device"]


def test_device_properties_are_checked(kernel):
    for dev, msg in (("virtio-gpu-device,xres=0", "out of range"),
                     ("virtio-gpu-device,max_outputs=2", "out of range"),
                     ("virtio-gpu-device,edid=maybe", "on or off"),
                     ("virtio-gpu-device,max_hostmem=1K", "1M..4G"),
                     ("virtio-gpu-device,bogus=1", "unsupported property"),
                     ("virtio-tablet-device,xres=1", "unsupported property")):
        with pytest.raises(ConfigError, match=msg):
            Machine(kernel=kernel, devices=[dev])
    with pytest.raises(ConfigError, match="one graphics adapter"):
        Machine(kernel=kernel, devices=["virtio-gpu-device", "virtio-gpu-device"])


def test_machine_display_and_qmp_commands(kernel, tmp_path):
    n = free_display()
    vm = Machine(kernel=kernel, devices=["virtio-gpu-device,xres=320,yres=200",
                                         "virtio-keyboard-device", "virtio-tablet-device",
                                         "virtio-mouse-device"],
                 vnc=f"127.0.0.1:{n},password=on")
    try:
        console = vm.display
        assert (console.surface.width, console.surface.height) == (320, 200)
        assert len(console.keyboards) == len(console.tablets) == len(console.mice) == 1
        console.surface.fill(Rect(0, 0, 2, 1), b"\x10\x20\x30\x00")
        image = vm.screenshot()
        assert image.size == (320, 200) and image.getpixel((1, 0)) == (0x30, 0x20, 0x10)
        cmds = Commands(vm)
        cmds("screendump", {"filename": str(tmp_path / "s.ppm")})
        data = (tmp_path / "s.ppm").read_bytes()
        assert data.startswith(b"P6\n320 200\n255\n") and data[15:18] == b"\x30\x20\x10"
        cmds("screendump", {"filename": str(tmp_path / "s.png"), "format": "png"})
        assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        for args, msg in (({"filename": str(tmp_path / "x"), "format": "bmp"}, "format"),
                          ({"filename": str(tmp_path / "no" / "x.ppm")}, "cannot write"),
                          ({"filename": "x", "head": 1}, "Head 1"),
                          ({}, "filename")):
            with pytest.raises(QmpError, match=msg):
                cmds("screendump", args)
        info = cmds("query-vnc", {})
        assert info["enabled"] and info["service"] == str(5900 + n) and info["auth"] == "vnc"
        assert cmds("query-display-options", {}) == {"type": "default"}
        # the password, then a client logging in with it (the server's thread starts
        # with the machine, which this test does not run)
        vm.vnc.start()
        cmds("set_password", {"protocol": "vnc", "password": "pw"})
        with pytest.raises(QmpError, match="protocol"):
            cmds("set_password", {"protocol": "spice", "password": "pw"})
        with pytest.raises(QmpError, match="time"):
            cmds("expire_password", {"protocol": "vnc", "time": "soon"})
        from kemu.display.vnc import vnc_auth_response
        sock = socket.create_connection(("127.0.0.1", 5900 + n), timeout=10)
        sock.recv(12)
        sock.sendall(b"RFB 003.008\n")
        assert sock.recv(2) == b"\x01\x02"
        sock.sendall(b"\x02")
        challenge = sock.recv(16)
        sock.sendall(vnc_auth_response("pw", challenge))
        assert struct.unpack(">I", sock.recv(4))[0] == 0
        sock.close()
        cmds("expire_password", {"protocol": "vnc", "time": "now"})
        assert not vm.vnc._check_auth(b"0" * 16, vnc_auth_response("pw", b"0" * 16))
    finally:
        vm.stop() if vm._started else vm._board.close()


def test_no_display_without_devices(kernel):
    vm = Machine(kernel=kernel)
    try:
        cmds = Commands(vm)
        assert cmds("query-vnc", {}) == {"enabled": False}
        with pytest.raises(QmpError, match="no display"):
            cmds("screendump", {"filename": "/tmp/x.ppm"})
        with pytest.raises(QmpError, match="not active"):
            cmds("set_password", {"protocol": "vnc", "password": "x"})
    finally:
        vm._board.close()


def test_vnc_without_adapter_is_blank_640x480(kernel):
    n = free_display()
    vm = Machine(kernel=kernel, vnc=f"127.0.0.1:{n}")
    try:
        assert (vm.display.surface.width, vm.display.surface.height) == (640, 480)
        with pytest.raises(QmpError, match="enable password auth"):
            Commands(vm)("set_password", {"protocol": "vnc", "password": "x"})
    finally:
        vm._board.close()


def test_hmp_sendkey_and_info_vnc(kernel):
    from kemu.monitor.hmp import Hmp
    n = free_display()
    vm = Machine(kernel=kernel, devices=["virtio-keyboard-device"], vnc=f"127.0.0.1:{n}")
    try:
        sent = []
        vm.display.keyboards[0].key = lambda code, down: sent.append((code, down))
        hmp = Hmp(Commands(vm))
        assert hmp.execute("sendkey ctrl-alt-f1") == ""
        assert sent == [(29, True), (56, True), (59, True), (59, False), (56, False),
                        (29, False)]
        assert hmp.execute("sendkey ctrl-bogus").startswith("Error: unknown key 'bogus'")
        assert f"Server: 127.0.0.1:{5900 + n} (ipv4)" in hmp.execute("info vnc")
    finally:
        vm._board.close()


def test_vnc_serves_after_daemonize(kernel, tmp_path):
    """The VNC socket is bound before -daemonize forks; its thread runs in the daemon."""
    import os
    import signal
    import subprocess
    import sys
    n = free_display()
    pidfile = tmp_path / "kemu.pid"
    proc = subprocess.run([sys.executable, "-m", "kemu.cli", "-M", "virt", "-kernel", str(kernel),
                           "-vnc", f"127.0.0.1:{n}", "-daemonize", "-serial", "none",
                           "-display", "none", "-pidfile", str(pidfile)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    pid = int(pidfile.read_text())
    try:
        with socket.create_connection(("127.0.0.1", 5900 + n), timeout=20) as sock:
            assert sock.recv(12) == b"RFB 003.008\n"
    finally:
        os.kill(pid, signal.SIGTERM)
