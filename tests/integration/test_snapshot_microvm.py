"""Snapshots, restore, fork and migration of the x86-64 microvm board on this host's KVM.

The purpose-built guest of tests/guests/microvm.c is booted through the
board and stopped where it waits, halted with interrupts on, for a line
typed on its 16550: its IDT, its I/O APIC route (pin 4 -> vector 0x30), its
LAPIC, the UART's receive interrupt enable and the halted vCPU are all
state that must survive.  A machine restored from the snapshot (a new KVM
VM with new vCPUs, RAM mapped from the memory file) gets the line, the
guest's handler reads it and the guest goes on to reset the machine
through the i8042; the original machine runs on and does the same with its
own line.  On PVM hosts guest kernel code is emulated, so this guest is
tiny; Linux is snapshotted on real KVM in the nested harness
(tests/integration/test_microvm_linux.py).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
from kemu.testing.stdio_console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guests"))
import guestbuild

from kemu import Machine
from kemu.machines.config import MachineConfig, MiB
from kemu.errors import AccelError
from kemu.state import StateError

_reason = guestbuild.kvm_guest_unavailable()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("microvm-snap")
    path = out / "microvm.bzImage"
    path.write_bytes(guestbuild.build_bzimage("microvm", out))
    return path


def _config(kernel: Path, **kw) -> MachineConfig:
    return MachineConfig(machine="microvm", accel="kvm", kernel=kernel, append="kemu.snap",
                         memory=kw.pop("memory", 64 * MiB), no_reboot=True, **kw)


def _snapshot_at(config: MachineConfig, marker: str, directory: Path) -> None:
    """Boot ``config``, snapshot it into ``directory`` once ``marker`` is on its console,
    end it."""
    vm = Machine.from_config(config)
    vm.start()
    try:
        vm.console.expect(marker, timeout=TIMEOUT)
        vm.snapshot(directory)
    finally:
        vm.kill()


class Output:
    def __init__(self) -> None:
        self.data = bytearray()
        self.lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        with self.lock:
            self.data += data

    @property
    def text(self) -> str:
        with self.lock:
            return self.data.decode(errors="replace")


@pytest.fixture
def waiting(kernel, tmp_path):
    """A machine halted in the guest's wait for input, and its snapshot directory."""
    out = Output()
    vm = Machine.from_config(_config(kernel), console_output=out)
    vm.start()
    try:
        vm.console.expect("ready for input", timeout=TIMEOUT)
        header = vm.snapshot(tmp_path / "snap")
        yield vm, out, tmp_path / "snap", header
    finally:
        if vm.state not in ("shutdown", "stopped"):
            vm.kill()


def _finishes_with(vm: Machine, line: str) -> str:
    vm.console.write(line + "\n")
    vm.console.expect(f"rx {line}", timeout=TIMEOUT)
    vm.console.expect("resetting", timeout=TIMEOUT)
    assert vm.wait(TIMEOUT) is not None
    return vm.console.output


def test_restored_machine_takes_its_input_and_the_original_runs_on(kernel, waiting):
    vm, out, snap, header = waiting
    assert header["machine"]["board"] == "microvm"
    restored = Machine.restore(snap)
    try:
        text = _finishes_with(restored, "from-the-copy")
        # the copy did not boot again: its console starts after the snapshot
        assert "cmdline" not in text and "thre_iir" not in text, text
        assert restored.outcome.reason == "reset"
    finally:
        if restored.state not in ("shutdown", "stopped"):
            restored.kill()
    text = _finishes_with(vm, "from-the-original")
    assert "rx from-the-original" in text and "from-the-copy" not in text


def test_fork_gives_copies_that_each_run_on(kernel, waiting, tmp_path):
    vm, _out, _snap, _header = waiting
    copies = vm.fork(2, tmp_path / "fork")
    try:
        for i, copy in enumerate(copies):
            assert "rx copy" not in copy.console.output
            _finishes_with(copy, f"copy{i}")
    finally:
        for copy in copies:
            if copy.state not in ("shutdown", "stopped"):
                copy.kill()


