"""Files kemu creates and deletes, and a console nobody reads (issue 16, items 4, 5, 8).

- kemu deletes only what it created: ``-qmp unix:PATH`` over a regular file is
  refused in one line and the file is left; a socket another kemu listens on
  is refused too.  (QEMU 7.2, measured here, unlinks both and takes over.)
- Modes: UNIX sockets 0600 (QMP and vsock), the pidfile 0600 as QEMU's.
- With stdout a pipe nobody reads and the guest printing, QMP ``stop`` and
  ``quit``, SIGTERM and SIGINT still work at once.
"""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import struct
import subprocess
import termios

import pytest

from hostio import KEMU, RawQmp, end, quit_and_wait, wait_for, wait_for_socket


def kemu_paused(guest, *extra: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(KEMU + ["-M", "virt", "-kernel", str(guest.kernel), "-S",
                                    "-serial", "none", "-display", "none", *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=stderr, text=True)


def test_qmp_over_a_regular_file_is_refused_and_the_file_kept(guest, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("do not delete\n")
    proc = kemu_paused(guest, "-qmp", f"unix:{precious},server=on,wait=off")
    try:
        assert proc.wait(60) == 2
    finally:
        end(proc)
    err = proc.stderr.read().strip()
    assert len(err.splitlines()) == 1 and "not a socket" in err, err
    assert precious.read_text() == "do not delete\n"


def test_a_socket_a_running_kemu_listens_on_is_not_taken_over(guest, tmp_path):
    sock = tmp_path / "qmp.sock"
    first = kemu_paused(guest, "-qmp", f"unix:{sock},server=on,wait=off")
    try:
        wait_for_socket(sock, first)
        inode = os.stat(sock).st_ino
        second = kemu_paused(guest, "-qmp", f"unix:{sock},server=on,wait=off")
        try:
            assert second.wait(60) == 2
        finally:
            end(second)
        err = second.stderr.read().strip()
        assert len(err.splitlines()) == 1 and "another process is listening" in err, err
        # The first kemu still owns its socket and answers on it.
        assert os.stat(sock).st_ino == inode
        qmp = RawQmp(sock).negotiate()
        assert qmp.execute("quit") == {"return": {}}
        assert first.wait(30) == 0
        assert not sock.exists()
    finally:
        end(first)


def test_a_stale_socket_is_replaced(guest, tmp_path):
    import socket
    sock = tmp_path / "qmp.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()                    # the file stays, nobody listens
    proc = kemu_paused(guest, "-qmp", f"unix:{sock},server=on,wait=off")
    try:
        wait_for(lambda: os.path.exists(sock) and _connects(sock), 60, "the new socket", proc)
        quit_and_wait(RawQmp(sock).negotiate(), proc)
    finally:
        end(proc)


def _connects(path) -> bool:
    import socket
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def test_modes_of_created_files(guest, tmp_path):
    sock, uds, pidfile = tmp_path / "qmp.sock", tmp_path / "v.sock", tmp_path / "kemu.pid"
    old = os.umask(0o022)            # the usual umask: QEMU's sockets would be 0755
    try:
        proc = kemu_paused(guest, "-qmp", f"unix:{sock},server=on,wait=off",
                           "-pidfile", str(pidfile),
                           "-device", f"vhost-vsock-device,guest-cid=3,uds={uds}")
    finally:
        os.umask(old)
    try:
        wait_for_socket(sock, proc)
        wait_for(pidfile.exists, 30, "the pidfile", proc)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(uds).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(pidfile).st_mode) == 0o600
        # No thread of kemu changed the process-wide umask to get there.
        umask_line = [line for line in open(f"/proc/{proc.pid}/status")
                      if line.startswith("Umask:")]
        assert umask_line == ["Umask:\t0022\n"]
        quit_and_wait(RawQmp(sock).negotiate(), proc)
    finally:
        end(proc)
    assert not sock.exists() and not uds.exists() and not pidfile.exists()


def _pipe_bytes(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


@pytest.mark.parametrize("how", ["qmp", "SIGTERM", "SIGINT"])
def test_an_unread_console_does_not_take_the_machine_hostage(guest, tmp_path, how):
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(KEMU + ["run", "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        seen = b""
        while b"\n# " not in seen:               # the shell prompt; then no more reading
            data = os.read(proc.stdout.fileno(), 4096)
            assert data, seen[-2000:]
            seen += data
        proc.stdin.write(b"while true; do echo flooding the console nobody reads; done\n")
        proc.stdin.flush()
        wait_for_socket(sock, proc)
        qmp = RawQmp(sock, timeout=20).negotiate()
        # stdout is never read: wait until the pipe is (about) full: 64 KiB on Linux,
        # less the tail of a page a write did not fill.
        wait_for(lambda: _pipe_bytes(proc.stdout.fileno()) >= 60000, 120,
                 "a full stdout pipe", proc)
        if how == "qmp":
            assert qmp.execute("stop") == {"return": {}}
            assert qmp.execute("query-status")["return"]["status"] == "paused"
            assert qmp.execute("cont") == {"return": {}}
            assert qmp.execute("quit") == {"return": {}}
        else:
            proc.send_signal(getattr(signal, how))
        assert proc.wait(30) == 0
        reason = "host-qmp-quit" if how == "qmp" else "host-signal"
        assert qmp.event("SHUTDOWN")["data"]["reason"] == reason
    finally:
        end(proc)
    err = proc.stderr.read().decode(errors="replace")
    # What stdout could not take was dropped and counted (if the 1 MiB buffer
    # filled before the end; tests/unit/test_console_output.py checks the count).
    assert "Traceback" not in err and "internal error" not in err, err
