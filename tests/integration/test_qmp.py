"""QMP driven by QEMU's own client library (PyPI qemu.qmp) and qmp-shell."""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

qmp = pytest.importorskip("qemu.qmp", reason="qemu.qmp is not installed "
                          "(scripts/bootstrap.sh --test installs it)")

KEMU = [sys.executable, "-m", "kemu.cli"]


async def quit_and_disconnect(client) -> None:
    """QMP quit, then close our side (kemu may already have closed the connection)."""
    await client.execute("quit")
    with contextlib.suppress(EOFError):
        await client.disconnect()


@pytest.fixture
def vm(guest, tmp_path):
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(KEMU + ["run", "-qmp", f"unix:{sock},server=on,wait=off",
                                    "-name", "testvm", "-serial", "none", "-display", "none"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    for _ in range(200):
        if sock.exists():
            break
        time.sleep(0.05)
    yield proc, sock
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    err = proc.stderr.read().decode(errors="replace")
    assert "Traceback" not in err and "internal error" not in err, err


def test_qemu_qmp_client_commands_and_events(vm):
    proc, sock = vm
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600

    async def session():
        client = qmp.QMPClient("kemu-test")
        await client.connect(str(sock))
        assert client.greeting.QMP.version["qemu"]["major"] == 7
        version = await client.execute("query-version")
        assert version["package"].startswith("kemu")
        assert (await client.execute("query-name")) == {"name": "testvm"}
        names = {c["name"] for c in await client.execute("query-commands")}
        assert {"stop", "cont", "quit", "query-status"} <= names
        [cpu] = await client.execute("query-cpus-fast")
        assert cpu["thread-id"] != threading.get_native_id() and cpu["thread-id"] > 0
        assert await client.execute("query-block") == []
        with pytest.raises(qmp.ExecuteError) as err:
            await client.execute("no-such-command")
        assert err.value.error_class == "CommandNotFound"
        with pytest.raises(qmp.ExecuteError):
            await client.execute("stop", {"bogus": 1})
        events, data = [], []

        async def collect():
            async for event in client.events:
                events.append(event["event"])
                if event["event"] in ("RESET", "SHUTDOWN"):
                    data.append(event["data"])
        listener = asyncio.create_task(collect())
        await client.execute("stop")
        assert (await client.execute("query-status"))["status"] == "paused"
        info = await client.execute("human-monitor-command",
                                    {"command-line": "info status"})
        assert "paused" in info
        regs = await client.execute("human-monitor-command",
                                    {"command-line": "info registers"})
        assert "PC=" in regs
        mtree = await client.execute("human-monitor-command", {"command-line": "info mtree"})
        assert "pl011" in mtree
        await client.execute("cont")
        assert (await client.execute("query-status"))["running"]
        await client.execute("system_reset")
        assert (await client.execute("query-status"))["running"]
        await client.execute("quit")
        for _ in range(100):
            if "SHUTDOWN" in events:
                break
            await asyncio.sleep(0.05)
        listener.cancel()
        # kemu closes the connection as it exits (as QEMU does after quit); the
        # client library reports that as EOFError on disconnect.
        with contextlib.suppress(EOFError):
            await client.disconnect()
        return events, data

    events, data = asyncio.run(session())
    # (a RESUME when the machine started may come first; the reset is no STOP/RESUME)
    assert events[-4:] == ["STOP", "RESUME", "RESET", "SHUTDOWN"], events
    assert data == [{"guest": False, "reason": "host-qmp-system-reset"},
                    {"guest": False, "reason": "host-qmp-quit"}]
    assert proc.wait(30) == 0


def test_malformed_input_over_a_raw_socket_keeps_the_machine(vm):
    proc, sock = vm
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock))
    f = s.makefile("rwb")
    assert "QMP" in json.loads(f.readline())
    f.write(b'{"execute": "query-status"}\n')
    f.flush()
    assert json.loads(f.readline())["error"]["class"] == "CommandNotFound"
    f.write(b'{"execute": "qmp_capabilities"}\nnot json at all\n[1]\n{"execute": 5}\n'
            b'{"execute": "nope", "id": 1}\n{"execute": "stop", "arguments": {"x": 1}}\n'
            b'{"execute": "human-monitor-command", "arguments": {"command-line": 1}}\n')
    f.flush()
    replies = [json.loads(f.readline()) for _ in range(7)]
    assert replies[0] == {"return": {}}
    assert replies[1]["error"]["desc"].startswith("JSON parse error")
    assert replies[2]["error"]["desc"] == "QMP input must be a JSON object"
    assert replies[3]["error"]["class"] == "GenericError"
    assert replies[4] == {"error": {"class": "CommandNotFound",
                                    "desc": "The command nope has not been found"}, "id": 1}
    assert replies[5]["error"]["desc"] == "Parameter 'x' is unexpected"
    assert replies[6]["error"]["desc"] == ("Invalid parameter type for 'command-line', "
                                           "expected: string")
    s.close()                                  # disconnect in the middle of nothing
    s2 = socket.socket(socket.AF_UNIX)
    s2.connect(str(sock))
    s2.sendall(b'{"execute": "qmp_capabilit')  # and in the middle of a message
    s2.close()
    # A message that never ends: an error, then the server hangs up.
    s3 = socket.socket(socket.AF_UNIX)
    s3.connect(str(sock))
    f3 = s3.makefile("rwb")
    f3.readline()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        f3.write(b'{"execute": "' + b"x" * (2 << 20))
        f3.flush()
    assert "too long" in json.loads(f3.readline())["error"]["desc"]
    assert f3.readline() == b""
    s3.close()
    # The machine keeps running and serves the next client.
    s4 = socket.socket(socket.AF_UNIX)
    s4.connect(str(sock))
    f4 = s4.makefile("rwb")
    f4.readline()
    f4.write(b'{"execute": "qmp_capabilities"}{"execute": "query-status"}')
    f4.flush()
    assert json.loads(f4.readline()) == {"return": {}}
    assert json.loads(f4.readline())["return"]["status"] == "running"
    s4.close()
    assert proc.poll() is None