def test_snapshot_from_another_configuration_is_refused_in_one_line(kernel, waiting, tmp_path):
    import shutil
    _vm, _out, snap, _header = waiting
    from kemu import snapshot
    header, payload = snapshot.load(snap)
    # the same snapshot, as if the user changed -smp: refused before anything starts
    other = Machine.from_config(_config(kernel, smp=2))
    try:
        with pytest.raises(StateError) as e:
            from kemu.state import check_header
            check_header(header, other._board.state_fingerprint(), "snapshot")
        assert "smp" in str(e.value) and "\n" not in str(e.value)
    finally:
        other._board.close()
    # a stream whose checksum is right but whose machine state is not (a crafted file)
    from kemu import state as st
    for damage in (lambda b: b.pop("vm"),
                   lambda b: b["cpus"][0].update(sregs=b"\0" * 3),
                   lambda b: b["cpus"][0].update(msrs=[[0xDEAD0000, 1]]),
                   lambda b: b["virtio"].append({})):
        crafted = tmp_path / f"crafted{id(damage)}"
        shutil.copytree(snap, crafted)
        board = st.loads(st.dumps(payload["board"]))
        damage(board)
        with open(crafted / snapshot.STATE_FILE, "wb") as f:
            st.write_stream(f, {k: v for k, v in header.items()
                                if k not in ("payload_size", "payload_sha256")},
                            dict(payload, board=board))
        with pytest.raises((StateError, AccelError)) as e:
            Machine.restore(crafted)
        assert "\n" not in str(e.value), e.value
    # a truncated memory file
    bad = tmp_path / "bad"
    shutil.copytree(snap, bad)
    with open(bad / snapshot.MEMORY_FILE, "r+b") as f:
        f.truncate(4096)
    with pytest.raises(StateError) as e:
        Machine.restore(bad)
    assert "truncated" in str(e.value) and "\n" not in str(e.value)


def _migration_status(vm: Machine, timeout: float = TIMEOUT) -> str:
    """The final status of ``vm``'s migration, from its MIGRATION events."""
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for event in vm.events(timeout=max(0.01, end - time.monotonic())):
            status = getattr(event, "status", None)
            if status in ("completed", "failed", "cancelled"):
                return status
    return "timeout"


def _enable(vm: Machine) -> None:
    vm.migration.set_capabilities([{"capability": "events", "state": True},
                                   {"capability": "x-checksum", "state": True}])


def _dirtying_pair(kernel: Path, no_reboot: bool = True) -> tuple[Machine, Machine]:
    """A source running the guest's page-writing loop ("kemu.dirty") and a destination
    of the same configuration, not started."""
    config = _config(kernel)
    config.append = "kemu.snap kemu.dirty"
    config.no_reboot = no_reboot
    source = Machine.from_config(config)
    dest = Machine.from_config(_config(kernel, memory=config.memory))
    dest.config.append = config.append
    return source, dest


def _listening(source: Machine, dest: Machine, sock: Path) -> str:
    """Start ``source`` (up to its wait for input), both with migration events and
    x-checksum, ``dest`` waiting on ``sock``; the URI to migrate to."""
    source.start()
    source.console.expect("ready for input", timeout=TIMEOUT)
    _enable(source)
    _enable(dest)
    uri = f"unix:{sock}"
    dest.start_incoming(uri)
    return uri


def test_live_migration_over_unix_while_the_guest_dirties_memory(kernel, tmp_path):
    """KVM's dirty log follows a guest writing 256 pages in a loop: RAM at the switch
    is the same on both sides (x-checksum) and the destination takes the input."""
    source, dest = _dirtying_pair(kernel)
    try:
        uri = _listening(source, dest, tmp_path / "mig.sock")
        # A small bandwidth makes the first pass last about a second, and a 1 ms limit
        # lets the guest's loop (256 pages) go in the pause only if it wrote under 17
        # pages meanwhile: several passes however slowly the guest runs on a busy host.
        source.migration.set_parameters({"max-bandwidth": 64 << 20, "downtime-limit": 1})
        source.migrate(uri)
        assert _migration_status(source) == "completed", source.migration.info()
        out, into = source.migration.info(), dest.migration.info()
        assert out["ram"]["dirty-sync-count"] >= 2, out
        assert out["x-ram-sha256"] == into["x-ram-sha256"]
        assert source.state == "paused" and source._postmigrate
        dest.console.write("moved\n")
        # the loop went on in the destination until the line came
        dest.console.expect(r"dirty_writes 0x[0-9a-f]+", timeout=TIMEOUT)
        dest.console.expect("rx moved", timeout=TIMEOUT)
        dest.console.expect("resetting", timeout=TIMEOUT)
    finally:
        for vm in (source, dest):
            if vm.state not in ("shutdown", "stopped"):
                vm.kill()


