"""Snapshots, restore and fork of the default aarch64 guest on TCG (kemu.api, kemu.snapshot).

One guest boots with a raw disk and starts a counter loop in the background;
it is snapshotted mid-run.  A machine restored from that snapshot answers on
its shell, its counter and timers go on, and its disk write reaches its own
qcow2 overlay (never the snapshot's copy or the original image).  Forked
copies each write their own disk and see only their own writes, and the
process's PSS grows by the pages they dirtied, not by a RAM per copy.
Damaged snapshots are refused in one line before anything starts.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

from test_vsock_aarch64 import vsock_disk  # noqa: F401 (a fixture)

from kemu import Machine
from kemu.backends.qcow2 import Qcow2Image
from kemu.state import StateError

MiB = 1 << 20
RAM = "256M"
DISK_SIZE = 16 * MiB
SECTOR = 512


def pss_kib(pid: str = "self") -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise AssertionError("no Pss in smaps_rollup")


def ram_mappings_kib(path) -> list[tuple[int, int]]:
    """(Rss, Private_Dirty) in KiB of each mapping of ``path`` in this process."""
    out, current = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                current = [0, 0] if fields[-1] == str(path) else None
                if current is not None:
                    out.append(current)
            elif current is not None and fields[0] in ("Rss:", "Private_Dirty:"):
                current[0 if fields[0] == "Rss:" else 1] = int(fields[1])
    return [tuple(m) for m in out]


def read_disk(path, offset: int, length: int) -> bytes:
    with Qcow2Image.open(path, read_only=True, locking="off") as image:
        return image.read(offset, length)


@pytest.fixture(scope="module")
def snapshotted(guest, tmp_path_factory):
    """A running guest snapshotted mid-run: (machine, snapshot dir, disk image)."""
    tmp = tmp_path_factory.mktemp("snapshot")
    disk = tmp / "disk.raw"
    disk.write_bytes(b"\0" * DISK_SIZE)
    vm = Machine.default_guest(memory=RAM, devices=[], disks=[str(disk)])
    vm.start()
    try:
        vm.console.expect("# ", timeout=120)
        vm.console.run("echo before-snapshot | dd of=/dev/vda bs=512 seek=1 conv=fsync "
                       "2>/dev/null")
        # Mid-run: a loop counting in the background, the shell still answering.
        vm.console.run("(i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; "
                       "done) & :")
        vm.console.run("sleep 0.5; cat /tmp/count")
        header = vm.snapshot(tmp / "snap")
        yield vm, tmp / "snap", disk, header
    finally:
        vm.kill()


def test_restored_machine_answers_runs_timers_and_writes_its_own_disk(snapshotted, tmp_path):
    original, snap, disk, header = snapshotted
    assert header["machine"]["memory"] == 256 * MiB
    vm = Machine.restore(snap, overlay_dir=tmp_path, tag="t")
    try:
        # the shell answers, the background loop is still counting
        first = int(vm.console.run("cat /tmp/count", timeout=60))
        vm.console.run("sleep 1")                      # the timer interrupt still runs
        assert int(vm.console.run("cat /tmp/count")) > first
        # the disk holds what was written before the snapshot
        out = vm.console.run("dd if=/dev/vda bs=512 skip=1 count=1 2>/dev/null | head -c 15")
        assert out == "before-snapshot"
        vm.console.run("echo after-restore | dd of=/dev/vda bs=512 seek=2 conv=fsync 2>/dev/null")
    finally:
        vm.kill()
    overlay = tmp_path / "t-disk0.qcow2"
    assert read_disk(overlay, 2 * SECTOR, 13) == b"after-restore"
    assert read_disk(overlay, SECTOR, 15) == b"before-snapshot"
    # neither the snapshot's copy nor the running original's image saw it
    assert (snap / "disk0.raw").read_bytes()[2 * SECTOR:2 * SECTOR + 13] == bytes(13)
    assert disk.read_bytes()[2 * SECTOR:2 * SECTOR + 13] == bytes(13)
    # the original machine runs on after its snapshot
    assert original.console.run("echo still-here") == "still-here\n"


def test_fork_copies_write_their_own_disks_and_share_memory(snapshotted, tmp_path):
    original, _, _, _ = snapshotted
    n = int(os.environ.get("KEMU_FORK_COPIES", "4"))
    before = pss_kib()
    copies = original.fork(n, tmp_path / "fork")
    try:
        for i, vm in enumerate(copies):
            vm.console.run(f"echo copy-{i}-wrote | dd of=/dev/vda bs=512 seek=3 conv=fsync "
                           "2>/dev/null", timeout=120)
        for i, vm in enumerate(copies):
            out = vm.console.run("dd if=/dev/vda bs=512 skip=3 count=1 2>/dev/null | head -c 12")
            assert out == f"copy-{i}-wrote"
        grown = pss_kib() - before
        ram = ram_mappings_kib(tmp_path / "fork" / "memory.ram")
    finally:
        for vm in copies:
            vm.kill()
    ram_kib = 256 * 1024
    # Each copy's RAM is the snapshot's file mapped private: it pays for the
    # pages it dirtied, not its RAM; the process (the copies' engines and
    # translation caches included) does not grow by a RAM per copy.
    assert len(ram) == n
    dirty = [d for _, d in ram]
    print(f"PSS grew by {grown} KiB for {n} copies ({grown / n:.0f} KiB per copy); "
          f"guest RAM dirtied per copy (KiB): {dirty}; resident: {[r for r, _ in ram]}")
    assert max(dirty) < ram_kib // 8, dirty
    assert grown < n * ram_kib // 2, (grown, n)
    for i in range(n):
        assert read_disk(tmp_path / "fork" / f"fork{i}-{os.getpid()}-disk0.qcow2",
                         3 * SECTOR, 12) == f"copy-{i}-wrote".encode()


@pytest.fixture
def snap_copy(snapshotted, tmp_path):
    """A copy of the snapshot directory to damage (the memory file hard-linked)."""
    _, snap, _, _ = snapshotted
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in snap.iterdir():
        if f.name == "memory.ram":
            os.link(f, copy / f.name)
        elif f.is_file():
            shutil.copy(f, copy / f.name)
    return copy


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_truncated_state_is_refused(snap_copy):
    state = snap_copy / "state.kemu"
    state.write_bytes(state.read_bytes()[:-100])
    with pytest.raises(StateError) as e:
        Machine.restore(snap_copy)
    assert "truncated" in one_line(e)


def test_corrupted_state_is_refused(snap_copy):
    state = snap_copy / "state.kemu"
    data = bytearray(state.read_bytes())
    data[-50] ^= 0x40
    state.write_bytes(bytes(data))
    with pytest.raises(StateError) as e:
        Machine.restore(snap_copy)
    assert "corrupted" in one_line(e)


def test_truncated_memory_is_refused(snap_copy):
    memory = snap_copy / "memory.ram"
    data = memory.read_bytes()
    memory.unlink()                         # not the shared, hard-linked file
    memory.write_bytes(data[:len(data) // 2])
    with pytest.raises(StateError) as e:
        Machine.restore(snap_copy)
    assert "truncated" in one_line(e)


def test_corrupted_memory_is_refused(snapshotted, snap_copy):
    _, _, _, header = snapshotted
    memory = snap_copy / "memory.ram"
    data = bytearray(memory.read_bytes())
    memory.unlink()
    used = next(i for i, crc in enumerate(header["memory"]["crcs"]) if crc != -1)
    data[used * MiB + 123] ^= 1             # a MiB the guest uses (not a hole)
    memory.write_bytes(bytes(data))
    with pytest.raises(StateError) as e:
        Machine.restore(snap_copy)
    assert "corrupted" in one_line(e)


def test_newer_format_and_other_machine_are_refused(snap_copy):
    from kemu import state as st
    path = snap_copy / "state.kemu"
    with open(path, "rb") as f:
        header = st.read_header(f)
        payload = st.read_payload(f, header)
    newer = bytearray(path.read_bytes())
    newer[8] = st.FORMAT_VERSION + 1
    path.write_bytes(bytes(newer))
    with pytest.raises(StateError) as e:
        Machine.restore(snap_copy)
    assert re.search(r"format \d+ is newer", one_line(e))
    # a header made for another machine than the configuration it carries
    header["machine"]["smp"] = 2
    with open(path, "wb") as f:
        st.write_stream(f, {k: v for k, v in header.items()
                            if not k.startswith("payload_")}, payload)
    with pytest.raises(StateError) as e:
        Machine.restore(snap_copy)
    assert "another machine" in one_line(e)


def test_no_snapshot_here(tmp_path):
    with pytest.raises(StateError) as e:
        Machine.restore(tmp_path)
    assert "cannot open" in one_line(e)


@pytest.mark.skipif(shutil.which("passt") is None, reason="passt is not installed")
def test_restored_machine_networks_through_its_own_passt(guest, tmp_path):
    import functools
    import http.server
    import threading

    from kemu.machines.config import DeviceConfig, MachineConfig, NetdevConfig
    (tmp_path / "blob").write_bytes(b"fetched-through-passt\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    config = MachineConfig(memory=256 * MiB, kernel=guest.kernel, initrd=guest.initrd,
                           append=guest.append, netdevs=[NetdevConfig("user", "n0")],
                           devices=[DeviceConfig("virtio-net-device", {"netdev": "n0"})])
    vm = Machine.from_config(config)
    vm.start()
    try:
        m = vm.console.expect(rb"kemu: eth0: [0-9.]+/\d+ from DHCP, gateway ([0-9.]+)[,\r]", 300)
        gateway = m.group(1).decode()
        vm.console.expect("# ", timeout=60)
        url = f"http://{gateway}:{port}/blob"
        assert vm.console.run(f"wget -q -O - {url}", 120) == "fetched-through-passt\n"
        copies = vm.fork(2, tmp_path / "fork")
    finally:
        vm.kill()
    try:
        macs = [c.config.devices[0].props["mac"] for c in copies]
        assert len(set(macs)) == 2
        for c in copies:      # the original's passt is gone: each copy has its own
            assert c.console.run(f"wget -q -O - {url}", 120) == "fetched-through-passt\n"
    finally:
        for c in copies:
            c.kill()
        server.shutdown()


def test_forked_copy_has_its_own_vsock(guest, tmp_path, vsock_disk):
    """The copy gets CID 4 and the host socket UDS.4; vsock works both ways in it."""
    import socket
    import threading

    from kemu.machines.config import DeviceConfig, DriveConfig, MachineConfig
    disk, size = vsock_disk
    uds = str(tmp_path / "v.sock")
    config = MachineConfig(memory=256 * MiB, kernel=guest.kernel, initrd=guest.initrd,
                           append=guest.append,
                           drives=[DriveConfig(disk, "raw", read_only=True)],
                           devices=[DeviceConfig("vhost-vsock-device",
                                                 {"guest-cid": "3", "uds": uds})])
    vm = Machine.from_config(config)
    vm.start()
    try:
        vm.console.expect("# ", timeout=120)
        vm.console.run(f"head -c {size} /dev/vda > /tmp/vs && chmod +x /tmp/vs")
        [copy] = vm.fork(1, tmp_path / "fork")
    finally:
        vm.kill()
    try:
        assert copy.config.devices[0].props == {"guest-cid": "4", "uds": f"{uds}.4"}
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(f"{uds}.4_5000")
        listener.listen()

        def serve():
            conn, _ = listener.accept()
            data = conn.recv(65536)
            conn.sendall(b"host-got:" + data)
            conn.close()
        threading.Thread(target=serve, daemon=True).start()
        out = copy.console.run("/tmp/vs connect 2 5000 from-the-copy", 60)
        assert "host-got:from-the-copy" in out
    finally:
        copy.kill()
