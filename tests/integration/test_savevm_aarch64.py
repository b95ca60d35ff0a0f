"""Internal snapshots of a running machine in its qcow2 disk (savevm, loadvm, -loadvm).

The default aarch64 guest runs in a kemu process with a qcow2 disk on
``-blockdev``.  It writes a marker to its disk and to a file in RAM, is
saved by QMP's ``snapshot-save`` job, writes other markers, and is loaded
back by HMP's ``loadvm`` and by QMP's ``snapshot-load``: the shell answers and
disk and memory hold the first markers again.  ``qemu-img`` lists the
snapshot with its VM state size and finds the image clean; a new process
started with ``-loadvm`` runs from it.  Damaged VM states (a flipped byte in
the state, in RAM, a shortened size) are refused with one line while the
running machine goes on untouched, and a VM state saved by QEMU is refused
in one line at ``-loadvm``.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import time

import pytest
from kemu.testing.stdio_console import KEMU, Console

from kemu.testing.qmp_client import QmpClient

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                reason="qemu-img is not installed (apt-get install qemu-utils)")

MiB = 1 << 20


def kemu_args(guest, disk) -> list[str]:
    return ["-M", "virt", "-cpu", "cortex-a57", "-m", "256", "-kernel", str(guest.kernel),
            "-initrd", str(guest.initrd), "-append", guest.append, "-nographic",
            "-serial", "stdio",
            "-blockdev", f"driver=file,filename={disk},node-name=f0",
            "-blockdev", "driver=qcow2,file=f0,node-name=disk0",
            "-device", "virtio-blk-device,drive=disk0"]


def mark(console: Console, text: str) -> None:
    """``text`` on the disk (sector 1) and in a RAM file."""
    console.run(f"echo {text} | dd of=/dev/vda bs=512 seek=1 conv=fsync 2>/dev/null; "
                f"echo {text} > /tmp/m")


def marks(console: Console) -> tuple[str, str]:
    """(disk marker, RAM marker): the last line of each output (a long command line
    echoed by the guest's shell can wrap onto more than one)."""
    disk = console.run("dd if=/dev/vda bs=512 skip=1 count=1 iflag=direct 2>/dev/null "
                       "| head -n 1", timeout=120)
    return disk.strip().splitlines()[-1], console.run("cat /tmp/m").strip().splitlines()[-1]


def run_job(qmp: QmpClient, command: str, job_id: str, **args) -> dict:
    """Start a snapshot job, wait for it to conclude; its query-jobs entry."""
    qmp.execute(command, **{"job-id": job_id}, **args)
    deadline = time.monotonic() + 300
    while True:
        job = next(j for j in qmp.execute("query-jobs") if j["id"] == job_id)
        if job["status"] == "concluded":
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    qmp.execute("job-dismiss", id=job_id)
    statuses = [e["data"]["status"] for e in qmp.events
                if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job_id]
    ok = ["created", "running", "waiting", "pending", "concluded", "null"]
    assert statuses == (ok if "error" not in job else
                        ["created", "running", "aborting", "concluded", "null"]), statuses
    return job


def hmp(qmp: QmpClient, line: str) -> str:
    return qmp.execute("human-monitor-command", **{"command-line": line})


@pytest.fixture(scope="module")
def saved(guest, tmp_path_factory):
    """A kemu process whose disk holds snapshot 's1' (marker one): (console, qmp, disk)."""
    tmp = tmp_path_factory.mktemp("savevm")
    disk = tmp / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    sock = tmp / "qmp.sock"
    console = Console(kemu_args(guest, disk) + ["-qmp", f"unix:{sock},server=on,wait=off"])
    try:
        console.expect(rb"# ", timeout=120)
        mark(console, "marker-one")
        qmp = QmpClient(sock)
        job = run_job(qmp, "snapshot-save", "save1", tag="s1", vmstate="disk0",
                      devices=["disk0"])
        assert "error" not in job, job
        stops = [e["event"] for e in qmp.events if e["event"] in ("STOP", "RESUME")]
        assert stops == ["STOP", "RESUME"]                # paused for the save, runs on
        yield console, qmp, disk
        qmp.close()
    finally:
        console.close()


def test_loadvm_brings_back_disk_and_memory(saved):
    console, qmp, _ = saved
    mark(console, "marker-two")
    assert marks(console) == ("marker-two", "marker-two")
    assert hmp(qmp, "loadvm s1") == ""
    assert marks(console) == ("marker-one", "marker-one")
    assert console.run("echo answers").splitlines()[-1] == "answers"
    # and again through QMP's job
    mark(console, "marker-three")
    job = run_job(qmp, "snapshot-load", "load1", tag="s1", vmstate="disk0", devices=["disk0"])
    assert "error" not in job, job
    assert marks(console) == ("marker-one", "marker-one")
    info = hmp(qmp, "info snapshots")
    assert info.startswith("List of snapshots present on all disks:\r\n")
    assert re.search(r"\r\n--        s1 +[1-9][0-9.]* MiB ", info), info
    assert qmp.execute("query-status")["status"] == "running"


def test_snapshot_job_errors_are_qemus(saved):
    _, qmp, _ = saved
    job = run_job(qmp, "snapshot-save", "dup", tag="s1", vmstate="disk0", devices=["disk0"])
    assert job["error"] == "Snapshot 's1' already exists in one or more devices"
    job = run_job(qmp, "snapshot-load", "none", tag="nosuch", vmstate="disk0",
                  devices=["disk0"])
    assert job["error"] == "Snapshot 'nosuch' does not exist in one or more devices"
    job = run_job(qmp, "snapshot-save", "bad", tag="x", vmstate="disk0", devices=["nosuch"])
    assert job["error"] == "No block device node 'nosuch'"
    reply = qmp.command("snapshot-save", **{"job-id": "1x", "tag": "x", "vmstate": "disk0",
                                            "devices": ["disk0"]})
    assert reply["error"]["desc"] == "Invalid job ID '1x'"
    assert qmp.command("job-dismiss", id="zz")["error"]["desc"] == "Job not found"
    assert hmp(qmp, "loadvm") == 'loadvm: string expected\r\nTry "help loadvm" for more information\r\n'


def _vmstate_host_offset(disk, tag: str, pos: int) -> tuple[int, int]:
    """(host offset of VM state byte ``pos`` of snapshot ``tag``, offset of its table entry)."""
    from kemu.backends.qcow2.header import OFFSET_MASK, l1_entries_needed, parse_header
    data = disk.read_bytes()
    h = parse_header(data[:65536], len(data))
    cb, l2_bits = h.cluster_bits, h.cluster_bits - 3
    pos_table = h.snapshots_offset
    for _ in range(h.nb_snapshots):
        pos_table += -pos_table % 8
        l1_off, l1_size, id_len, name_len = struct.unpack_from(">QIHH", data, pos_table)
        extra = struct.unpack_from(">I", data, pos_table + 36)[0]
        name = data[pos_table + 40 + extra + id_len:pos_table + 40 + extra + id_len + name_len]
        if name.decode() == tag:
            guest = (l1_entries_needed(h.size, cb) << (cb + l2_bits)) + pos
            l1 = struct.unpack_from(f">{l1_size}Q", data, l1_off)
            l2 = l1[guest >> (cb + l2_bits)] & OFFSET_MASK
            entry = struct.unpack_from(">Q", data, l2 + 8 * ((guest >> cb) & ((1 << l2_bits) - 1)))[0]
            assert entry & OFFSET_MASK, "VM state byte not allocated"
            return (entry & OFFSET_MASK) + (guest & ((1 << cb) - 1)), pos_table
        pos_table += 40 + extra + id_len + name_len
    raise AssertionError(f"no snapshot {tag}")


def _first_ram_byte(disk, tag: str) -> int:
    """VM state position of a byte in the first non-zero MiB of the saved RAM."""
    from kemu import state as st
    from kemu.backends.qcow2 import Qcow2Image, internal
    from kemu.savevm import _Stream
    with Qcow2Image.open(disk, read_only=True, locking="off") as img:
        sn = internal.snapshots(img)[internal.find_snapshot(img, tag)]
        header = st.read_header(_Stream(internal.VmStateReader(img, sn)))
    return header["memory"]["offset"] + 4096      # in the first non-zero MiB (packed)


def _poke(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("damage", ["state", "ram", "size"])
def test_damaged_vmstate_is_refused_and_the_machine_runs_on(saved, damage):
    console, qmp, disk = saved
    assert hmp(qmp, f"savevm bad-{damage}") == ""
    mark(console, f"current-{damage}")
    if damage == "state":        # a byte of the state stream's payload
        host, _ = _vmstate_host_offset(disk, f"bad-{damage}", 300)
        _poke(disk, host, b"\xff")
    elif damage == "ram":        # a byte of guest RAM
        host, _ = _vmstate_host_offset(disk, f"bad-{damage}",
                                       _first_ram_byte(disk, f"bad-{damage}"))
        with open(disk, "rb") as f:
            f.seek(host)
            old = f.read(1)
        _poke(disk, host, bytes([old[0] ^ 0x5A]))
    else:                        # the table says the VM state is 1 MiB long: truncated
        _, entry = _vmstate_host_offset(disk, f"bad-{damage}", 0)
        _poke(disk, entry + 32, struct.pack(">I", MiB))
        _poke(disk, entry + 40, struct.pack(">Q", MiB))
    out = hmp(qmp, f"loadvm bad-{damage}")
    assert out.startswith("Error: ") and out.count("\r\n") == 1, out
    assert "Traceback" not in out and f"bad-{damage}" in out
    assert qmp.execute("query-status")["status"] == "running"
    assert marks(console) == (f"current-{damage}", f"current-{damage}")
    assert hmp(qmp, f"delvm bad-{damage}") == ""


def test_qemu_img_lists_and_checks_then_loadvm_in_a_new_process(guest, saved, tmp_path):
    console, qmp, disk = saved
    qmp.execute("quit")
    console.wait(60)
    listed = subprocess.run(["qemu-img", "snapshot", "-l", str(disk)], capture_output=True,
                            text=True, check=True).stdout
    row = next(line for line in listed.splitlines() if " s1 " in line)
    # its VM SIZE: the state and the RAM the guest uses (zero MiBs take no room)
    size = re.search(r" s1 +([0-9.]+) MiB ", row)
    assert size and 8 < float(size.group(1)) < 256, row
    check = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True)
    assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout
    fresh = Console(kemu_args(guest, disk) + ["-loadvm", "s1"])
    try:
        assert fresh.run("echo restored", timeout=120).splitlines()[-1] == "restored"
        assert marks(fresh) == ("marker-one", "marker-one")
    finally:
        fresh.close()


@pytest.mark.skipif(shutil.which("qemu-system-aarch64") is None,
                    reason="qemu-system-aarch64 is not installed")
def test_a_qemu_made_vmstate_is_listed_and_refused_in_one_line(guest, tmp_path):
    disk = tmp_path / "q.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    qemu = subprocess.run(
        ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57", "-m", "256", "-S",
         "-display", "none", "-monitor", "stdio", "-drive",
         f"file={disk},format=qcow2,if=virtio"],
        input="savevm fromqemu\nquit\n", capture_output=True, text=True, timeout=120)
    assert qemu.returncode == 0, qemu.stderr
    ours = subprocess.run([*KEMU, "img", "snapshot", "-l", str(disk)], capture_output=True,
                          text=True)
    theirs = subprocess.run(["qemu-img", "snapshot", "-l", str(disk)], capture_output=True,
                            text=True)
    assert ours.stdout == theirs.stdout and "fromqemu" in ours.stdout
    fresh = Console(kemu_args(guest, disk) + ["-loadvm", "fromqemu"])
    assert fresh.wait(120) == 1
    err = fresh.stderr.strip()
    assert len(err.splitlines()) == 1 and "saved by QEMU" in err, err