def test_live_migration_goes_on_while_the_guest_reboots(kernel, tmp_path):
    """The guest resets (a new KVM VM) in the middle of a live migration: the dirty
    log is never read between two VMs (it failed with "'NoneType' object has no
    attribute 'slots'" in the nested benchmark), every page counts as written, and
    the destination gets the rebooted guest."""
    import time
    source, dest = _dirtying_pair(kernel, no_reboot=False)
    try:
        uri = _listening(source, dest, tmp_path / "reboot.sock")
        # slow passes that never converge, until the reboot has happened
        source.migration.set_parameters({"max-bandwidth": 1 << 20, "downtime-limit": 1})
        source.migrate(uri)
        end = time.monotonic() + TIMEOUT
        while source.migration.info()["ram"]["dirty-sync-count"] < 2:
            assert source.migration.info()["status"] in ("setup", "active"), source.migration.info()
            assert time.monotonic() < end, source.migration.info()
            time.sleep(0.01)
        source.console.write("reboot\n")
        source.console.expect("resetting", timeout=TIMEOUT)
        source.console.expect("ready for input", timeout=TIMEOUT)    # booted again
        source.migration.set_parameters({"max-bandwidth": 1 << 30, "downtime-limit": 10000})
        assert _migration_status(source) == "completed", source.migration.info()
        out, into = source.migration.info(), dest.migration.info()
        assert out["x-ram-sha256"] == into["x-ram-sha256"]
        dest.console.write("moved\n")
        dest.console.expect("rx moved", timeout=TIMEOUT)
    finally:
        for vm in (source, dest):
            if vm.state not in ("shutdown", "stopped"):
                vm.kill()


def test_cancelled_migration_leaves_the_source_running(kernel, waiting, tmp_path):
    vm, _out, _snap, _header = waiting
    import socket
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "sink.sock"))
    server.listen(1)        # a destination that never answers
    try:
        _enable(vm)
        vm.migrate(f"unix:{tmp_path / 'sink.sock'}")
        conn, _ = server.accept()
        vm.migration.cancel()
        assert _migration_status(vm) in ("cancelled", "failed")
        conn.close()
        assert vm.state == "running"
        _finishes_with(vm, "still-here")
    finally:
        server.close()


def test_two_vcpus_restored_the_second_still_waiting_for_sipi(kernel, tmp_path):
    """The AP is saved waiting for INIT/SIPI; in the restored machine the guest
    starts it and both report their APIC ids."""
    config = _config(kernel, smp=2)
    config.append = "kemu.snap kemu.smp"
    _snapshot_at(config, "ready for input", tmp_path / "snap")
    restored = Machine.restore(tmp_path / "snap")
    try:
        text = _finishes_with(restored, "two")
        assert "cpu 0x0" in text and "cpu 0x10101" in text, text
    finally:
        if restored.state not in ("shutdown", "stopped"):
            restored.kill()


