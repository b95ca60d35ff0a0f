"""kemu.options: QEMU's option syntax (keyval and JSON) into one config."""

import pytest

from kemu.errors import ConfigError
from kemu.machines.config import MachineConfig
from kemu.options import device_from_qmp, parse_device, parse_option, parse_qemu_options
from kemu.options.keyval import asks_help, parse_keyval


def test_keyval_implied_key_escape_and_help():
    assert parse_keyval("virt,gic-version=2", "-M", "type") == {"type": "virt",
                                                                 "gic-version": "2"}
    assert parse_keyval("type=virt", "-M", "type") == {"type": "virt"}
    assert parse_keyval("file=a,,b,id=x", "-drive") == {"file": "a,b", "id": "x"}
    assert asks_help("virtio-blk-device,help") and asks_help("?") and not asks_help("x")
    assert not asks_help('{"driver":"help"}')
    with pytest.raises(ConfigError, match="Invalid parameter 'bare'"):
        parse_keyval("virt,bare", "-M", "type")


def test_json_and_keyval_give_the_same_props():
    keyval = parse_option("virtio-blk-device,drive=d0,bootindex=1,share-rw=off", "-device",
                          "driver")
    json_form = parse_option('{"driver":"virtio-blk-device","drive":"d0","bootindex":1,'
                             '"share-rw":false}', "-device", "driver")
    assert keyval == json_form
    nested = parse_option('{"driver":"qcow2","node-name":"f","file":{"driver":"file",'
                          '"filename":"/i,x"}}', "-blockdev")
    assert nested == {"driver": "qcow2", "node-name": "f", "file.driver": "file",
                      "file.filename": "/i,x"}


@pytest.mark.parametrize("text", ['{"driver":', '["x"]', '{"driver":null}'])
def test_bad_json_is_one_config_error(text):
    with pytest.raises(ConfigError):
        parse_option(text, "-device")


def test_device_from_cli_and_qmp_alike():
    a = parse_device('{"driver":"virtio-net-device","netdev":"n0","id":"net0"}')
    b = parse_device("virtio-net-device,netdev=n0,id=net0")
    c = device_from_qmp({"driver": "virtio-net-device", "netdev": "n0", "id": "net0"})
    assert a == b == c and a.driver == "virtio-net-device" and a.props["id"] == "net0"
    with pytest.raises(ConfigError, match="driver"):
        parse_device('{"id":"x"}')


def test_machine_options_merge_and_type_key():
    cfg = parse_qemu_options(["-machine", "type=virt", "-M", "dumpdtb=/tmp/v.dtb"],
                             MachineConfig())
    assert cfg.machine == "virt" and str(cfg.dumpdtb) == "/tmp/v.dtb"
