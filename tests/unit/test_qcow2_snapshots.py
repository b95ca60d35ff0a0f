"""kemu img snapshot -l: the internal snapshots of a qcow2 image, listed as qemu-img lists them."""

import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                reason="qemu-img is not installed (apt-get install qemu-utils)")

KEMU = [sys.executable, "-m", "kemu.cli", "img"]


def run(*args):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60)


def test_snapshots_made_by_qemu_img_are_listed_as_qemu_img_lists_them(tmp_path):
    image = tmp_path / "d.qcow2"
    assert run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M").returncode == 0
    assert run(*KEMU, "snapshot", "-l", str(image)).stdout == ""      # none yet
    for name in ("first", "the second one"):
        assert run("qemu-img", "snapshot", "-c", name, str(image)).returncode == 0
    ours = run(*KEMU, "snapshot", "-l", str(image))
    theirs = run("qemu-img", "snapshot", "-l", str(image))
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout
    assert "the second one" in ours.stdout


def test_snapshot_refusals_are_one_line(tmp_path):
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(1 << 20))
    r = run(*KEMU, "snapshot", "-l", "-f", "raw", str(raw))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    r = run(*KEMU, "snapshot", "-c", "x", str(raw))
    assert r.returncode == 2 and "only -l" in r.stderr and len(r.stderr.splitlines()) == 1
    bad = tmp_path / "bad.qcow2"
    assert run("qemu-img", "create", "-q", "-f", "qcow2", str(bad), "16M").returncode == 0
    data = bytearray(bad.read_bytes())
    data[60:64] = (3).to_bytes(4, "big")               # nb_snapshots = 3, no table
    data[64:72] = (1 << 40).to_bytes(8, "big")          # snapshots_offset far away
    bad.write_bytes(bytes(data))
    r = run(*KEMU, "snapshot", "-l", str(bad))
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1