def test_vcpu_and_vm_state_round_trip_through_a_new_vm():
    """Every saved structure goes back into a new VM and reads back the same;
    a blob of the wrong size, or contents KVM refuses, is one line."""
    from kemu.accel.kvm import Kvm
    from kemu.accel.kvm import x86_state as xs
    from kemu.accel.kvm.x86_cpu import X86BootSetup, setup_vcpu, setup_x86_vm
    from kemu.errors import AccelError
    from kemu.memory import GuestMemory, RamRegion
    from kemu.state import from_plain, loads, dumps

    def new_vm(kvm):
        vm = kvm.create_vm()
        mem = GuestMemory([RamRegion(0, 16 * MiB)])
        setup_x86_vm(vm, mem)
        return vm, mem, vm.create_vcpu(0)

    with Kvm() as kvm:
        vm, mem, vcpu = new_vm(kvm)
        setup_vcpu(vcpu, X86BootSetup.prepare(kvm, mem, 1), 0x100000, 0x7000)
        regs = vcpu.get_regs()
        regs.rax, regs.r15 = 0x1122334455667788, 42
        vcpu.set_regs(regs)
        vcpu.set_msrs({0xC0000082: 0xFFFFFFFF81000000})          # LSTAR
        caps = xs.Capabilities.probe(vm, vcpu)
        assert 0x10 in caps.msrs and 0x4B564D01 in caps.msrs      # TSC, kvmclock
        saved = xs.save_vcpu(vcpu, caps)
        saved_vm = xs.save_vm(vm, pit=True)
        plain = loads(dumps(saved))
        vm2, _mem2, vcpu2 = new_vm(kvm)
        caps2 = xs.Capabilities.probe(vm2, vcpu2)
        xs.restore_vcpu(vcpu2, from_plain(xs.X86VcpuState, plain), caps2)
        xs.restore_vm(vm2, from_plain(xs.X86VmState, loads(dumps(saved_vm))))
        again = xs.save_vcpu(vcpu2, caps2)
        for name in ("regs", "sregs", "xsave", "xcrs", "lapic", "debugregs", "cpuid"):
            assert getattr(again, name) == getattr(saved, name), name
        msrs, msrs2 = dict(saved.msrs), dict(again.msrs)
        assert msrs2[0xC0000082] == 0xFFFFFFFF81000000
        assert abs(msrs2[0x10] - msrs[0x10]) < 1 << 40            # the TSC went on from there
        assert xs.save_vm(vm2, pit=True).irqchips == saved_vm.irqchips
        with pytest.raises(StateError) as e:
            xs.restore_vcpu(vcpu2, from_plain(xs.X86VcpuState, dict(plain, regs=b"\0" * 7)),
                            caps2)
        assert "registers" in str(e.value) and "\n" not in str(e.value)
        bad = from_plain(xs.X86VcpuState, plain)
        bad.msrs = [(0xDEAD0000, 1)]
        with pytest.raises(AccelError) as e:
            xs.restore_vcpu(vcpu2, bad, caps2)
        assert "0xdead0000" in str(e.value) and "\n" not in str(e.value)
        for fd in (vcpu, vcpu2):
            fd.close()
        vm.close()
        vm2.close()


def test_every_microvm_device_saves_and_restores_plain_state(kernel, tmp_path):
    from kemu.backends.serial import SerialBackend
    from kemu.machines.builder import build
    from kemu.testing.state_check import check_round_trips
    from kemu.machines.config import DeviceConfig, DriveConfig
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    config = _config(kernel, drives=[DriveConfig(disk, "raw")],
                     devices=[DeviceConfig("virtio-rng-device"),
                              DeviceConfig("vhost-vsock-device", {"guest-cid": "5"}),
                              DeviceConfig("virtio-serial-device")])
    board = build(config, SerialBackend(lambda data: None))
    try:
        devices = list(board._devices().values())
        for slot in board.virtio_slots:
            devices += [slot.device, slot.device.device]
        assert len(devices) >= 13
        check_round_trips(devices)
    finally:
        board.close()


def test_kemu_processes_migrate_over_unix_and_restore_from_a_file(kernel, tmp_path):
    """QEMU's spelling between two kemu processes: -incoming unix:, QMP migrate; then
    the destination saved with migrate exec:cat > FILE and restored by a third
    process with -incoming "exec:cat FILE"."""
    from kemu.testing.qmp_client import QmpClient
    args = ["-M", "microvm", "-accel", "kvm", "-m", "64", "-kernel", str(kernel),
            "-append", "kemu.snap", "-display", "none", "-serial", "stdio", "-no-reboot"]
    src = Console(args + ["-qmp", f"unix:{tmp_path / 'src.qmp'},server=on,wait=off"])
    dst = Console(args + ["-qmp", f"unix:{tmp_path / 'dst.qmp'},server=on,wait=off",
                          "-incoming", f"unix:{tmp_path / 'mig.sock'}"])
    third = None
    try:
        src.expect(rb"ready for input", TIMEOUT)
        q = QmpClient(tmp_path / "src.qmp")
        qd = QmpClient(tmp_path / "dst.qmp")
        assert qd.execute("query-status")["status"] == "inmigrate"
        import time
        end = time.monotonic() + TIMEOUT          # the destination listens
        while not (tmp_path / "mig.sock").exists() and time.monotonic() < end:
            time.sleep(0.02)
        q.execute("migrate", uri=f"unix:{tmp_path / 'mig.sock'}")
        assert q.wait_migration(("completed", "failed"), TIMEOUT)["status"] == "completed"
        assert q.execute("query-status")["status"] == "postmigrate"
        assert qd.execute("query-status")["status"] == "running"
        stream = tmp_path / "saved.stream"
        qd.execute("migrate", uri=f"exec:cat > {stream}")
        assert qd.wait_migration(("completed", "failed"), TIMEOUT)["status"] == "completed"
        third = Console(args + ["-incoming", f"exec:cat {stream}"])
        third.send("third\n")
        third.expect(rb"rx third", TIMEOUT)
        third.expect(rb"resetting", TIMEOUT)
        assert third.wait(TIMEOUT) == 0
    finally:
        for c in (src, dst, third):
            if c is not None:
                c.close()


