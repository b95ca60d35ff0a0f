"""-no-shutdown (issue 13): the guest's power-off stops the machine, SHUTDOWN is
sent, kemu stays up; system_reset then cont boots the guest again (libvirt's
reboot), and kemu ends only on quit or SIGTERM.  The serial console is a pty
chardev, read as virsh console reads it."""

import json
import os
import re
import select
import socket
import subprocess
import sys
import time
import tty

KEMU = [sys.executable, "-m", "kemu.cli"]


class Qmp:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.f = self.sock.makefile("rwb")
        self.events = []
        assert b"QMP" in self.f.readline()
        self("qmp_capabilities")

    def __call__(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg.get("return", msg.get("error"))

    def event(self, name):
        """Wait for the next ``name`` event (the socket has no timeout: the test's does)."""
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name:
                    return self.events.pop(i)
            self.events.append(json.loads(self.f.readline()))


def read_until(fd, pattern, seen, timeout=120):
    deadline = time.monotonic() + timeout
    while not re.search(pattern, seen, re.S):
        assert time.monotonic() < deadline, f"no {pattern!r}: {bytes(seen[-300:])!r}"
        if select.select([fd], [], [], 1.0)[0]:
            seen += os.read(fd, 4096)
    return seen


def test_no_shutdown_keeps_kemu_up_until_quit(guest, tmp_path):
    sock = tmp_path / "q.sock"
    proc = subprocess.Popen(
        KEMU + ["-M", "virt-7.2", "-m", "256", "-kernel", str(guest.kernel), "-initrd",
                str(guest.initrd), "-append", guest.append, "-display", "none",
                "-no-shutdown", "-chardev", "pty,id=ser0", "-serial", "chardev:ser0",
                "-chardev", f"socket,id=mon,path={sock},server=on,wait=off",
                "-mon", "chardev=mon,mode=control"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # As QEMU, kemu names the pty on stderr (libvirt asks query-chardev).
        line = proc.stderr.readline().decode()
        pty = re.match(r"char device redirected to (/dev/pts/\d+) \(label ser0\)", line)
        assert pty, line
        fd = os.open(pty.group(1), os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        qmp = Qmp(sock)
        assert qmp("query-chardev")[0] == {"label": "ser0", "filename": f"pty:{pty.group(1)}",
                                           "frontend-open": True}
        seen = read_until(fd, rb"kemu guest ready.*# ", bytearray())
        qmp("system_powerdown")
        assert qmp.event("SHUTDOWN")["data"] == {"guest": True, "reason": "guest-shutdown"}
        qmp.event("STOP")
        assert qmp("query-status")["status"] == "shutdown"
        assert "Resetting the Virtual Machine is required" in qmp("cont")["desc"]
        assert proc.poll() is None                    # still up
        qmp("system_reset")
        assert qmp("query-status")["status"] == "prelaunch"
        qmp("cont")
        qmp.event("RESUME")
        read_until(fd, rb"(kemu guest ready.*){2}# ", seen)   # booted again
        qmp("quit")
        assert proc.wait(60) == 0
        os.close(fd)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
