"""qcow2: kemu's reader/writer against a byte model and against qemu-img.

Interop tests need ``qemu-img`` (and ``qemu-io``), from the Debian package
qemu-utils; they are skipped with that reason when it is missing.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kemu.backends.block import ImageError, open_image
from kemu.backends.qcow2 import Qcow2Image, check_qcow2, create_qcow2
from kemu.backends.qcow2 import io as qio
from kemu.backends.qcow2.header import OFF_INCOMPAT

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
needs_qemu_img = pytest.mark.skipif(
    QEMU_IMG is None, reason="qemu-img is not on PATH (install the Debian package qemu-utils)")
needs_qemu_io = pytest.mark.skipif(
    QEMU_IO is None, reason="qemu-io is not on PATH (install the Debian package qemu-utils)")

MiB = 1 << 20


def qemu_img(*args: str | Path, ok=(0,)) -> subprocess.CompletedProcess:
    r = subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True, timeout=60)
    assert r.returncode in ok, (args, r.returncode, r.stdout, r.stderr)
    return r


def qemu_io(image: Path, *commands: str, fmt: str = "qcow2") -> None:
    argv = [QEMU_IO, "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    r = subprocess.run(argv + [str(image)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "error" not in r.stdout.lower(), (r.stdout, r.stderr)


def assert_qemu_clean(path: Path, allow_leaks: bool = False) -> None:
    r = qemu_img("check", "-f", "qcow2", path, ok=(0, 3) if allow_leaks else (0,))
    assert "ERROR" not in r.stdout + r.stderr


def assert_same_as(path: Path, expected: bytes, tmp_path: Path) -> None:
    ref = tmp_path / "expected.raw"
    ref.write_bytes(expected)
    r = qemu_img("compare", "-f", "qcow2", "-F", "raw", path, ref, ok=(0, 1))
    assert r.returncode == 0, r.stdout


def assert_clean_and_equal(path: Path, expected: bytes, tmp_path: Path) -> None:
    """kemu's check finds neither corruption nor leaks; with qemu-img, neither does
    qemu-img check, and the image compares equal to ``expected``."""
    result = check_qcow2(path)
    assert (result.corruptions, result.leaks) == (0, 0), result.messages[:5]
    if QEMU_IMG:
        assert_qemu_clean(path)
        assert_same_as(path, expected, tmp_path)


def random_writes(img, model: bytearray, rnd: random.Random, count: int, max_len: int) -> None:
    for _ in range(count):
        off = rnd.randrange(len(model))
        n = min(rnd.randrange(1, max_len), len(model) - off)
        data = rnd.randbytes(n)
        img.write(off, data)
        model[off:off + n] = data


def discard(img, model: bytearray, offset: int, length: int) -> None:
    """Discard, and zero the whole clusters of the range in the model (the
    image has no backing file; partial clusters keep their data)."""
    img.discard(offset, length)
    cs = img.cluster_size
    first, last = -(-offset // cs) * cs, (offset + length) // cs * cs
    if last > first:
        model[first:last] = bytes(last - first)


# -- kemu alone --------------------------------------------------------------------------------


def test_new_image_reads_zero_and_round_trips(tmp_path):
    path = tmp_path / "a.qcow2"
    create_qcow2(path, 4 * MiB)
    img = open_image(path)
    assert isinstance(img, Qcow2Image) and img.size == 4 * MiB
    assert img.read(0, 4 * MiB) == bytes(4 * MiB)
    model = bytearray(4 * MiB)
    random_writes(img, model, random.Random(1), 200, 150_000)
    assert img.read(0, len(model)) == model
    img.close()
    with Qcow2Image.open(path, read_only=True) as again:
        assert again.read(0, len(model)) == model
    assert check_qcow2(path).exit_status == 0


@pytest.mark.parametrize("cluster_size", [512, 4096, 2 * MiB])
@pytest.mark.parametrize("refcount_bits", [1, 8, 16, 64])
def test_cluster_sizes_and_refcount_widths(tmp_path, cluster_size, refcount_bits):
    path = tmp_path / "a.qcow2"
    size = 4 * MiB
    create_qcow2(path, size, cluster_size=cluster_size, refcount_bits=refcount_bits)
    model = bytearray(size)
    with Qcow2Image.open(path) as img:
        random_writes(img, model, random.Random(cluster_size ^ refcount_bits), 40, 70_000)
        discard(img, model, MiB - 1000, MiB + 2000)
        random_writes(img, model, random.Random(7), 10, 70_000)
        assert img.read(0, size) == model
    assert_clean_and_equal(path, bytes(model), tmp_path)


def test_refcount_table_grows(tmp_path):
    # 512-byte clusters, 16-bit refcounts: one refcount table cluster covers
    # 64 blocks of 256 clusters = 8 MiB of file; write past that
    path = tmp_path / "a.qcow2"
    create_qcow2(path, 16 * MiB, cluster_size=512)
    data = random.Random(3).randbytes(10 * MiB)
    with Qcow2Image.open(path) as img:
        old_table = img.refcounts.table_offset
        img.write(0, data)
        img.flush()
        assert img.refcounts.table_offset != old_table
        assert img.refcounts.table_clusters > 1
        assert img.read(0, len(data)) == data
    assert_clean_and_equal(path, data + bytes(6 * MiB), tmp_path)


def test_version2_image_written(tmp_path):
    path = tmp_path / "v2.qcow2"
    create_qcow2(path, 2 * MiB, version=2)
    model = bytearray(2 * MiB)
    with Qcow2Image.open(path) as img:
        assert img.version == 2
        random_writes(img, model, random.Random(5), 30, 50_000)
        img.write_zeroes(0, 300_000)          # v2 has no zero flag: real zeros
        model[0:300_000] = bytes(300_000)
        discard(img, model, 512 * 1024, 256 * 1024)
        assert img.read(0, len(model)) == model
    assert check_qcow2(path).exit_status == 0
    if QEMU_IMG:
        assert_qemu_clean(path)
        assert_same_as(path, bytes(model), tmp_path)


def test_zero_clusters_and_discard_v3(tmp_path):
    path = tmp_path / "a.qcow2"
    create_qcow2(path, 2 * MiB, cluster_size=65536)
    with Qcow2Image.open(path) as img:
        img.write(0, b"\xaa" * (2 * MiB))
        img.write_zeroes(65536, 3 * 65536 + 100)      # 3 whole clusters + a partial one
        img.discard(10 * 65536, 2 * 65536)
        img.flush()
        expected = bytearray(b"\xaa" * (2 * MiB))
        expected[65536:4 * 65536 + 100] = bytes(3 * 65536 + 100)
        expected[10 * 65536:12 * 65536] = bytes(2 * 65536)
        assert img.read(0, 2 * MiB) == expected
        # the freed clusters get reused after the flush
        end = img.file.size
        img.write(20 * 65536, b"\x55" * 65536)
        img.flush()
        assert img.file.size == end
        expected[20 * 65536:21 * 65536] = b"\x55" * 65536
    assert_clean_and_equal(path, bytes(expected), tmp_path)


def test_compressed_write_and_overwrite(tmp_path):
    path = tmp_path / "a.qcow2"
    cs = 65536
    create_qcow2(path, 16 * cs)
    rnd = random.Random(9)
    model = bytearray(16 * cs)
    with Qcow2Image.open(path) as img:
        for i in range(16):
            data = bytes([i]) * 1000 + rnd.randbytes(50) + bytes(cs - 1050)
            img.write_compressed(i * cs, data)
            model[i * cs:(i + 1) * cs] = data
        img.flush()
        assert img.read(0, len(model)) == model
        assert img.file.size < 6 * cs        # metadata, one L2 table, one shared data cluster
        img.write(3 * cs + 10, b"new")               # COW out of a compressed cluster
        model[3 * cs + 10:3 * cs + 13] = b"new"
        discard(img, model, 5 * cs, cs)
        assert img.read(0, len(model)) == model
    assert_clean_and_equal(path, bytes(model), tmp_path)


def test_backing_chain_copy_on_write(tmp_path):
    base = tmp_path / "base.raw"
    base_data = random.Random(2).randbytes(3 * MiB)
    base.write_bytes(base_data)
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    create_qcow2(mid, 4 * MiB, backing_file="base.raw", backing_format="raw")
    create_qcow2(top, 4 * MiB, backing_file="mid.qcow2", backing_format="qcow2")
    model = bytearray(base_data + bytes(MiB))
    with Qcow2Image.open(mid) as img:
        img.write(100_000, b"M" * 5000)
        model[100_000:105_000] = b"M" * 5000
    with Qcow2Image.open(top) as img:
        assert img.backing.read_only and img.backing.backing.read_only
        assert img.read(0, len(model)) == model
        random_writes(img, model, random.Random(4), 50, 20_000)   # partial clusters: COW
        assert img.read(0, len(model)) == model
    cwd = os.getcwd()
    os.chdir("/")          # relative backing names resolve against the image's directory
    try:
        with Qcow2Image.open(top, read_only=True) as img:
            assert img.read(0, len(model)) == model
    finally:
        os.chdir(cwd)
    assert base.read_bytes() == base_data
    if QEMU_IMG:
        assert_qemu_clean(top)
        assert_same_as(top, bytes(model), tmp_path)


def test_backing_loop_and_missing_backing(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create_qcow2(a, MiB, backing_file="b.qcow2", backing_format="qcow2")
    create_qcow2(b, MiB, backing_file="a.qcow2", backing_format="qcow2")
    with pytest.raises(ImageError, match="loop"):
        Qcow2Image.open(a)
    c = tmp_path / "c.qcow2"
    create_qcow2(c, MiB, backing_file="c.qcow2", backing_format="qcow2")
    with pytest.raises(ImageError, match="loop"):
        open_image(c, read_only=True)
    d = tmp_path / "d.qcow2"
    create_qcow2(d, MiB, backing_file="gone.raw", backing_format="raw")
    with pytest.raises(ImageError, match="backing file.*No such file"):
        Qcow2Image.open(d)


def test_open_restrictions(tmp_path):
    path = tmp_path / "a.qcow2"
    create_qcow2(path, MiB)
    with Qcow2Image.open(path, read_only=True) as img:
        with pytest.raises(ImageError, match="read-only"):
            img.write(0, b"x")
    with Qcow2Image.open(path) as img:
        with pytest.raises(ImageError, match="beyond the end"):
            img.read(MiB - 1, 2)
        with pytest.raises(ImageError, match="beyond the end"):
            img.write(-1, b"x")
    for bit, what in ((1, "dirty"), (2, "corrupt")):
        with open(path, "r+b") as f:
            f.seek(OFF_INCOMPAT)
            f.write(struct.pack(">Q", bit))
        with pytest.raises(ImageError, match=what):
            Qcow2Image.open(path)
        Qcow2Image.open(path, read_only=True).close()
    with open(path, "r+b") as f:
        f.seek(OFF_INCOMPAT)
        f.write(struct.pack(">Q", 1 << 4))
    with pytest.raises(ImageError, match="unsupported qcow2 feature.*extended L2"):
        Qcow2Image.open(path, read_only=True)


# -- crash consistency ------------------------------------------------------------------------


def _logged_run(path: Path, work) -> list:
    """Run ``work(img)`` recording every pwrite and fsync of the image file."""
    log: list = []
    real_pwrite, real_fsync = qio.HostFile.pwrite, qio.HostFile.fsync

    def pwrite(self, offset, data):
        if self.path == path:
            log.append(("w", offset, bytes(data)))
        real_pwrite(self, offset, data)

    def fsync(self):
        if self.path == path:
            log.append(("s",))
        real_fsync(self)

    qio.HostFile.pwrite, qio.HostFile.fsync = pwrite, fsync
    try:
        with Qcow2Image.open(path) as img:
            work(img)
    finally:
        qio.HostFile.pwrite, qio.HostFile.fsync = real_pwrite, real_fsync
    return log


def _replay(initial: bytes, ops: list, target: Path) -> None:
    with open(target, "wb") as f:
        f.write(initial)
        for op in ops:
            if op[0] == "w":
                f.seek(op[1])
                f.write(op[2])


def test_every_crash_point_is_consistent(tmp_path):
    """Cut the write log of a busy session anywhere (a killed process) or
    drop any unsynced writes of the last epoch (power loss): never a
    corruption, only leaks."""
    path = tmp_path / "a.qcow2"
    create_qcow2(path, 8 * MiB, cluster_size=512)     # small clusters: many metadata writes
    initial = path.read_bytes()
    rnd = random.Random(11)
    model = bytearray(8 * MiB)

    def work(img):
        random_writes(img, model, rnd, 30, 40_000)
        img.flush()
        img.discard(0, 2 * MiB)
        random_writes(img, model, rnd, 30, 40_000)
        img.write(7 * MiB, rnd.randbytes(MiB))     # grows the refcount table
        img.flush()

    log = _logged_run(path, work)
    target = tmp_path / "crash.qcow2"
    syncs = [i for i, op in enumerate(log) if op[0] == "s"]
    cuts = sorted(set(range(0, len(log), max(1, len(log) // 60))) | set(syncs) | {len(log)})
    for cut in cuts:
        _replay(initial, log[:cut], target)
        r = check_qcow2(target)
        assert r.corruptions == 0 and r.check_errors == 0, (cut, r.messages[:3])
    # power loss: writes since the last fsync may land in any subset
    for k, s in enumerate(syncs):
        nxt = syncs[k + 1] if k + 1 < len(syncs) else len(log)
        epoch = [op for op in log[s + 1:nxt] if op[0] == "w"]
        for trial in range(3):
            kept = [op for op in epoch if rnd.random() < 0.5]
            _replay(initial, log[:s + 1] + kept, target)
            r = check_qcow2(target)
            assert r.corruptions == 0 and r.check_errors == 0, (s, trial, r.messages[:3])


_KILL_CHILD = textwrap.dedent("""
    import random, sys
    from kemu.backends.qcow2 import Qcow2Image
    path, seed = sys.argv[1], int(sys.argv[2])
    rnd = random.Random(seed)
    img = Qcow2Image.open(path)
    flushed = bytearray(img.size)
    for i in range(40):
        off = rnd.randrange(img.size - 70000)
        data = rnd.randbytes(rnd.randrange(1, 70000))
        img.write(off, data)
        flushed[off:off + len(data)] = data
    img.flush()
    open(path + ".expected", "wb").write(flushed)
    print("flushed", flush=True)
    while True:        # keep allocating, discarding and flushing until killed
        off = rnd.randrange(img.size - 70000)
        img.write(off, rnd.randbytes(rnd.randrange(1, 70000)))
        if rnd.random() < 0.1:
            img.discard(rnd.randrange(img.size // 2), 200000)
        if rnd.random() < 0.2:
            img.flush()
""")


@needs_qemu_img
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_leaves_no_corruption(tmp_path, seed):
    path = tmp_path / "k.qcow2"
    create_qcow2(path, 16 * MiB, cluster_size=4096)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(path), str(seed)],
                             stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline() == b"flushed\n"
        time.sleep(0.05 + 0.1 * seed)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert_qemu_clean(path, allow_leaks=True)
    # writes after the flush may or may not have landed: the image must
    # read back whole, and keep working
    with Qcow2Image.open(path, read_only=True) as img:
        assert len(img.read(0, img.size)) == 16 * MiB
    with Qcow2Image.open(path) as img:
        img.write(0, b"after")
    assert_qemu_clean(path, allow_leaks=True)


@needs_qemu_img
def test_kill_9_right_after_flush_keeps_data(tmp_path):
    path = tmp_path / "k.qcow2"
    create_qcow2(path, 16 * MiB, cluster_size=4096)
    child_code = _KILL_CHILD.replace("while True:", "import time\ntime.sleep(60)\nwhile True:")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    child = subprocess.Popen([sys.executable, "-c", child_code, str(path), "5"],
                             stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline() == b"flushed\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert_qemu_clean(path)
    expected = (tmp_path / "k.qcow2.expected").read_bytes()
    with Qcow2Image.open(path, read_only=True) as img:
        assert img.read(0, img.size) == expected
    assert_same_as(path, expected, tmp_path)


# -- images made by qemu-img ----------------------------------------------------------------


@needs_qemu_img
@pytest.mark.parametrize("options", ["", "cluster_size=4096", "compat=0.10",
                                     "cluster_size=512,refcount_bits=1"])
@pytest.mark.parametrize("compress", [False, True])
def test_reads_qemu_converted_images(tmp_path, options, compress):
    rnd = random.Random(8)
    raw = tmp_path / "src.raw"
    blocks = [rnd.randbytes(4096) if rnd.random() < 0.3 else
              bytes([rnd.randrange(256)]) * 4096 if rnd.random() < 0.5 else bytes(4096)
              for _ in range(600)]
    data = b"".join(blocks)
    raw.write_bytes(data)
    out = tmp_path / "img.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", *(["-c"] if compress else []),
             *(["-o", options] if options else []), raw, out)
    with open_image(out, read_only=True) as img:
        assert img.read(0, len(data)) == data
        assert img.read(12345, 99999) == data[12345:12345 + 99999]
    # and kemu writes into it (COW out of compressed clusters) cleanly
    model = bytearray(data)
    with Qcow2Image.open(out) as img:
        random_writes(img, model, random.Random(1), 25, 30_000)
    assert_qemu_clean(out)
    assert_same_as(out, bytes(model), tmp_path)


@needs_qemu_img
@needs_qemu_io
def test_reads_qemu_overlay_with_zero_clusters(tmp_path):
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -P 0x11 0 4M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io(top, "write -P 0x22 65536 100000", "write -z 1048576 131072",
            "write -z -u 2097152 131072", "discard 3145728 65536")
    expected = bytearray(b"\x11" * 4 * MiB)
    expected[65536:65536 + 100000] = b"\x22" * 100000
    expected[MiB:MiB + 131072] = bytes(131072)
    expected[2 * MiB:2 * MiB + 131072] = bytes(131072)
    expected[3 * MiB:3 * MiB + 65536] = bytes(65536)
    with open_image(top, read_only=True) as img:
        assert img.read(0, 4 * MiB) == expected
    with Qcow2Image.open(top) as img:
        img.write(MiB + 7, b"in a zero cluster")
        expected[MiB + 7:MiB + 24] = b"in a zero cluster"
        img.write(2 * MiB - 3, b"across")
        expected[2 * MiB - 3:2 * MiB + 3] = b"across"
        assert img.read(0, 4 * MiB) == expected
    assert_qemu_clean(top)
    assert_same_as(top, bytes(expected), tmp_path)


@needs_qemu_img
@needs_qemu_io
def test_writes_keep_internal_snapshots_intact(tmp_path):
    path = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", path, "2M")
    qemu_io(path, "write -P 0x33 0 2M")
    qemu_img("snapshot", "-c", "before", path)
    model = bytearray(b"\x33" * 2 * MiB)
    with Qcow2Image.open(path) as img:
        random_writes(img, model, random.Random(6), 20, 100_000)
        discard(img, model, MiB, 65536)
    assert_qemu_clean(path)
    assert check_qcow2(path).exit_status == 0
    assert_same_as(path, bytes(model), tmp_path)
    snap = tmp_path / "snap.raw"
    qemu_img("convert", "-l", "snapshot.name=before", "-O", "raw", path, snap)
    assert snap.read_bytes() == b"\x33" * 2 * MiB


@needs_qemu_img
def test_check_agrees_with_qemu_on_damage(tmp_path):
    path = tmp_path / "a.qcow2"
    create_qcow2(path, MiB)
    with Qcow2Image.open(path) as img:
        img.write(0, b"x" * 300_000)
        leaked = img.refcounts.alloc(2)          # referenced by nothing: a leak
        img.file.pwrite(leaked * 65536, bytes(2 * 65536))
        img.flush()
    assert check_qcow2(path).leaks == 2
    qemu_img("check", path, ok=(3,))
    with Qcow2Image.open(path) as img:       # corrupt: drop a data cluster's refcount
        host = img.map.entry(0) & 0x00FFFFFFFFFFFE00
        block = img.refcounts._block(host >> 16 >> img.refcounts.block_bits)
        block.set((host >> 16) & ((1 << img.refcounts.block_bits) - 1), 0)
        img.refcounts.write_dirty()
        img.file.fsync()
        assert leaked
    ours = check_qcow2(path)
    assert ours.corruptions >= 1 and ours.exit_status == 2
    qemu_img("check", path, ok=(2,))