def _woken_blk_guest(vm: Machine, key: str) -> dict[str, int]:
    """Wake tests/guests/virtio_blk.c waiting in ``vm`` with ``key``; once it powered
    off, its reports (checked: the key, the write and its verification went well)."""
    vm.console.write(key)
    vm.console.expect("done", timeout=TIMEOUT)
    assert vm.wait(TIMEOUT) == 0
    kv = {k: int(v, 16) for k, _, v in (line.partition(" ")
                                        for line in vm.console.output.splitlines())
          if v.startswith("0x")}
    assert kv["woke"] == ord(key)
    assert (kv["write_status"], kv["verify_status"], kv["verify_bad"]) == (0, 0, 0)
    return kv


def test_virtio_blk_goes_on_in_a_restored_copy_writing_its_own_overlay(tmp_path):
    """tests/guests/virtio_blk.c set up its queue, read by interrupt, and waits;
    the restored copy's requests (queue indices, the I/O APIC route, the slot's
    irqfd and ioeventfd) go on, its write lands in its own overlay."""
    import os
    import struct

    from kemu.backends.qcow2 import Qcow2Image
    from kemu.machines.config import DriveConfig
    out = tmp_path / "guest"
    kernel = out / "virtio_blk.bzImage"
    kernel.parent.mkdir()
    kernel.write_bytes(guestbuild.build_bzimage("virtio_blk", out))
    original = os.urandom(128 * 512)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(original)
    config = _config(kernel, drives=[DriveConfig(disk, format="raw")])
    config.append = "virtio-blk kemu.wait"
    _snapshot_at(config, "waiting", tmp_path / "snap")
    restored = Machine.restore(tmp_path / "snap", overlay_dir=tmp_path)
    try:
        kv = _woken_blk_guest(restored, "g")
        assert kv["flush_status"] == 0 and kv["oob_status"] == 1
        assert kv["again_status"] == 0 and kv["irq_vring"] >= 4
        overlay = restored.config.drives[0].path
        with Qcow2Image.open(overlay, read_only=True, locking="off") as image:
            written = image.read(6 * 512, 512)
        assert written != original[6 * 512:7 * 512]
        assert disk.read_bytes() == original                 # the original image untouched
        assert struct.unpack_from("<Q", written)[0] != 0
    finally:
        if restored.state not in ("shutdown", "stopped"):
            restored.kill()


def test_pcie_machine_restores_its_pci_configuration(kernel, tmp_path):
    """-M microvm,pcie=on with a virtio-rng-pci device: a BAR and the Command register
    set through ECAM before the snapshot are there in the restored copy, which takes
    its input; the snapshot does not fit a machine without pcie=on (one line)."""
    from kemu.machines.config import DeviceConfig
    from kemu.devices.pci.config import COMMAND
    config = _config(kernel, devices=[DeviceConfig("virtio-rng-pci")])
    config.extra["pcie"] = True
    vm = Machine.from_config(config)
    vm.start()
    try:
        vm.console.expect("ready for input", timeout=TIMEOUT)
        ecam = vm._board.pci.host.ecam
        device = next(t.pci_slot for t in vm._board.pci.transports)
        cfg = device << 15
        ecam.write(cfg + 0x20, 4, 0xE000_0000)            # BAR4 (the virtio regions)
        ecam.write(cfg + COMMAND, 2, 0x6)                  # memory space, bus master
        bar4 = ecam.read(cfg + 0x20, 4)
        vm.snapshot(tmp_path / "snap")
        assert vm.state == "running"
    finally:
        vm.kill()
    restored = Machine.restore(tmp_path / "snap")
    try:
        ecam = restored._board.pci.host.ecam
        assert ecam.read(cfg + 0x20, 4) == bar4
        assert ecam.read(cfg + COMMAND, 2) & 0x6 == 0x6
        assert ecam.read(cfg, 4) == 0x1044_1AF4          # virtio-rng, modern (1AF4:1044)
        _finishes_with(restored, "pci-copy")
    finally:
        if restored.state not in ("shutdown", "stopped"):
            restored.kill()
    from kemu import snapshot
    from kemu.state import check_header
    header, _payload = snapshot.load(tmp_path / "snap")
    other = Machine.from_config(_config(kernel, devices=[DeviceConfig("virtio-rng-pci")]))
    try:
        with pytest.raises(StateError) as e:
            check_header(header, other._board.state_fingerprint(), "snapshot")
        assert "\n" not in str(e.value)
    finally:
        other._board.close()


