"""virtio-net on the aarch64 virt board: user-mode networking through passt.

The guest gets a DHCP lease from passt at boot, fetches a file from an HTTP server
the test runs on the host's loopback (passt maps the gateway address to the
host's 127.0.0.1), and answers a host connection forwarded with hostfwd.
"""

import functools
import hashlib
import http.server
import os
import shutil
import socket
import threading
import time

import pytest

pytestmark = pytest.mark.skipif(shutil.which("passt") is None, reason="passt is not installed")

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dhcp(console) -> str:
    """Wait for the lease the guest takes at boot on eth0; returns the gateway address."""
    m = console.expect(rb"kemu: eth0: [0-9.]+/\d+ from DHCP, gateway ([0-9.]+)", 300)
    console.expect(rb"# ", 60)
    return m.group(1).decode()


@pytest.fixture
def http_server(tmp_path):
    blob = os.urandom(300_000)
    (tmp_path / "blob").write_bytes(blob)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], hashlib.md5(blob).hexdigest()
    server.shutdown()


def test_dhcp_and_fetch_from_host_loopback(guest, console_factory, http_server):
    port, digest = http_server
    c = console_factory("run", "--net", "user")
    gateway = dhcp(c)
    addr = c.run("ip -4 addr show eth0")
    assert "inet " in addr
    c.run(f"wget -q -O /tmp/blob http://{gateway}:{port}/blob", 120)
    assert digest in c.run("md5sum /tmp/blob")
    c.send("poweroff -f\n")
    assert c.wait(60) == 0


def test_hostfwd_reaches_guest_listener(guest, console_factory):
    port = free_port()
    c = console_factory("run", "-netdev", f"user,id=n0,hostfwd=tcp::{port}-:7777",
                        "-device", "virtio-net-device,netdev=n0,mac=52:54:00:aa:bb:cc")
    dhcp(c)
    assert "52:54:00:aa:bb:cc" in c.run("cat /sys/class/net/eth0/address")
    c.run("(echo hello-from-guest | nc -l -p 7777 > /tmp/got &)")    # the host retries
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"hello-from-host\n")
                s.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            if data:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "no answer through hostfwd"
        time.sleep(0.5)
    assert data == b"hello-from-guest\n"
    # nc writes what it got as it gets it: wait for it, not for a time.
    assert "hello-from-host" in c.run(
        "until grep -q hello-from-host /tmp/got; do sleep 0.1; done; cat /tmp/got", 120)
    c.send("poweroff -f\n")
    assert c.wait(60) == 0


def test_passt_is_gone_after_the_machine_ends(guest, console_factory):
    c = console_factory("run", "-nic", "user")
    c.expect(rb"# ", 180)
    pid = c.proc.pid
    children = [p for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == pid]
    assert any(_comm(p).startswith("passt") for p in children)
    c.send("poweroff -f\n")
    assert c.wait(60) == 0
    # passt quits when kemu's end of its socket closes: wait for that, not a time.
    deadline = time.monotonic() + 60
    while any(os.path.exists(f"/proc/{p}") and _comm(p).startswith("passt") for p in children):
        assert time.monotonic() < deadline, "passt outlived the machine"
        time.sleep(0.05)


def _ppid(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_missing_passt_is_one_line(guest, tmp_path):
    import subprocess
    import sys
    env = dict(os.environ, PATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "kemu.cli", "run", "--net", "user"],
                          check=False, capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        ("kemu: user-mode networking needs passt, which is not installed "
        "(Debian/Ubuntu: apt-get install passt)")]
