"""The QMP command table over a stand-in for kemu.api.Machine (no guest)."""

import pytest

from kemu.api import MachineStateError
from kemu.errors import ConfigError
from kemu.machines.config import MachineConfig
from kemu.qmp.commands import Commands
from kemu.qmp.protocol import QmpError, QmpSession
from kemu.qmp.server import QmpAddress, parse_qmp_option


class FakeVm:
    def __init__(self):
        self.state = "running"
        self.has_run = True
        self.config = MachineConfig(name="fake")
        self.calls = []

    def pause(self):
        self.calls.append("pause")
        self.state = "paused"

    def resume(self):
        self.calls.append("resume")
        self.state = "running"

    def stop(self):
        self.calls.append("stop")

    def reset(self):
        self.calls.append("reset")

    def powerdown(self):
        self.calls.append("powerdown")

    def reset_fails(self):
        raise MachineStateError("reset: the machine has shut down")

    def registers(self):
        return {"x0": 1, "pc": 0x40080000}

    def vcpu_thread_ids(self):
        return [4242]

    def memory_map(self):
        return [(0x40000000, 256 << 20, "ram"), (0x09000000, 0x1000, "pl011")]


def negotiated(vm):
    commands = Commands(vm)
    session = QmpSession(commands, commands.names)
    session.feed(b'{"execute": "qmp_capabilities"}')
    return session


def run(session, line):
    [response] = session.feed(line.encode())
    return response.data


def test_status_stop_cont():
    vm = FakeVm()
    s = negotiated(vm)
    assert run(s, '{"execute": "query-status"}') == {
        "return": {"running": True, "singlestep": False, "status": "running"}}
    assert run(s, '{"execute": "stop"}') == {"return": {}}
    assert run(s, '{"execute": "query-status"}')["return"]["status"] == "paused"
    assert run(s, '{"execute": "cont", "id": 7}') == {"return": {}, "id": 7}
    vm.state, vm.has_run = "paused", False
    assert run(s, '{"execute": "query-status"}')["return"]["status"] == "prelaunch"
    assert vm.calls == ["pause", "resume"]


def test_machine_errors_become_command_errors():
    vm = FakeVm()
    vm.reset = vm.reset_fails
    s = negotiated(vm)
    assert run(s, '{"execute": "system_reset"}') == {"error": {
        "class": "GenericError", "desc": "reset: the machine has shut down"}}


def test_system_powerdown_is_a_button_press_that_always_succeeds():
    vm = FakeVm()
    s = negotiated(vm)
    assert run(s, '{"execute": "system_powerdown"}') == {"return": {}}
    assert vm.calls == ["powerdown"]


def test_argument_checks():
    s = negotiated(FakeVm())
    assert run(s, '{"execute": "stop", "arguments": {"x": 1}}')["error"]["desc"] == \
        "Parameter 'x' is unexpected"
    assert run(s, '{"execute": "human-monitor-command", "arguments": {"command-line": 5}}')[
        "error"]["desc"] == "Invalid parameter type for 'command-line', expected: string"
    assert run(s, '{"execute": "human-monitor-command"}')["error"]["desc"] == \
        "Parameter 'command-line' is missing"
    assert run(s, '{"execute": "human-monitor-command", "arguments": '
                  '{"command-line": "info status", "cpu-index": true}}')["error"]["desc"] == \
        "Invalid parameter type for 'cpu-index', expected: int"


def test_hmp_info():
    s = negotiated(FakeVm())

    def hmp(line):
        return run(s, '{"execute": "human-monitor-command", "arguments": '
                      f'{{"command-line": "{line}"}}}}')["return"]
    assert hmp("info  status") == "VM status: running\r\n"
    assert "PC=0000000040080000" in hmp("info registers")
    mtree = hmp("info mtree")
    assert mtree.startswith("address-space: memory\r\n")
    assert "0000000009000000-0000000009000fff (prio 0, i/o): pl011" in mtree
    assert "0000000040000000-000000004fffffff (prio 0, ram): ram" in mtree
    qtree = hmp("info qtree")
    assert 'dev: pl011, id ""' in qtree and "ram" not in qtree
    # As in QEMU, a monitor error is what the monitor prints, not a QMP error.
    assert hmp("info nothing") == "unknown command: 'info nothing'\r\n"
    assert hmp("frobnicate") == "unknown command: 'frobnicate'\r\n"


def test_query_commands_and_name():
    s = negotiated(FakeVm())
    names = {c["name"] for c in run(s, '{"execute": "query-commands"}')["return"]}
    assert {"qmp_capabilities", "system_powerdown", "system_reset", "quit",
            "human-monitor-command", "query-cpus-fast", "query-block"} <= names
    assert run(s, '{"execute": "query-name"}') == {"return": {"name": "fake"}}
    [cpu] = run(s, '{"execute": "query-cpus-fast"}')["return"]
    assert cpu["thread-id"] == 4242 and cpu["cpu-index"] == 0


