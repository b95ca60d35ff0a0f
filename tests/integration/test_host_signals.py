"""SIGTERM, SIGHUP and SIGINT end kemu as they end QEMU (issue 16, item 2).

QEMU 7.2, measured here: ``qemu-system-aarch64: terminating on signal 15 from
pid N (bash)`` on stderr, SHUTDOWN ``{"guest": false, "reason": "host-signal"}``
to QMP clients, its QMP socket and pidfile removed, exit status 0.  kemu
must do the same, and keep every write the guest was told had completed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

import pytest

from kemu.testing.stdio_console import Console
from hostio import KEMU, RawQmp, wait_for_socket

MiB = 1 << 20
BLOCKS = 64                 # 1 MiB blocks the guest writes one after another


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)


def block_pattern(i: int) -> bytes:
    return (f"BLK{i:04d}\n".encode() * (MiB // 8 + 1))[:MiB]


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_sigterm_during_odirect_writes_keeps_what_the_guest_was_told(guest, tmp_path, fmt):
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed (apt-get install qemu-utils)")
    image = tmp_path / f"disk.{fmt}"
    proc = qemu_img("create", "-q", "-f", fmt, str(image), f"{BLOCKS + 8}M")
    assert proc.returncode == 0, proc.stderr
    sock, pidfile = tmp_path / "qmp.sock", tmp_path / "kemu.pid"
    vm = Console(["run", "-drive", f"file={image},format={fmt},if=virtio",
                  "-qmp", f"unix:{sock},server=on,wait=off", "-pidfile", str(pidfile)])
    try:
        vm.expect(rb"# ")
        qmp = RawQmp(sock).negotiate()
        # mk TEXT N: /tmp/b is the 8-byte TEXT repeated to 8 << N bytes (doubling is
        # quick on TCG, where `yes | head` takes seconds per MiB).
        vm.run('mk() { echo $1 > /tmp/b; for k in $(seq $2); do cat /tmp/b /tmp/b > /tmp/c;'
               ' mv /tmp/c /tmp/b; done; }')
        # The case of the report: 4 MiB in one O_DIRECT write, then the signal.
        vm.run(f"mk FOURMIB 19 && dd if=/tmp/b of=/dev/vda bs=4M seek={BLOCKS // 4} "
               "oflag=direct")
        # Then the signal while 1 MiB O_DIRECT writes follow one another.
        vm.send(f"i=0; while [ $i -lt {BLOCKS} ]; do mk $(printf BLK%04d $i) 17 &&"
                " dd if=/tmp/b of=/dev/vda bs=1M seek=$i oflag=direct 2>/dev/null &&"
                " echo W$i=ok; i=$((i+1)); done\n")
        vm.expect(rb"W3=ok")
        sender = os.getpid()
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
        status = vm.wait(60)
        assert qmp.event("SHUTDOWN")["data"] == {"guest": False, "reason": "host-signal"}
    finally:
        vm.close()
    err = vm.stderr
    assert status == 0, err
    assert f"kemu: terminating on signal 15 from pid {sender} (" in err, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert not sock.exists() and not pidfile.exists()

    done = {int(n) for n in re.findall(rb"W(\d+)=ok", vm.buffer)}
    assert {0, 1, 2, 3} <= done
    if fmt == "qcow2":
        check = qemu_img("check", str(image))
        assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout
        raw = tmp_path / "disk.raw"
        assert qemu_img("convert", "-O", "raw", str(image), str(raw)).returncode == 0
    else:
        raw = image
    data = raw.read_bytes()
    four = data[BLOCKS // 4 * 4 * MiB:(BLOCKS // 4 + 1) * 4 * MiB]
    assert four == (b"FOURMIB\n" * (MiB // 2))[:4 * MiB]
    lost = [i for i in sorted(done) if data[i * MiB:(i + 1) * MiB] != block_pattern(i)]
    assert not lost, f"blocks acknowledged to the guest but not on the image: {lost}"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_each_terminating_signal_ends_kemu_cleanly(guest, tmp_path, signum):
    sock, pidfile = tmp_path / "qmp.sock", tmp_path / "kemu.pid"
    proc = subprocess.Popen(KEMU + ["-M", "virt", "-kernel", str(guest.kernel),
                                    "-initrd", str(guest.initrd), "-append", guest.append,
                                    "-serial", "none", "-display", "none",
                                    "-qmp", f"unix:{sock},server=on,wait=off",
                                    "-pidfile", str(pidfile)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(sock, proc)
        qmp = RawQmp(sock).negotiate()
        os.kill(proc.pid, signum)
        assert qmp.event("SHUTDOWN")["data"] == {"guest": False, "reason": "host-signal"}
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().strip()
    assert err == f"kemu: terminating on signal {int(signum)} from pid {os.getpid()} " \
                  f"({open('/proc/self/comm').read().strip()})", err
    assert not sock.exists() and not pidfile.exists()
