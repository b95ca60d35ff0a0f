"""-snapshot: writes go to a temporary qcow2 overlay, the image is untouched
and locked as QEMU 7.2 locks it there; -drive aio= and -rtc on the command line."""

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from kemu.backends.snapshot import open_snapshot
from kemu.options import parse_qemu_options
from kemu.errors import ConfigError
from kemu.machines.config import MachineConfig
from kemu.machines.virtio_devices import open_drive
from kemu.options.drive import parse_drive


def _image(tmp_path: Path, fmt: str) -> Path:
    path = tmp_path / f"disk.{fmt}"
    if fmt == "raw":
        path.write_bytes(os.urandom(1 << 20))
    else:
        from kemu.backends.qcow2.create import create_qcow2
        from kemu.backends.block import open_image
        create_qcow2(path, 1 << 20)
        img = open_image(path, "qcow2")
        img.write(0, os.urandom(65536))
        img.close()
    return path


def _lock_bytes(path: Path) -> set[int]:
    ino = os.stat(path).st_ino
    out = set()
    for line in Path("/proc/locks").read_text().split("\n"):
        f = line.split()
        if len(f) >= 8 and f[5].endswith(f":{ino}"):
            out.add(int(f[6]))
    return out


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_writes_go_to_a_temporary_overlay_and_the_image_is_untouched(tmp_path, monkeypatch, fmt):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = _image(tmp_path, fmt)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    disk = open_snapshot(path, fmt)
    original = path.read_bytes()[:4096] if fmt == "raw" else disk.read(0, 4096)
    assert not os.listdir(tmp_path / "tmp")           # the overlay is already unlinked
    assert disk.read(0, 4096) == original             # reads come from the image
    disk.write(0, b"\xAA" * 4096)
    disk.write(512 << 10, b"\x55" * 512)
    disk.flush()
    assert disk.read(0, 4096) == b"\xAA" * 4096
    assert disk.read(512 << 10, 512) == b"\x55" * 512
    assert _lock_bytes(path) == {100, 201, 203}         # QEMU 7.2 -snapshot, measured
    disk.close()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert _lock_bytes(path) == set()


def test_drive_config_snapshot_and_read_only(tmp_path):
    path = _image(tmp_path, "raw")
    disk = open_drive(parse_drive(f"file={path},format=raw"), snapshot=True)
    assert disk.format == "qcow2" and not disk.read_only
    disk.close()
    ro = open_drive(parse_drive(f"file={path},format=raw,readonly=on"), snapshot=True)
    assert ro.read_only and _lock_bytes(path) == {100, 201}   # a plain read-only open
    ro.close()
    assert parse_drive(f"file={path},snapshot=on").snapshot


def test_snapshot_rtc_and_aio_options_parse():
    cfg = parse_qemu_options(["-snapshot", "-rtc", "base=localtime,clock=vm",
                              "-drive", "file=a.img,format=raw,aio=io_uring",
                              "-drive", "file=b.img,cache=none,aio=native"], MachineConfig())
    assert cfg.snapshot and (cfg.rtc.base, cfg.rtc.clock) == ("localtime", "vm")
    assert [d.aio for d in cfg.drives] == ["io_uring", "native"]
    assert parse_qemu_options([], MachineConfig()).rtc.base == "utc"
    with pytest.raises(ConfigError, match="requires cache.direct=on"):
        parse_drive("file=a.img,aio=native")
    with pytest.raises(ConfigError, match="aio=posix"):
        parse_drive("file=a.img,aio=posix")
    with pytest.raises(ConfigError, match="clock=guest"):
        parse_qemu_options(["-rtc", "clock=guest"], MachineConfig())
