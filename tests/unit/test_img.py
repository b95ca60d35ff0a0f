"""``kemu img``: command lines, output and exit statuses, compared with
qemu-img where it is installed (Debian package qemu-utils)."""

from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from kemu import img as kemu_img
from kemu.backends.qcow2 import Qcow2Image, create_qcow2

QEMU_IMG = shutil.which("qemu-img")
needs_qemu_img = pytest.mark.skipif(
    QEMU_IMG is None, reason="qemu-img is not on PATH (install the Debian package qemu-utils)")
MiB = 1 << 20


def run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = kemu_img.main([str(a) for a in argv], stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def qemu(*argv, ok=(0,)) -> subprocess.CompletedProcess:
    r = subprocess.run([QEMU_IMG, *map(str, argv)], capture_output=True, text=True, timeout=60)
    assert r.returncode in ok, r
    return r


@pytest.mark.parametrize("text,value", [("512", 512), ("64M", 64 * MiB), ("1G", 1 << 30),
                                        ("1.5G", 3 << 29), ("4k", 4096), ("2T", 2 << 40),
                                        ("100b", 100)])
def test_parse_size(text, value):
    assert kemu_img.parse_size(text) == value


@pytest.mark.parametrize("value,text", [(0, "0 B"), (512, "512 B"), (196608, "192 KiB"),
                                        (64 * MiB, "64 MiB"), (3 << 29, "1.5 GiB"),
                                        (1000 * 1024, "0.977 MiB")])
def test_size_to_str(value, text):
    assert kemu_img.size_to_str(value) == text


def test_create_info_check(tmp_path):
    path = tmp_path / "a.qcow2"
    status, out, err = run("create", "-f", "qcow2", path, "64M")
    assert status == 0 and out.startswith(f"Formatting '{path}', fmt=qcow2") and not err
    status, out, _ = run("info", path)
    assert status == 0
    assert "file format: qcow2" in out and "virtual size: 64 MiB (67108864 bytes)" in out
    assert "cluster_size: 65536" in out
    status, out, _ = run("info", "--output=json", path)
    info = json.loads(out)
    assert info["virtual-size"] == 64 * MiB and info["format"] == "qcow2"
    assert info["cluster-size"] == 65536 and info["dirty-flag"] is False
    status, out, _ = run("check", path)
    assert status == 0 and "No errors were found on the image." in out
    raw = tmp_path / "a.raw"
    assert run("create", raw, "1M")[0] == 0
    assert raw.stat().st_size == MiB
    assert run("check", raw)[0] == 63


def test_create_options_and_backing(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"b" * 3 * MiB)
    top = tmp_path / "top.qcow2"
    status, _, err = run("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                         "-o", "cluster_size=4k,compat=0.10", top)
    assert status == 0, err
    with Qcow2Image.open(top, read_only=True) as image:
        assert image.size == 3 * MiB and image.cluster_size == 4096 and image.version == 2
        assert image.header.backing_file == "base.raw"
        assert image.read(0, 4) == b"bbbb"
    status, _, err = run("create", "-f", "qcow2", "-b", "base.raw", tmp_path / "p.qcow2")
    assert status == 0 and "probed raw" in err
    status, out, _ = run("info", "--output=json", top)
    info = json.loads(out)
    assert info["backing-filename"] == "base.raw"
    assert info["full-backing-filename"] == str(tmp_path / "base.raw")
    assert info["backing-filename-format"] == "raw"


def test_info_without_the_backing_file(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    top = tmp_path / "top.qcow2"
    create_qcow2(top, MiB, backing_file="base.raw", backing_format="raw")
    base.unlink()
    status, out, _ = run("info", top)
    assert status == 0 and "backing file: base.raw" in out
    status, _, err = run("convert", top, tmp_path / "x.raw")
    assert status == 2 and "could not open backing file" in err


@pytest.mark.parametrize("argv,message", [
    (["info", "/nonexistent/x.qcow2"], "No such file"),
    (["create", "-f", "qcow2", "X", "12Q"], "invalid size"),
    (["create", "-f", "qcow2", "X"], "size must be specified"),
    (["create", "-f", "vmdk", "X", "1M"], "unknown image format"),
    (["create", "-f", "qcow2", "-o", "cluster_size=1000", "X", "1M"], "cluster size"),
    (["create", "-f", "qcow2", "-o", "bogus=1", "X", "1M"], "invalid parameter"),
    (["create", "-f", "qcow2", "-b", "nothere.raw", "-F", "raw", "X"], "No such file"),
    (["convert", "/nonexistent/a", "b"], "No such file"),
    (["frobnicate"], "invalid choice"),
    (["info"], "required"),
])
def test_errors_are_one_line(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    status, out, err = run(*argv)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("kemu img: ") and message in err, err
    assert "Traceback" not in err


def test_help_exits_zero(capsys):
    assert kemu_img.main(["--help"]) == 0
    assert "convert" in capsys.readouterr().out


def _patterned(size: int) -> bytes:
    rnd = random.Random(4)
    blocks = [rnd.randbytes(65536) if rnd.random() < 0.3 else
              bytes(65536) if rnd.random() < 0.6 else b"ab" * 32768
              for _ in range(size // 65536)]
    return b"".join(blocks)


def test_convert_round_trip(tmp_path):
    data = _patterned(4 * MiB)
    raw = tmp_path / "src.raw"
    raw.write_bytes(data)
    q = tmp_path / "out.qcow2"
    status, _, err = run("convert", "-f", "raw", "-O", "qcow2", "-p", raw, q)
    assert status == 0 and "100%" in err
    back = tmp_path / "back.raw"
    assert run("convert", "-O", "raw", q, back)[0] == 0
    assert back.read_bytes() == data
    assert back.stat().st_blocks * 512 < len(data)      # zero runs left sparse
    small = tmp_path / "small.qcow2"
    assert run("convert", "-c", "-O", "qcow2", raw, small)[0] == 0
    assert small.stat().st_size < q.stat().st_size
    with Qcow2Image.open(small, read_only=True) as image:
        assert image.read(0, len(data)) == data
    assert run("check", small)[0] == 0


def test_convert_flattens_backing_chain(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"B" * MiB)
    top = tmp_path / "top.qcow2"
    create_qcow2(top, MiB, backing_file="base.raw", backing_format="raw")
    with Qcow2Image.open(top) as image:
        image.write(1000, b"T" * 1000)
    flat = tmp_path / "flat.raw"
    assert run("convert", "-f", "qcow2", top, flat)[0] == 0
    assert flat.read_bytes() == b"B" * 1000 + b"T" * 1000 + b"B" * (MiB - 2000)
    assert run("convert", top, top)[0] == 2


def test_check_exit_statuses(tmp_path):
    path = tmp_path / "a.qcow2"
    create_qcow2(path, MiB)
    with Qcow2Image.open(path) as image:
        image.write(0, b"x" * 200_000)
        cluster = image.refcounts.alloc(1)           # a leak
        image.file.pwrite(cluster * 65536, bytes(65536))
    status, out, _ = run("check", path)
    assert status == 3 and "1 leaked clusters were found" in out
    status, out, _ = run("check", "--output=json", path)
    assert status == 3 and json.loads(out)["leaks"] == 1
    with Qcow2Image.open(path) as image:              # drop a referenced cluster's refcount
        rc = image.refcounts
        host = (image.map.entry(0) & 0x00FFFFFFFFFFFE00) >> 16
        rc._block(host >> rc.block_bits).set(host & ((1 << rc.block_bits) - 1), 0)
    status, out, _ = run("check", path)
    assert status == 2 and "ERROR" in out


@needs_qemu_img
def test_output_matches_qemu_img(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("base.raw").write_bytes(_patterned(2 * MiB))
    qemu("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "over.qcow2")
    qemu("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", "v2.qcow2", "1G")
    assert run("convert", "-c", "-O", "qcow2", "base.raw", "c.qcow2")[0] == 0
    for name in ("over.qcow2", "v2.qcow2", "c.qcow2", "base.raw"):
        for extra in ([], ["--output=json"]):
            ours = run("info", *extra, name)
            theirs = qemu("info", *extra, name)
            assert ours[1] == theirs.stdout, (name, extra)
    for name in ("c.qcow2", "over.qcow2"):
        for extra in ([], ["--output=json"]):
            assert run("check", *extra, name)[1] == qemu("check", *extra, name).stdout
    qemu("compare", "c.qcow2", "base.raw")


@needs_qemu_img
def test_qemu_reads_kemu_converted_images(tmp_path):
    data = _patterned(3 * MiB)
    raw = tmp_path / "src.raw"
    raw.write_bytes(data)
    for opts in ([], ["-c"], ["-o", "cluster_size=512,refcount_bits=8"]):
        out = tmp_path / "o.qcow2"
        assert run("convert", "-O", "qcow2", *opts, raw, out)[0] == 0
        qemu("check", out)
        qemu("compare", "-f", "qcow2", "-F", "raw", out, raw)