def _qcow2(path: Path, size: int = 1 << 20) -> Path:
    from kemu.backends.qcow2.create import create_qcow2
    create_qcow2(path, size)
    return path


def test_savevm_then_loadvm_into_the_running_machine(kernel, tmp_path):
    """HMP's savevm/loadvm on microvm: the VM state goes into the qcow2 disk (qemu-img
    lists it with its size), loadvm puts RAM back (a host write after the savevm is
    gone) and a fresh KVM VM takes the saved vCPUs: the guest takes its input."""
    import shutil
    import subprocess
    from kemu.machines.config import DriveConfig
    disk = _qcow2(tmp_path / "disk.qcow2")
    vm = Machine.from_config(_config(kernel, drives=[DriveConfig(disk, format="qcow2")]))
    vm.start()
    try:
        vm.console.expect("ready for input", timeout=TIMEOUT)
        info = vm.savevm("waiting")
        assert info.vm_state_size > 64 * MiB // 4096, info    # state and (sparse) RAM
        assert vm.state == "running"
        marker = b"written-after-savevm"
        at = 48 * MiB
        vm._board.memory.write(at, marker)
        vm.loadvm("waiting")
        assert vm.state == "running"
        assert vm._board.memory.read(at, len(marker)) == b"\0" * len(marker)
        text = _finishes_with(vm, "after-loadvm")
        assert text.count("ready for input") == 1, text        # not booted again
        assert vm.outcome.reason == "reset"
    finally:
        if vm.state not in ("shutdown", "stopped"):
            vm.kill()
    if shutil.which("qemu-img"):
        listing = subprocess.run(["qemu-img", "snapshot", "-l", str(disk)], check=True,
                                 capture_output=True, text=True).stdout
        row = next(ln for ln in listing.splitlines() if " waiting " in ln)
        assert " 0 B " not in row, listing                     # a VM state, not disk-only


def test_loadvm_at_start_brings_back_the_disk_and_a_waiting_virtio_blk_guest(tmp_path):
    """-loadvm on microvm: tests/guests/virtio_blk.c saved while it waits with its
    queue set up; after it wrote and powered off, a new machine started from the
    snapshot sees the disk as it was (the write gone) and the guest's requests go
    on through the restored queue, irqfd and ioeventfd."""
    from kemu.backends.qcow2 import Qcow2Image
    from kemu.machines.config import DriveConfig
    out = tmp_path / "guest"
    out.mkdir()
    kernel = out / "virtio_blk.bzImage"
    kernel.write_bytes(guestbuild.build_bzimage("virtio_blk", out))
    disk = _qcow2(tmp_path / "disk.qcow2")

    def machine() -> Machine:
        config = _config(kernel, drives=[DriveConfig(disk, format="qcow2")])
        config.append = "virtio-blk kemu.wait"
        return Machine.from_config(config)

    def sector6() -> bytes:
        with Qcow2Image.open(disk, read_only=True, locking="off") as image:
            return image.read(6 * 512, 512)

    first = machine()
    first.start()
    try:
        first.console.expect("waiting", timeout=TIMEOUT)
        first.savevm("waiting")
        first.console.write("g")
        first.console.expect("done", timeout=TIMEOUT)
        assert first.wait(TIMEOUT) == 0
    finally:
        if first.state not in ("shutdown", "stopped"):
            first.kill()
    written = sector6()
    assert written != b"\0" * 512
    second = machine()
    second.start(loadvm="waiting")
    try:
        assert sector6() == b"\0" * 512                       # the disk as at the savevm
        assert "waiting" not in second.console.output          # not booted again
        _woken_blk_guest(second, "h")
    finally:
        if second.state not in ("shutdown", "stopped"):
            second.kill()
    assert sector6() != b"\0" * 512


