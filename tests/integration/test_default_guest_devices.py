"""The default guest configures what it has (issue 17, item 7): a DHCP lease on
its NIC at boot (so the host is reachable at QEMU's 10.0.2.2 with nothing typed
first), one line per disk saying how to mount it, and acpid only where there is
an input device, without complaints."""

import base64
import http.server
import shutil
import threading

import pytest

from kemu.guest.debian import START_ACPID

READY = rb"kemu guest ready"


@pytest.fixture
def http_server(tmp_path):
    (tmp_path / "hello").write_text("hello from the host\n")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.mark.skipif(shutil.which("passt") is None, reason="passt is not installed")
def test_the_guest_takes_a_lease_at_boot_and_reaches_the_host(guest, console_factory,
                                                              http_server):
    c = console_factory("run", "--net", "user")
    c.expect(rb"kemu: eth0: 10\.0\.2\.15/24 from DHCP, gateway 10\.0\.2\.2, DNS 10\.0\.2\.3",
             300)
    c.expect(READY, 60)
    c.expect(rb"# ", 60)
    # The first thing typed: no udhcpc, no ip, nothing.
    assert "hello from the host" in c.run(f"wget -q -O- http://10.0.2.2:{http_server}/hello",
                                          120)
    assert "nameserver 10.0.2.3" in c.run("cat /etc/resolv.conf")
    c.send("poweroff -f\n")
    assert c.wait(60) == 0


def test_the_guest_says_how_to_mount_its_disk(guest, console_factory, tmp_path):
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * (8 << 20))
    c = console_factory("run", "--disk", str(disk))
    line = c.expect(rb"kemu: disk /dev/vda \(8 MiB\): mount (/dev/vda) /mnt to use it"
                    rb" \(mke2fs /dev/vda first if it is blank\)", 300)
    c.expect(READY, 60)
    c.expect(rb"# ", 60)
    # What the line says works.
    c.run("mke2fs -q /dev/vda", 120)
    c.run(f"mount {line.group(1).decode()} /mnt && echo kept > /mnt/f && umount /mnt", 120)
    c.send("poweroff -f\n")
    assert c.wait(60) == 0


def test_a_guest_without_nic_or_disk_boots_quietly(guest, console_factory):
    c = console_factory("run")
    c.expect(rb"# ", 300)
    booted = c.buffer.decode(errors="replace")
    # acpid is there for the power button (an input device), and said nothing.
    assert "acpid -f -d" in c.run("ps")
    # Without any input device (both boards have a power button: hide it) the
    # boot's acpid step starts nothing and says nothing.
    c.run("killall acpid; mount -t tmpfs none /sys/class/input; mount -t tmpfs none /dev/input")
    script = base64.b64encode(START_ACPID.encode()).decode()
    c.run(f"echo {script} | base64 -d > /tmp/acpid.sh; echo wait >> /tmp/acpid.sh")
    out = c.run("sh /tmp/acpid.sh; echo done")
    assert out.strip().endswith("done") and "acpid:" not in out, out
    assert c.run("pidof acpid || echo none").strip().endswith("none")
    c.send("poweroff -f\n")
    assert c.wait(60) == 0
    assert "acpid" not in booted
    assert "kemu: eth" not in booted and "kemu: disk" not in booted
