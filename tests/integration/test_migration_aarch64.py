"""Live migration between two kemu processes (QMP migrate, -incoming), default aarch64 guest.

The source guest dirties memory in a loop while its RAM is sent; the
destination, started with the same command line and ``-incoming``, goes on
running the loop and answering on its console.  Guest RAM at the switch is
compared through kemu's ``x-checksum`` capability (SHA-256 of RAM on the
source once stopped, on the destination before it starts).  A cancelled
migration leaves the source running; a destination with another
configuration refuses the stream in one line and the source runs on.
"""

from __future__ import annotations

import re
import socket
import time

import pytest
from kemu.testing.stdio_console import Console

from kemu.testing.qmp_client import QmpClient

MIGRATING = ("setup", "active", "device")


Qmp = QmpClient


def kemu_args(guest, memory: str = "256") -> list[str]:
    return ["-M", "virt", "-cpu", "cortex-a57", "-m", memory, "-kernel", str(guest.kernel),
            "-initrd", str(guest.initrd), "-append", guest.append, "-nographic",
            "-serial", "stdio"]


def enable(qmp: Qmp) -> None:
    qmp.execute("migrate-set-capabilities",
                capabilities=[{"capability": "events", "state": True},
                              {"capability": "x-checksum", "state": True}])


@pytest.fixture
def source(guest, tmp_path):
    """A booted source process dirtying memory: (console, qmp)."""
    sock = tmp_path / "src.qmp"
    src = Console(kemu_args(guest) + ["-qmp", f"unix:{sock},server=on,wait=off"])
    try:
        src.expect(rb"# ", timeout=120)
        src.run("(i=0; while true; do i=$((i+1)); echo $i > /tmp/count; "
                "dd if=/dev/urandom of=/tmp/noise bs=64k count=32 2>/dev/null; done) & :")
        src.run("sleep 0.3; cat /tmp/count")
        qmp = Qmp(sock)
        enable(qmp)
        yield src, qmp
        qmp.close()
    finally:
        src.close()


def wait_for(path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def counter(console: Console) -> int:
    """The guest loop's count (the output's last line of digits: under load the
    echo of the command may come after the output the console run expects)."""
    out = console.run("cat /tmp/count")
    return int(re.findall(r"^\d+$", out, re.M)[-1])


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_live_migration_while_the_guest_dirties_memory(guest, tmp_path, source, transport):
    src, qs = source
    if transport == "unix":
        uri = f"unix:{tmp_path / 'mig.sock'}"
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            uri = f"tcp:127.0.0.1:{s.getsockname()[1]}"
    dsock = tmp_path / "dst.qmp"
    dst = Console(kemu_args(guest) + ["-qmp", f"unix:{dsock},server=on,wait=off",
                                      "-incoming", uri])
    try:
        qd = Qmp(dsock)
        assert qd.execute("query-status")["status"] == "inmigrate"
        enable(qd)
        qs.execute("migrate-set-parameters", **{"downtime-limit": 300})
        qs.execute("migrate", uri=uri)
        info = qs.wait_migration(("completed", "failed", "cancelled"))
        assert info["status"] == "completed", info
        assert info["ram"]["transferred"] > 1 << 20 and info["ram"]["remaining"] == 0
        assert info["downtime"] >= 0 and info["ram"]["dirty-sync-count"] >= 1
        dinfo = qd.wait_migration(("completed", "failed"))
        assert dinfo["status"] == "completed", dinfo
        # the same RAM at the switch, byte for byte
        assert info["x-ram-sha256"] == dinfo["x-ram-sha256"]
        assert qs.execute("query-status")["status"] == "postmigrate"
        assert qd.execute("query-status")["status"] == "running"
        statuses = [e["data"]["status"] for e in qs.events if e["event"] == "MIGRATION"]
        assert statuses == ["setup", "active", "device", "completed"], statuses
        assert any(e["event"] == "MIGRATION_PASS" for e in qs.events)
        assert any(e["event"] == "STOP" for e in qs.events)
        # the guest goes on at the destination: its loop counts, its shell answers
        first = counter(dst)
        dst.run("sleep 1")
        assert counter(dst) > first
        assert "migrated" in dst.run("echo migrated")
        qd.execute("quit")
        assert dst.wait(30) == 0
        assert "Traceback" not in dst.stderr
    finally:
        dst.close()


def test_cancelled_migration_leaves_the_source_running(guest, tmp_path, source):
    src, qs = source
    uri = f"unix:{tmp_path / 'mig.sock'}"
    dst = Console(kemu_args(guest) + ["-incoming", uri])
    try:
        wait_for(tmp_path / "mig.sock")
        qs.execute("migrate-set-parameters", **{"max-bandwidth": 4 << 20})   # slow: 4 MiB/s
        qs.execute("migrate", uri=uri)
        qs.wait_migration(("active",))
        time.sleep(0.5)
        qs.execute("migrate_cancel")
        info = qs.wait_migration(("cancelled", "completed", "failed"))
        assert info["status"] == "cancelled", info
        assert qs.execute("query-status")["status"] == "running"
        first = counter(src)
        src.run("sleep 1")
        assert counter(src) > first
        # the destination saw a stream cut short: one line, status 1
        assert dst.wait(60) == 1
        err = dst.stderr.strip()
        assert "load of migration failed" in err and "truncated" in err, err
        assert len(err.splitlines()) == 1, err
    finally:
        dst.close()


def test_destination_with_another_configuration_refuses(guest, tmp_path, source):
    src, qs = source
    uri = f"unix:{tmp_path / 'mig.sock'}"
    dst = Console(kemu_args(guest, memory="512") + ["-incoming", uri])
    try:
        wait_for(tmp_path / "mig.sock")
        qs.execute("migrate", uri=uri)
        info = qs.wait_migration(("completed", "failed", "cancelled"))
        assert info["status"] == "failed", info
        assert qs.execute("query-status")["status"] == "running"
        assert dst.wait(60) == 1
        err = dst.stderr.strip()
        assert "another machine" in err and len(err.splitlines()) == 1, err
        assert "ok" in src.run("echo ok")
    finally:
        dst.close()


def test_incoming_uri_errors_are_one_line(guest):
    proc = Console(kemu_args(guest) + ["-incoming", "ftp:nowhere"])
    assert proc.wait(30) == 2
    assert proc.stderr.strip().splitlines() == ["kemu: unknown migration protocol: ftp:nowhere"]


def test_save_to_a_passed_fd_and_restore_with_exec(guest, tmp_path, source):
    """libvirt's save and restore: migrate to fd:NAME after getfd, -incoming exec:CMD."""
    src, qs = source
    saved = tmp_path / "saved.stream"
    with open(saved, "wb") as f:
        reply = qs.send_fd(f.fileno(), "getfd", fdname="save")
    assert reply == {"return": {}}, reply
    assert "error" in qs.command("getfd", fdname="nothing-passed")
    assert "error" in qs.command("migrate", uri="fd:unknown")
    qs.execute("migrate", uri="fd:save")
    info = qs.wait_migration(("completed", "failed", "cancelled"))
    assert info["status"] == "completed", info
    assert qs.execute("query-status")["status"] == "postmigrate"
    assert saved.stat().st_size > 1 << 20
    dst = Console(kemu_args(guest) + ["-incoming", f"exec:cat {saved}"])
    try:
        first = counter(dst)
        dst.run("sleep 1")
        assert counter(dst) > first
    finally:
        dst.close()