def test_qmp_shell(vm):
    proc, sock = vm
    shell = shutil.which("qmp-shell") or os.path.join(os.path.dirname(sys.executable),
                                                      "qmp-shell")
    if not os.path.exists(shell):
        pytest.skip("qmp-shell is not installed")
    out = subprocess.run([shell, str(sock)], input="query-status\nquery-name\n",
                         capture_output=True, text=True, timeout=60)
    assert "running" in out.stdout and "testvm" in out.stdout


def test_start_paused_tcp_and_pidfile(guest, tmp_path):
    pidfile = tmp_path / "kemu.pid"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(KEMU + ["run", "-S", "-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off",
                                    "-pidfile", str(pidfile), "-serial", "none"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if pidfile.exists():
                break
            time.sleep(0.05)
        assert int(pidfile.read_text()) == proc.pid

        async def session():
            client = qmp.QMPClient("kemu-test")
            await client.connect(("127.0.0.1", port))
            assert (await client.execute("query-status"))["status"] == "prelaunch"
            await client.execute("cont")
            assert (await client.execute("query-status"))["status"] in ("prelaunch", "running")
            await quit_and_disconnect(client)

        asyncio.run(session())
        assert proc.wait(30) == 0
        assert not pidfile.exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_system_powerdown(vm):
    proc, sock = vm

    async def session():
        client = qmp.QMPClient("kemu-test")
        await client.connect(str(sock))
        events = []

        async def collect():
            async for event in client.events:
                events.append(event)
        listener = asyncio.create_task(collect())
        # Press the button until the guest acts on it: every press succeeds
        # and is a POWERDOWN, as in QEMU; until the guest has booted far enough
        # to listen, presses are simply ignored, as on real hardware.
        for _ in range(60):
            if any(e["event"] == "SHUTDOWN" for e in events):
                break
            assert await client.execute("system_powerdown") == {}
            await asyncio.sleep(2)
        listener.cancel()
        with contextlib.suppress(EOFError):
            await client.disconnect()
        return events

    events = asyncio.run(session())
    names = [e["event"] for e in events]
    assert "POWERDOWN" in names and names[-1] == "SHUTDOWN"
    assert events[-1]["data"] == {"guest": True, "reason": "guest-shutdown"}
    assert proc.wait(30) == 0


def test_daemonize(guest, tmp_path):
    sock, pidfile, mon = tmp_path / "d.sock", tmp_path / "d.pid", tmp_path / "m.sock"
    # As QEMU's, the parent exits once the daemon says it is ready: the pidfile
    # and the QMP and monitor sockets exist by then; the daemon keeps running.
    proc = subprocess.run(KEMU + ["run", "-daemonize", "-serial", "none", "-display", "none",
                                  "-pidfile", str(pidfile),
                                  "-monitor", f"unix:{mon},server=on,wait=off",
                                  "-qmp", f"unix:{sock},server=on,wait=off"],
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert pidfile.exists() and sock.exists() and mon.exists()
    pid = int(pidfile.read_text())
    os.kill(pid, 0)                             # the daemon is alive

    async def session():
        client = qmp.QMPClient("kemu-test")
        await client.connect(str(sock))
        assert (await client.execute("query-status"))["running"]
        await quit_and_disconnect(client)

    try:
        asyncio.run(session())
        for _ in range(200):
            if not pidfile.exists():
                break
            time.sleep(0.05)
        assert not pidfile.exists()
    finally:
        if pidfile.exists():                    # a failed test leaves no daemon behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_daemonize_failure_reaches_the_parent(guest, tmp_path):
    """A daemon that fails before it is ready: the parent exits 1 with its line."""
    proc = subprocess.run(KEMU + ["run", "-daemonize", "-serial", "none", "-display", "none",
                                  "-qmp", f"unix:{tmp_path}/no/such/dir/q.sock,server=on,"
                                  "wait=off"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "cannot listen" in proc.stderr and "Traceback" not in proc.stderr


def test_qmp_server_waits_with_qemus_message(guest, tmp_path):
    """-qmp unix:PATH,server=on waits for a client (wait=on is QEMU's default)."""
    sock = tmp_path / "w.sock"
    proc = subprocess.Popen(KEMU + ["run", "-serial", "none", "-display", "none",
                                    "-qmp", f"unix:{sock},server=on"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        while True:
            line = proc.stderr.readline()
            assert line, "kemu ended without the waiting line"
            if "waiting" in line:
                break
        assert line == (f"kemu: -qmp unix:{sock},server=on: info: QEMU waiting for "
                        f"connection on: disconnected:unix:{sock},server=on\n")

        async def session():
            client = qmp.QMPClient("kemu-test")
            await client.connect(str(sock))
            assert (await client.execute("query-status"))["status"] in ("prelaunch", "running")
            await quit_and_disconnect(client)
        asyncio.run(session())
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_qmp_client_connection(guest, tmp_path):
    """-qmp unix:PATH without server=on connects out to PATH (the peer listens)
    and speaks QMP as the server side, as QEMU does."""
    path = tmp_path / "listen.sock"

    async def session():
        client = qmp.QMPClient("kemu-test")
        await client.start_server(str(path))
        proc = subprocess.Popen(KEMU + ["run", "-serial", "none", "-display", "none",
                                        "-qmp", f"unix:{path}"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            await asyncio.wait_for(client.accept(), 60)
            assert client.greeting.QMP.version["qemu"]["major"] == 7
            assert (await client.execute("query-status"))["running"]
            await quit_and_disconnect(client)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    asyncio.run(session())