# -- machines over 3 GiB: RAM in two regions, below the 32-bit hole and from 4 GiB -----------------
GiB = 1 << 30
#: A guest-physical address in the region above 4 GiB of a -m 4G machine ([4 GiB, 5 GiB)).
HIGH = (4 * GiB) + 512 * MiB + 0x123
HIGH_LAYOUT = [[0, 3 * GiB], [4 * GiB, GiB]]


def _timed(what: str, fn, *args, **kw):
    import time
    t0 = time.monotonic()
    result = fn(*args, **kw)
    print(f"{what}: {time.monotonic() - t0:.3f} s")
    return result


def test_4g_machine_snapshot_and_restore_keep_ram_above_4g(kernel, tmp_path):
    """-m 4G: a byte the host writes above 4 GiB before the snapshot is in the
    restored copy, which takes its input; the memory file is the two regions end
    to end and sparse; the same snapshot with its regions said otherwise is refused
    in one line."""
    import shutil

    from kemu import snapshot
    from kemu import state as st
    vm = Machine.from_config(_config(kernel, memory=4 * GiB))
    vm.start()
    try:
        vm.console.expect("ready for input", timeout=TIMEOUT)
        vm._board.memory.write(HIGH, b"above-4g")
        vm._board.memory.write(3 * GiB - 8, b"below3g!")        # the low region's last bytes
        header = _timed("4 GiB snapshot", vm.snapshot, tmp_path / "snap")
    finally:
        vm.kill()
    assert header["memory"]["regions"] == HIGH_LAYOUT
    ram = tmp_path / "snap" / snapshot.MEMORY_FILE
    assert ram.stat().st_size == 4 * GiB
    assert ram.stat().st_blocks * 512 < 64 * MiB, ram.stat()     # zero MiBs are holes
    with open(ram, "rb") as f:                                     # RAM offset of HIGH
        f.seek(HIGH - GiB)
        assert f.read(8) == b"above-4g"
    restored = _timed("4 GiB restore", Machine.restore, tmp_path / "snap")
    try:
        assert restored._board.memory.read(HIGH, 8) == b"above-4g"
        assert restored._board.memory.read(3 * GiB - 8, 8) == b"below3g!"
        # the copy (RAM mapped from the file) snapshotted again: holes found, not read
        restored._board.memory.write(HIGH + 8, b"+copy")
        _timed("4 GiB snapshot of the restored copy", restored.snapshot, tmp_path / "again")
        again = tmp_path / "again" / snapshot.MEMORY_FILE
        assert again.stat().st_blocks * 512 < 64 * MiB, again.stat()
        with open(again, "rb") as f:
            f.seek(HIGH - GiB)
            assert f.read(13) == b"above-4g+copy"
        _finishes_with(restored, "high-copy")
    finally:
        if restored.state not in ("shutdown", "stopped"):
            restored.kill()
    # the snapshot's header says one region of 4 GiB: not this machine's layout
    header, payload = snapshot.load(tmp_path / "snap")
    crafted = tmp_path / "crafted"
    shutil.copytree(tmp_path / "snap", crafted)
    header["memory"]["regions"] = [[0, 4 * GiB]]
    with open(crafted / snapshot.STATE_FILE, "wb") as f:
        st.write_stream(f, {k: v for k, v in header.items()
                            if k not in ("payload_size", "payload_sha256")}, payload)
    with pytest.raises(StateError) as e:
        Machine.restore(crafted, verify=False)
    assert str(e.value).endswith("made for RAM 4 GiB at 0x0, this machine has 3 GiB at 0x0 + "
                                 "1 GiB at 0x100000000"), e.value
    assert "\n" not in str(e.value)


