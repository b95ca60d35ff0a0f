"""kemu-system-x86_64 and kemu-system-aarch64 (issue 13): emulators of one target, as
QEMU's binaries are, for libvirt's ``<emulator>``.  The probe's ``-machine none`` says
its target, KVM is offered where it runs, and an x86 domain's command line (recorded
from libvirt 9.0's log) becomes the microvm config."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kemu.accel.kvm import kvm_unavailable_reason
from kemu.errors import ConfigError
from kemu.machines.config import MachineConfig
from kemu.options import parse_qemu_options
from test_qmp_introspect import Vm, session
from test_qmp_introspect import ask as _ask

X86 = dict(target="x86_64", machine="microvm", accel="kvm", cpu="host")
BIN = Path(sys.executable).parent


def x86(*argv: str) -> MachineConfig:
    return parse_qemu_options(list(argv), MachineConfig(**X86))


def ask(config, name, **args):
    return _ask(session(Vm(config)), name, **args)


PROBE = ["-S", "-no-user-config", "-nodefaults", "-nographic",
         "-qmp", "unix:/tmp/p.sock,server=on,wait=off", "-pidfile", "/tmp/p.pid", "-daemonize"]


def test_the_x86_64_probe_machine_says_x86_64_and_runs_on_kvm_where_kvm_opens():
    cfg = x86(*PROBE, "-machine", "none,accel=kvm:tcg")
    assert ask(cfg, "query-target") == {"arch": "x86_64"}
    usable = kvm_unavailable_reason() is None
    assert cfg.accel == ("kvm" if usable else "tcg")
    assert ask(cfg, "query-kvm") == {"enabled": usable, "present": True}
    machines = {m["name"]: m for m in ask(cfg, "query-machines")}
    # kemu's microvm runs on KVM only: offered to a KVM probe, not to a TCG one.
    assert set(machines) == ({"microvm", "none"} if usable else {"none"})
    assert {c["name"] for c in ask(cfg, "query-cpu-definitions")} == {"host", "max"}
    types = {t["name"] for t in ask(cfg, "qom-list-types")}
    assert {"isa-serial", "microvm-machine", "kvm-accel", "host-x86_64-cpu"} <= types
    assert not {"virt-7.2-machine", "tcg-accel", "pl011"} & types


def test_the_microvm_machine_reports_its_vcpu_limit():
    from kemu.machines.x86_microvm import MAX_VCPUS
    [microvm] = [m for m in ask(x86(), "query-machines") if m["name"] == "microvm"]
    assert microvm["cpu-max"] == MAX_VCPUS
    assert microvm["default-cpu-type"] == "host-x86_64-cpu"


def test_the_generic_kemu_probe_stays_aarch64_on_tcg():
    cfg = parse_qemu_options(PROBE + ["-machine", "none,accel=kvm:tcg"], MachineConfig())
    assert cfg.accel == "tcg"
    assert ask(cfg, "query-target") == {"arch": "aarch64"}
    assert ask(cfg, "query-kvm") == {"enabled": False, "present": False}


@pytest.mark.parametrize("argv,message", [
    (["-M", "virt"], "-M virt: unsupported machine type (the x86_64 emulator has microvm, none)"),
    (["-machine", "virt-7.2"], "unsupported machine type"),
    (["-accel", "tcg"], "the microvm board runs on KVM here, not TCG"),
    (["-cpu", "qemu64"], "-cpu qemu64: kemu's microvm runs the guest on the host's CPU"),
    (["-cpu", "host,pmu=off"], "no CPU property 'pmu'"),
    (["-device", "isa-serial,index=1"], "COM1 only"),
    (["-device", "isa-serial,iobase=0x2f8"], "COM1 only"),
    (["-device", "isa-serial,irq=3"], "COM1 only"),
    (["-device", "isa-serial,frob=1"], "Property 'isa-serial.frob' not found"),
    (["-device", "isa-serial", "-device", "isa-serial"], "one serial port"),
    (["-device", "isa-serial,chardev=nothere"], "can't find value 'nothere'"),
    (["-serial", "stdio", "-device", "isa-serial"], "COM1 is already the -serial stdio port"),
])
def test_x86_64_refuses_what_it_does_not_have_in_one_line(argv, message):
    with pytest.raises(ConfigError) as e:
        x86(*argv)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_aarch64_refuses_microvm_and_isa_serial():
    with pytest.raises(ConfigError, match="unsupported machine type"):
        parse_qemu_options(["-M", "microvm"], MachineConfig(target="aarch64"))
    with pytest.raises(ConfigError, match="No 'ISA' bus found"):
        parse_qemu_options(["-device", "isa-serial"], MachineConfig())


def test_libvirts_x86_command_line_becomes_the_microvm_config(tmp_path):
    """The start command line libvirt 9.0 builds for the microvm domain of
    tests/integration/test_libvirt_microvm.py (from its log)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    key = tmp_path / "master-key.aes"
    key.write_bytes(os.urandom(32))
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "mon.sock"))
    listener.listen()
    cfg = x86(
        "-name", "guest=mv,debug-threads=on", "-S",
        "-object", json.dumps({"qom-type": "secret", "id": "masterKey0", "format": "raw",
                               "file": str(key)}),
        "-machine", "microvm,usb=off,dump-guest-core=off,memory-backend=microvm.ram",
        "-accel", "kvm", "-cpu", "host,migratable=on", "-m", "256",
        "-object", '{"qom-type":"memory-backend-ram","id":"microvm.ram","size":268435456}',
        "-overcommit", "mem-lock=off", "-smp", "1,sockets=1,cores=1,threads=1",
        "-uuid", "59bc26bc-43af-43a0-af2a-43c00d8fdc14", "-display", "none",
        "-no-user-config", "-nodefaults",
        "-chardev", f"socket,id=charmonitor,fd={listener.fileno()},server=on,wait=off",
        "-mon", "chardev=charmonitor,id=monitor,mode=control",
        "-rtc", "base=utc", "-no-shutdown", "-boot", "strict=on", "-kernel", "/k",
        "-initrd", "/i", "-append", "console=ttyS0",
        "-blockdev", json.dumps({"driver": "file", "filename": str(disk),
                                 "node-name": "libvirt-1-storage", "auto-read-only": True,
                                 "discard": "unmap"}),
        "-blockdev", '{"node-name":"libvirt-1-format","read-only":false,"driver":"raw",'
                     '"file":"libvirt-1-storage"}',
        "-device", '{"driver":"virtio-blk-device","drive":"libvirt-1-format",'
                   '"id":"virtio-disk0","bootindex":1}',
        "-chardev", "pty,id=charserial0",
        "-device", '{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}',
        "-audiodev", '{"id":"audio1","driver":"none"}', "-msg", "timestamp=on")
    listener.close()
    assert (cfg.machine, cfg.accel, cfg.cpu, cfg.memory) == ("microvm", "kvm", "host", 256 << 20)
    assert cfg.memory_backend == "microvm.ram" and cfg.no_shutdown and cfg.start_paused
    # The isa-serial is COM1 on the pty, as -serial chardev:charserial0 would make it.
    assert cfg.extra["serial"] == "chardev:charserial0"
    assert cfg.extra["serial_chardev"] == "charserial0"
    assert [d.driver for d in cfg.devices] == ["virtio-blk-device"]
    names = {d["name"] for d in ask(cfg, "qom-list", path="/machine/peripheral")}
    assert names == {"virtio-disk0", "serial0"}


def run(binary: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / binary), *argv], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.skipif(not (BIN / "kemu-system-x86_64").exists(),
                    reason="the kemu-system-* entry points are not installed (pip install -e .)")
def test_the_entry_points_list_their_own_boards_and_name_themselves_in_errors():
    assert run("kemu-system-x86_64", "-M", "help").stdout.split("\n")[1:-1] == [
        "microvm              microvm (x86-64, KVM)", "none                 empty machine"]
    assert "microvm" not in run("kemu-system-aarch64", "-M", "help").stdout
    proc = run("kemu-system-x86_64", "-M", "virt", "-kernel", "/k")
    assert proc.returncode == 2
    assert proc.stderr.startswith("kemu-system-x86_64: -M virt: unsupported machine type")
    assert run("kemu-system-x86_64", "-cpu", "help").stdout.split() == [
        "Available", "CPUs:", "host", "max"]
