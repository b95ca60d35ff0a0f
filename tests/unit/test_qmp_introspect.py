"""QMP introspection tells the truth (issue 13): every answer comes from the table
that drives kemu, and whatever it offers, kemu then accepts."""

import dataclasses
import inspect
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from kemu import api
from kemu.machines.config import DeviceConfig, MachineConfig
from kemu.options import parse_qemu_options
from kemu.qmp.commands import Commands
from kemu.qmp.introspect import EVENTS
from kemu.qmp.protocol import QmpSession

KEMU = [sys.executable, "-m", "kemu.cli"]


class Vm:
    state, has_run = "running", True

    def __init__(self, config=None):
        from kemu.migration import Migration
        self.config = config or MachineConfig()
        self.migration = Migration(self)

    def virtio_devices(self):
        return []

    def stop(self):
        pass


def session(vm=None):
    commands = Commands(vm or Vm())
    s = QmpSession(commands, commands.names)
    s.feed(b'{"execute": "qmp_capabilities"}')
    return s


def ask(s, name, **args):
    [r] = s.feed(json.dumps({"execute": name, "arguments": args}).encode())
    return r.data.get("return", r.data.get("error"))


def test_schema_lists_every_command_and_event_with_its_arguments():
    s = session()
    schema = {e["name"]: e for e in ask(s, "query-qmp-schema")}
    commands = {e["name"] for e in schema.values() if e["meta-type"] == "command"}
    assert commands == {c["name"] for c in ask(s, "query-commands")}
    hmp = schema[schema["human-monitor-command"]["arg-type"]]
    assert [m["name"] for m in hmp["members"]] == ["command-line", "cpu-index"]
    assert "json-cli" in schema["device_add"]["features"]
    events = {e["name"] for e in schema.values() if e["meta-type"] == "event"}
    assert events == set(EVENTS)
    # every type named is defined
    for entry in schema.values():
        for key in ("arg-type", "ret-type"):
            if key in entry:
                assert entry[key] in schema, entry


def test_every_event_kemu_sends_is_in_the_schema():
    names = {"Stop": "STOP", "Resume": "RESUME", "Powerdown": "POWERDOWN", "Reset": "RESET",
             "Shutdown": "SHUTDOWN", "GuestPanicked": "GUEST_PANICKED",
             "BlockIOError": "BLOCK_IO_ERROR", "MigrationStatus": "MIGRATION",
             "MigrationPass": "MIGRATION_PASS", "DumpCompleted": "DUMP_COMPLETED",
                 "JobStatusChange": "JOB_STATUS_CHANGE",
             "VncEvent": ("VNC_CONNECTED", "VNC_INITIALIZED", "VNC_DISCONNECTED")}
    sent = set()
    for _, c in inspect.getmembers(api, inspect.isclass):
        if issubclass(c, api.Event) and c is not api.Event:
            name = names[c.__name__]
            sent |= {name} if isinstance(name, str) else set(name)
    assert sent == set(EVENTS)
    shutdown = {f.name for f in dataclasses.fields(api.Shutdown)} - {"timestamp", "status"}
    assert shutdown == set(EVENTS["SHUTDOWN"])


def test_the_machines_offered_are_the_machines_accepted():
    s = session()
    machines = ask(s, "query-machines")
    assert {m["name"]: m.get("alias") for m in machines} == {"virt-7.2": "virt", "none": None}
    for m in machines:
        for name in (m["name"], m.get("alias")):
            if name:
                assert parse_qemu_options(["-M", name], MachineConfig()).machine in (
                    "virt", "none")
        props = ask(s, "qom-list-properties", typename=f"{m['name']}-machine")
        for p in props:
            if p["name"] == "memory-backend":
                parse_qemu_options(["-object", "memory-backend-ram,id=r0,size=128M",
                                    "-M", f"{m['name']},memory-backend=r0"], MachineConfig())


def test_types_devices_and_cpus_are_kemus_own():
    from kemu.accel.tcg.aarch64 import CPU_MODELS
    from kemu.listings import DEVICE_PROPERTIES
    s = session()
    types = {t["name"] for t in ask(s, "qom-list-types")}
    assert set(DEVICE_PROPERTIES) <= types and "tcg-accel" in types
    assert "kvm-accel" not in types and "virtio-blk-pci" not in types
    assert {c["name"] for c in ask(s, "query-cpu-definitions")} == set(CPU_MODELS)
    props = {p["name"] for p in ask(s, "device-list-properties",
                                    typename="virtio-net-device")}
    assert props == {"mac", "mrg_rxbuf", "netdev"}
    assert ask(s, "device-list-properties", typename="virtio-blk-pci")["class"] == \
        "DeviceNotFound"
    assert ask(s, "qom-list-properties", typename="nope")["class"] == "DeviceNotFound"
    assert {p["name"] for p in ask(s, "qom-list-properties", typename="memory-backend-file")
            } >= {"size", "share", "mem-path"}
    assert ask(s, "query-target") == {"arch": "aarch64"}
    assert ask(s, "query-kvm") == {"enabled": False, "present": False}
    assert ask(s, "query-gic-capabilities") == [{"version": v, "emulated": True,
                                                 "kernel": False} for v in (2, 3)]
    assert ask(s, "query-tpm-models") == [] == ask(s, "query-tpm-types")