def test_4g_machine_savevm_then_loadvm_brings_back_ram_above_4g(kernel, tmp_path):
    """savevm/loadvm of a -m 4G machine with a qcow2 disk: RAM above 4 GiB goes
    back to the savevm (a byte written before it is back, one after it gone), the
    guest takes its input; the same snapshot in a -m 3G machine is refused in one
    line and that machine runs on."""
    from kemu.machines.config import DriveConfig
    from kemu.savevm import SnapshotError
    disk = _qcow2(tmp_path / "disk.qcow2")
    mem = None
    vm = Machine.from_config(_config(kernel, memory=4 * GiB,
                                     drives=[DriveConfig(disk, format="qcow2")]))
    vm.start()
    try:
        vm.console.expect("ready for input", timeout=TIMEOUT)
        mem = vm._board.memory
        mem.write(HIGH, b"saved-high")
        info = _timed("4 GiB savevm", vm.savevm, "high")
        assert 64 * 1024 < info.vm_state_size < 64 * MiB, info      # zero MiBs take no room
        mem.write(HIGH, b"later-high")
        mem.write(HIGH + 256 * MiB, b"gone")
        _timed("4 GiB loadvm", vm.loadvm, "high")
        assert mem.read(HIGH, 10) == b"saved-high"
        assert mem.read(HIGH + 256 * MiB, 4) == b"\0" * 4
        text = _finishes_with(vm, "after-high-loadvm")
        assert text.count("ready for input") == 1, text
    finally:
        if vm.state not in ("shutdown", "stopped"):
            vm.kill()
    small = Machine.from_config(_config(kernel, memory=3 * GiB,
                                        drives=[DriveConfig(disk, format="qcow2")]))
    small.start()
    try:
        small.console.expect("ready for input", timeout=TIMEOUT)
        with pytest.raises((StateError, SnapshotError)) as e:
            small.loadvm("high")
        assert "memory" in str(e.value) and "\n" not in str(e.value), e.value
        assert small.state == "running"
        _finishes_with(small, "still-3g")
    finally:
        if small.state not in ("shutdown", "stopped"):
            small.kill()


def test_4g_machine_live_migration_carries_ram_above_4g(kernel, tmp_path):
    """A -m 4G machine migrates live while its guest dirties memory: bytes the host
    wrote above 4 GiB before and while it went are in the destination, RAM at the
    switch is the same on both sides (x-checksum), the destination takes the input;
    a -m 3G destination refuses the same stream in one line and the source runs on."""
    config = _config(kernel, memory=4 * GiB)
    config.append = "kemu.snap kemu.dirty"
    source = Machine.from_config(config)
    small = Machine.from_config(_config(kernel, memory=3 * GiB))
    small.config.append = config.append
    dest = None
    try:
        source.start()
        source.console.expect("ready for input", timeout=TIMEOUT)
        source._board.memory.write(HIGH, b"before-migrate")
        _enable(source)
        _enable(small)
        uri = f"unix:{tmp_path / 'small.sock'}"
        small.start_incoming(uri)
        source.migrate(uri)
        assert _migration_status(source) == "failed", source.migration.info()
        assert "memory" in small.migration.info()["error-desc"]
        assert "\n" not in small.migration.info()["error-desc"]
        assert source.state == "running"

        dest = Machine.from_config(_config(kernel, memory=4 * GiB))
        dest.config.append = config.append
        _enable(dest)
        uri = f"unix:{tmp_path / 'mig.sock'}"
        dest.start_incoming(uri)
        source.migration.set_parameters({"max-bandwidth": 64 << 20, "downtime-limit": 1})
        source.migrate(uri)
        source._board.memory.write(HIGH + GiB // 4, b"while-migrating")
        assert _migration_status(source, 4 * TIMEOUT) == "completed", source.migration.info()
        out, into = source.migration.info(), dest.migration.info()
        print(f"4 GiB migration: total {out['total-time']} ms, downtime {out['downtime']} ms, "
              f"{out['ram']['dirty-sync-count']} passes")
        assert out["ram"]["total"] == 4 * GiB
        assert out["x-ram-sha256"] == into["x-ram-sha256"]
        assert dest._board.memory.read(HIGH, 14) == b"before-migrate"
        assert dest._board.memory.read(HIGH + GiB // 4, 15) == b"while-migrating"
        dest.console.write("moved-4g\n")
        dest.console.expect("rx moved-4g", timeout=TIMEOUT)
        dest.console.expect("resetting", timeout=TIMEOUT)
    finally:
        for vm in (source, small, dest):
            if vm is not None and vm.state not in ("shutdown", "stopped"):
                vm.kill()
