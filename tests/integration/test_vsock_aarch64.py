"""virtio-vsock on the aarch64 virt board, host side on UNIX sockets (Firecracker's convention).

busybox has no vsock, so a tiny static tool (tests/guests/vsock_tool.c) is
cross-compiled at test time and handed to the guest as a raw virtio disk.
"""

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

CC = "aarch64-linux-gnu-gcc"
SOURCE = Path(__file__).parent.parent / "guests" / "vsock_tool.c"


@pytest.fixture(scope="module")
def vsock_disk(tmp_path_factory):
    if shutil.which(CC) is None:
        pytest.skip(f"{CC} is not installed (apt-get install gcc-aarch64-linux-gnu)")
    out = tmp_path_factory.mktemp("vsock")
    tool = out / "vs"
    proc = subprocess.run([CC, "-static", "-O2", "-s", "-o", str(tool), str(SOURCE)],
                          check=False, capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot build the vsock tool: {proc.stderr.strip()[-300:]}")
    size = tool.stat().st_size
    disk = out / "disk.raw"
    disk.write_bytes(tool.read_bytes().ljust(4 << 20, b"\0"))
    return disk, size


def test_vsock_round_trips(guest, console_factory, vsock_disk, tmp_path):
    disk, size = vsock_disk
    uds = str(tmp_path / "v.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(uds + "_5000")
    listener.listen()
    got = []

    def serve():
        conn, _ = listener.accept()
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        got.append(data)
        conn.sendall(b"host-got-%d" % len(data))
        conn.close()
    threading.Thread(target=serve, daemon=True).start()

    c = console_factory("run", "--disk", str(disk),
                        "-device", f"vhost-vsock-device,guest-cid=3,uds={uds}")
    c.expect(rb"# ", 180)
    c.run(f"head -c {size} /dev/vda > /tmp/vs && chmod +x /tmp/vs")
    # guest -> host, a megabyte through the credit window
    out = c.run("/tmp/vs bulk 2 5000 1000000", 120)
    assert "reply:host-got-1000000" in out
    assert len(got[0]) == 1000000 and got[0][:26] == b"abcdefghijklmnopqrstuvwxyz"
    # nobody listening on the host: the guest's connect fails
    c.send("/tmp/vs connect 2 5999 x; echo status=$?\n")
    c.expect(rb"status=1")
    # host -> guest: CONNECT 6000 on the UNIX socket
    c.send("/tmp/vs listen 6000\n")
    c.expect(rb"listening")
    host = socket.socket(socket.AF_UNIX)
    host.settimeout(60)
    host.connect(uds)
    host.sendall(b"CONNECT 6000\n")
    line = b""
    while not line.endswith(b"\n"):
        line += host.recv(1)
    assert line.startswith(b"OK ")
    host.sendall(b"ping-from-host")
    host.shutdown(socket.SHUT_WR)
    reply = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (chunk := host.recv(4096)):
        reply += chunk
    assert reply == b"pong:ping-from-host"
    c.expect(rb"got:ping-from-host")
    c.send("poweroff -f\n")
    assert c.wait(60) == 0