def test_command_line_options_offered_are_accepted():
    s = session()
    options = {o["option"]: [p["name"] for p in o["parameters"]]
               for o in ask(s, "query-command-line-options")}
    assert "sandbox" not in options            # kemu has no seccomp sandbox
    assert "mem-lock" in options["overcommit"] and "fd" in options["chardev"]


def test_migrate_capabilities_events_and_x_checksum():
    s = session()
    assert ask(s, "query-migrate-capabilities") == [{"capability": "events", "state": False},
                                                    {"capability": "x-checksum", "state": False}]
    assert ask(s, "migrate-set-capabilities",
               capabilities=[{"capability": "events", "state": True}]) == {}
    assert {"capability": "events", "state": True} in ask(s, "query-migrate-capabilities")
    assert "xbzrle" in ask(s, "migrate-set-capabilities",
                           capabilities=[{"capability": "xbzrle", "state": True}])["desc"]


def test_block_chardev_and_peripherals_in_qemus_shape(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * (2 << 20))
    cfg = parse_qemu_options([
        "-blockdev", f"driver=file,filename={disk},node-name=s0",
        "-blockdev", "driver=raw,file=s0,node-name=f0",
        "-device", "virtio-blk-device,drive=f0,id=disk0",
        "-chardev", "pty,id=ser0", "-serial", "chardev:ser0"], MachineConfig())
    cfg.extra["chardev_filenames"] = {"ser0": "pty:/dev/pts/9"}
    s = session(Vm(cfg))
    [block] = ask(s, "query-block")
    assert (block["device"], block["qdev"]) == ("", "/machine/peripheral/disk0/virtio-backend")
    assert block["inserted"]["node-name"] == "f0"
    assert block["inserted"]["image"]["virtual-size"] == 2 << 20
    [stats] = ask(s, "query-blockstats")
    assert stats["qdev"] == block["qdev"] and stats["stats"]["wr_operations"] == 0
    assert [n["node-name"] for n in ask(s, "query-named-block-nodes", flat=True)] == ["f0"]
    assert ask(s, "query-chardev") == [{"label": "ser0", "filename": "pty:/dev/pts/9",
                                        "frontend-open": True}]
    assert ask(s, "qom-list", path="/machine/peripheral") == [
        {"name": "disk0", "type": "child<virtio-blk-device>"}]
    assert ask(s, "query-iothreads") == []
    # device_add parses as -device does, then says the bus takes no hot-plug.
    assert "hotplugging" in ask(s, "device_add", driver="virtio-rng-device", id="r")["desc"]
    assert "not a valid device model" in ask(s, "device_add", driver="e1000")["desc"]
    assert ask(s, "object-add", **{"qom-type": "secret", "id": "s1", "data": "x"}) == {}
    assert "s1" in cfg.objects and ask(s, "object-del", id="s1") == {}
    assert "qom-type" in ask(s, "object-add", **{"qom-type": "nope", "id": "n"})["desc"]
    assert ask(s, "blockdev-del", **{"node-name": "s0"})["desc"].startswith("Node 's0' is busy")


def test_the_probe_daemonizes_in_qemus_order(tmp_path):
    """libvirt's probe: the parent exits only once the pidfile and QMP socket exist."""
    sock, pidfile = tmp_path / "p.sock", tmp_path / "p.pid"
    proc = subprocess.run(KEMU + ["-S", "-no-user-config", "-nodefaults", "-nographic",
                                  "-machine", "none,accel=kvm:tcg", "-qmp",
                                  f"unix:{sock},server=on,wait=off", "-pidfile", str(pidfile),
                                  "-daemonize"], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert sock.exists() and pidfile.exists()       # at once, as the parent exited
    pid = int(pidfile.read_text())
    try:
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(sock))
        f = c.makefile("rwb")
        assert b"QMP" in f.readline()
        for cmd in ("qmp_capabilities", "query-status", "quit"):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            reply = json.loads(f.readline())
            while "event" in reply:
                reply = json.loads(f.readline())
            if cmd == "query-status":
                assert reply["return"]["status"] == "prelaunch"
        c.close()
        # quit: the daemon ends and removes its pidfile (waited for, not timed)
        while _alive(pid):
            time.sleep(0.05)
        assert not pidfile.exists()
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    """The daemon (not our child: it was reparented) still runs (a zombie has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_device_config_from_json_equals_keyval():
    from kemu.options import parse_device
    assert parse_device('{"driver":"virtio-rng-device","id":"r"}') == DeviceConfig(
        "virtio-rng-device", {"id": "r"})


@pytest.mark.parametrize("path", ["/machine/nothing", "/x"])
def test_qom_list_unknown_path(path):
    assert ask(session(), "qom-list", path=path)["class"] == "DeviceNotFound"
