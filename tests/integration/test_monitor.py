"""The human monitor (HMP) in QEMU's spelling, on a real kemu process: -monitor
stdio, -serial mon:stdio's Ctrl-A c, -monitor unix:..., QMP's
human-monitor-command through qmp-shell -H; compared with what QEMU prints."""

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from kemu.testing.stdio_console import Console

KEMU = [sys.executable, "-m", "kemu.cli"]
QEMU = shutil.which("qemu-system-aarch64")


def qemu_hmp(lines: str) -> str:
    """What QEMU's monitor prints for ``lines`` (-S: nothing runs)."""
    out = subprocess.run([QEMU, "-M", "virt", "-nographic", "-monitor", "stdio", "-S",
                          "-serial", "none"], input=lines + "quit\n", capture_output=True,
                         text=True, timeout=60).stdout
    return out


def start_with_socket(args: list[str], path) -> subprocess.Popen:
    """kemu run with ``args``, once the socket at ``path`` exists."""
    proc = subprocess.Popen(KEMU + ["run", "-S", "-serial", "none", "-display", "none", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    return proc


def test_monitor_stdio_commands_and_help_as_qemu_prints_them(guest):
    vm = Console(["run", "-S", "-serial", "none", "-monitor", "stdio", "-name", "hmp1"])
    try:
        vm.expect(rb"kemu [\d.]+ monitor - type 'help' for more information\r\n\(qemu\) ")
        vm.send("info status\n")
        vm.expect(rb"VM status: paused \(prelaunch\)\r\n\(qemu\) ")
        vm.send("info name\n")
        vm.expect(rb"hmp1\r\n\(qemu\) ")
        vm.send("c\ninfo status\n")
        vm.expect(rb"VM status: running\r\n\(qemu\) ")
        vm.send("stop\ninfo status\n")
        vm.expect(rb"VM status: paused\r\n\(qemu\) ")
        vm.send("info cpus\n")
        vm.expect(rb"\* CPU #0: thread_id=\d+\r\n")
        vm.send("info vnc\n")
        vm.expect(rb"Error: The feature 'vnc' is not enabled\r\n")
        vm.send("sendkey ctrl-alt-f1\n")
        vm.expect(rb"Error: the virt board has no keyboard \(add -device virtio-keyboard-device\)\r\n")
        vm.send("frob\n")
        vm.expect(rb"unknown command: 'frob'\r\n")
        start = len(vm.buffer)
        vm.send("help\n")
        vm.expect(rb"system_reset  -- reset the system\r\n")
        kemu_help = vm.buffer[start:].decode().replace("\r", "").splitlines()
        vm.send("q\n")
        assert vm.wait(30) == 0
    finally:
        vm.close()
    if QEMU:
        # Each command kemu has is listed exactly as QEMU lists it.
        qemu_help = set(qemu_hmp("help\n").replace("\r", "").splitlines())
        for line in kemu_help:
            if " -- " in line:
                assert line in qemu_help, line


def test_ctrl_a_c_switches_between_console_and_monitor(guest):
    vm = Console(["run"])
    try:
        vm.expect(rb"# ", timeout=120)
        vm.send("\x01c")
        vm.expect(rb"monitor - type 'help' for more information\r\n\(qemu\) ")
        vm.send("info status\n")
        vm.expect(rb"VM status: running\r\n\(qemu\) ")
        vm.send("\x01c")                 # back to the guest's console
        vm.send("echo back-$((6*7))\n")
        vm.expect(rb"back-42")
        vm.send("\x01cinfo status\n")   # and again: a prompt, no second banner
        vm.expect(rb"VM status: running\r\n\(qemu\) ")
        assert vm.buffer.count(b"monitor - type 'help'") == 1
        vm.send("system_powerdown\n")
        assert vm.wait(60) == 0          # the guest's acpid powered it off
    finally:
        vm.close()


def test_monitor_on_a_unix_socket(guest, tmp_path):
    path = tmp_path / "mon.sock"
    proc = start_with_socket(["-monitor", f"unix:{path},server=on,wait=off"], path)
    try:
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(str(path))
        conn.settimeout(30)
        conn.sendall(b"info status\ninfo chardev\nquit\n")
        out = b""
        while chunk := conn.recv(4096):
            out += chunk
        text = out.decode()
        assert text.startswith("kemu ") and "(qemu) VM status: paused (prelaunch)\r\n" in text
        assert f"filename=disconnected:unix:{path},server=on" in text
        assert proc.wait(30) == 0
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_qmp_shell_hmp_mode(guest, tmp_path):
    shell = shutil.which("qmp-shell", path=os.path.dirname(sys.executable))
    if shell is None:
        pytest.skip("qmp-shell is not installed (scripts/bootstrap.sh --test)")
    sock = tmp_path / "qmp.sock"
    proc = start_with_socket(["-qmp", f"unix:{sock},server=on,wait=off"], sock)
    try:
        out = subprocess.run([shell, "-H", str(sock)], input="info status\ninfo version\n",
                             capture_output=True, text=True, timeout=60)
        assert "Traceback" not in out.stderr, out.stderr
        assert "VM status: paused (prelaunch)" in out.stdout
        assert "7.2.0 (kemu " in out.stdout
    finally:
        proc.kill()
        proc.wait()
