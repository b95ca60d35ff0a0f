"""Bad input from the host side (issue 16, item 6): one line each, never a hang,
a MemoryError or a traceback.  Real kemu processes."""

import os
import subprocess

import pytest

from hostio import KEMU, KemuEnded, RawQmp, end, quit_and_wait, wait_for_socket


def run_kemu(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(KEMU + list(args), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


@pytest.mark.parametrize("option", ["-kernel", "-initrd"])
@pytest.mark.parametrize("path", ["/dev/zero", "/dev/urandom", "fifo", "dir"])
def test_non_regular_boot_files_are_refused(guest, tmp_path, option, path):
    if path == "fifo":
        path = str(tmp_path / "fifo")
        os.mkfifo(path)          # nobody writes it: opening must not block either
    elif path == "dir":
        path = str(tmp_path)
    files = {"-kernel": str(guest.kernel), "-initrd": str(guest.initrd), option: path}
    proc = run_kemu("-M", "virt", "-kernel", files["-kernel"], "-initrd", files["-initrd"],
                    "-nographic", timeout=30)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert path in line and ("not a regular file" in line or "directory" in line), line


def test_oversized_boot_file_is_refused(guest, tmp_path):
    big = tmp_path / "huge-initrd"
    with open(big, "wb") as f:
        f.truncate(2 << 30)      # sparse: 2 GiB that cost nothing to make
    proc = run_kemu("-M", "virt", "-kernel", str(guest.kernel), "-initrd", str(big),
                    "-nographic", timeout=30)
    assert proc.returncode == 2
    assert "too large" in one_line(proc.stderr)


def test_huge_memory_works_or_is_one_line(guest, tmp_path):
    """-m 100G: refused in one line as QEMU 7.2 refuses it here ("cannot set up guest
    memory ... Cannot allocate memory", status 1), or, on a host that can reserve it,
    a machine that starts."""
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(KEMU + ["-M", "virt", "-m", "100G", "-kernel", str(guest.kernel),
                                    "-S", "-serial", "none", "-display", "none",
                                    "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        try:
            wait_for_socket(sock, proc, 60)
        except KemuEnded:
            proc.wait(30)
            assert proc.returncode == 1
            assert "cannot set up guest memory" in one_line(proc.stderr.read())
            return
        quit_and_wait(RawQmp(sock).negotiate(), proc)
    finally:
        end(proc)


HOSTILE = [
    b"[" * 100_000 + b"]" * 100_000 + b"\n",
    b"{" + b'"a":{' * 100_000 + b"}" * 100_001 + b"\n",
    b'{"execute": "query-status", "arguments": {"x": ' + b"9" * 100_000 + b"}}\n",
    b"9" * 100_000 + b"\n",
    b'{"execute": "query-status", "id": ' + b"1" * 100_000 + b"}\n",
]


def test_hostile_qmp_messages_get_error_replies(guest, tmp_path):
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(KEMU + ["-M", "virt", "-kernel", str(guest.kernel), "-S",
                                    "-serial", "none", "-display", "none",
                                    "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        wait_for_socket(sock, proc)
        qmp = RawQmp(sock).negotiate()
        for message in HOSTILE:
            reply = qmp.send_raw(message)
            assert "error" in reply, (message[:40], reply)
            # The connection is still up and the machine answers.
            assert qmp.execute("query-status")["return"]["status"] == "prelaunch"
        quit_and_wait(qmp, proc)
    finally:
        end(proc)
    err = proc.stderr.read().decode(errors="replace")
    assert "Traceback" not in err and "RecursionError" not in err, err