@pytest.mark.parametrize("text, expected", [
    ("unix:/tmp/q.sock,server=on,wait=off", QmpAddress("unix", path="/tmp/q.sock")),
    ("unix:/tmp/q.sock,server,nowait", QmpAddress("unix", path="/tmp/q.sock")),
    ("unix:/tmp/q.sock,server=on", QmpAddress("unix", path="/tmp/q.sock", wait=True)),
    ("tcp::4444,server=on,wait=off", QmpAddress("tcp", host="127.0.0.1", port=4444)),
    ("tcp:0.0.0.0:4444,server,nowait", QmpAddress("tcp", host="0.0.0.0", port=4444)),
    ("tcp:[::1]:4444,server=on,wait=off", QmpAddress("tcp", host="::1", port=4444)),
    # without server=on, QEMU connects out: a client chardev
    ("unix:/tmp/q.sock", QmpAddress("unix", path="/tmp/q.sock", server=False)),
    ("unix:/tmp/q.sock,server=off", QmpAddress("unix", path="/tmp/q.sock", server=False)),
])
def test_parse_qmp_option(text, expected):
    assert parse_qmp_option(text) == expected


@pytest.mark.parametrize("text", [
    "unix:,server=on", "tcp:localhost:http,server=on", "tcp::70000,server=on",
    "unix:/x,server=on,wait=maybe", "unix:/x,telnet=on", "stdio",
])
def test_parse_qmp_option_refuses(text):
    with pytest.raises(ConfigError):
        parse_qmp_option(text)


def test_a_failing_command_is_an_error_reply():
    vm = FakeVm()
    vm.registers = lambda: 1 / 0
    s = negotiated(vm)
    r = run(s, '{"execute": "human-monitor-command", "arguments": '
               '{"command-line": "info registers"}, "id": 3}')
    assert r["id"] == 3 and "ZeroDivisionError" in r["error"]["desc"]
    assert "return" in run(s, '{"execute": "query-status"}')


def test_cpus_and_block_describe_the_machine(tmp_path):
    from kemu.backends.qcow2 import create_qcow2
    from kemu.machines.config import DriveConfig
    vm = FakeVm()
    vm.config.machine = "microvm"
    vm.vcpu_thread_ids = lambda: [11, 12]
    image = tmp_path / "d.qcow2"
    create_qcow2(image, 1 << 20)
    vm.config.drives = [DriveConfig(image), DriveConfig(tmp_path / "r.img", "raw", True, "r")]
    s = negotiated(vm)
    cpus = run(s, '{"execute": "query-cpus-fast"}')["return"]
    assert [(c["cpu-index"], c["thread-id"], c["target"]) for c in cpus] == [
        (0, 11, "x86_64"), (1, 12, "x86_64")]
    block = run(s, '{"execute": "query-block"}')["return"]
    assert [(b["device"], b["inserted"]["drv"], b["inserted"]["ro"]) for b in block] == [
        ("virtio0", "qcow2", False), ("r", "raw", True)]


def test_status_io_error_and_block_io_error_event():
    """A machine paused by a disk's werror policy says io-error, as QEMU; its
    BLOCK_IO_ERROR event carries QEMU's fields."""
    from kemu.api import BlockIOError
    vm = FakeVm()
    vm.state, vm.io_error = "paused", True
    session = negotiated(vm)
    assert run(session, '{"execute": "query-status"}')["return"]["status"] == "io-error"
    event = BlockIOError(device="virtio0", node_name="#block000", operation="write",
                         action="stop", nospace=True, reason="No space left on device")
    assert event.qmp_data() == {"device": "virtio0", "node-name": "#block000",
                                "operation": "write", "action": "stop", "nospace": True,
                                "reason": "No space left on device"}
    run(session, '{"execute": "cont"}')
    assert vm.calls == ["resume"]


def test_block_resize_errors_are_one_line():
    from pathlib import Path
    from kemu.machines.config import DriveConfig
    vm = FakeVm()
    vm.config.drives.append(DriveConfig(Path("/nonexistent.img"), "raw", False, "d0"))
    vm.virtio_devices = lambda: []
    qmp = Commands(vm)
    for args, why in [({"size": 1 << 20}, "exactly one of 'device' and 'node-name'"),
                      ({"device": "d0", "node-name": "n", "size": 512}, "exactly one"),
                      ({"device": "d0"}, "Parameter 'size' is missing"),
                      ({"device": "d0", "size": -1}, "expects a >0 size"),
                      ({"device": "nope", "size": 512}, "Cannot find device='nope'"),
                      ({"device": "d0", "size": 512}, "no virtio-blk device uses 'd0'")]:
        with pytest.raises(QmpError) as e:
            qmp("block_resize", args)
        assert why in str(e.value) and "\n" not in str(e.value)
