"""The serial console's host ends: a pty (as virsh console opens it) and a file."""

import os
import select
import threading
import tty

from kemu.backends.chardev import open_chardev
from kemu.machines.config import ChardevConfig


def test_pty_carries_output_and_input():
    pty = open_chardev(ChardevConfig("pty", "ser0"))
    got = []
    arrived = threading.Event()
    pty.start(lambda data: (got.append(data), arrived.set()))
    try:
        assert pty.filename == f"pty:{pty.path}"
        fd = os.open(pty.path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        pty.write(b"guest says hi\r\n")
        seen = b""
        while b"hi\r\n" not in seen:
            assert select.select([fd], [], [], 10)[0]
            seen += os.read(fd, 100)
        os.write(fd, b"typed")
        assert arrived.wait(10) and b"".join(got) == b"typed"
        os.close(fd)
        # nobody reading: output is dropped, never blocks the guest
        for _ in range(2000):
            pty.write(b"x" * 1024)
    finally:
        pty.close()


def test_file_chardev_appends_or_truncates(tmp_path):
    path = tmp_path / "serial.log"
    path.write_bytes(b"old\n")
    f = open_chardev(ChardevConfig("file", "s", {"path": str(path), "append": "on"}))
    f.write(b"new\n")
    f.close()
    assert path.read_bytes() == b"old\nnew\n"
    f = open_chardev(ChardevConfig("file", "s", {"path": str(path)}))
    f.write(b"only\n")
    f.close()
    assert path.read_bytes() == b"only\n"