def pci_args(guest, disk, fmt: str, locking: str = "auto") -> list[str]:
    """The guest with its disk on virtio-blk-pci (MSI-X) and a virtio-rng-pci."""
    return ["-M", "virt", "-cpu", "cortex-a57", "-m", "256", "-kernel", str(guest.kernel),
            "-initrd", str(guest.initrd), "-append", guest.append, "-nographic",
            "-serial", "stdio",
            "-blockdev", f"driver=file,filename={disk},node-name=f0,locking={locking}",
            "-blockdev", f"driver={fmt},file=f0,node-name=disk0",
            "-device", "virtio-blk-pci,drive=disk0,addr=4", "-device", "virtio-rng-pci"]


def test_a_machine_with_pci_devices_survives_savevm_and_loadvm(guest, tmp_path):
    disk = tmp_path / "pci.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    sock = tmp_path / "qmp.sock"
    console = Console(pci_args(guest, disk, "qcow2") + ["-qmp", f"unix:{sock},server=on,wait=off"])
    try:
        console.expect(rb"# ", timeout=120)
        pci = "/sys/bus/pci/devices/0000:00:04.0"
        assert console.run(f"cat {pci}/device").split()[-1] == "0x1042"     # virtio-blk-pci
        assert console.run(f"ls {pci}/msi_irqs | wc -l").split()[-1] != "0"    # on MSI-X
        qmp = QmpClient(sock)
        mark(console, "pci-one")
        assert hmp(qmp, "savevm p1") == ""
        mark(console, "pci-two")
        assert hmp(qmp, "loadvm p1") == ""
        # the disk answers through its restored queue and MSI-X vector
        assert marks(console) == ("pci-one", "pci-one")
        mark(console, "pci-three")
        assert marks(console) == ("pci-three", "pci-three")
        qmp.execute("quit")
        console.wait(60)
    finally:
        console.close()
    check = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_a_machine_with_pci_devices_migrates(guest, tmp_path):
    disk = tmp_path / "pci.raw"
    disk.write_bytes(bytes(16 * MiB))
    src_sock, dst_sock = tmp_path / "src.qmp", tmp_path / "dst.qmp"
    mig = tmp_path / "mig.sock"
    # shared storage: both processes have the raw image open (QEMU's locking=off)
    src = Console(pci_args(guest, disk, "raw", "off")
                  + ["-qmp", f"unix:{src_sock},server=on,wait=off"])
    dst = None
    try:
        src.expect(rb"# ", timeout=120)
        mark(src, "before-migration")
        dst = Console(pci_args(guest, disk, "raw", "off")
                      + ["-qmp", f"unix:{dst_sock},server=on,wait=off",
                         "-incoming", f"unix:{mig}"])
        deadline = time.monotonic() + 60
        while not mig.exists():
            assert time.monotonic() < deadline, "the destination never listened"
            time.sleep(0.05)
        qs = QmpClient(src_sock)
        qs.execute("migrate", uri=f"unix:{mig}")
        info = qs.wait_migration(("completed", "failed"))
        assert info["status"] == "completed", info
        assert marks(dst) == ("before-migration", "before-migration")
        mark(dst, "after-migration")
        assert marks(dst) == ("after-migration", "after-migration")
        qs.close()
    finally:
        src.close()
        if dst is not None:
            dst.close()
    assert disk.read_bytes()[512:527] == b"after-migration"
