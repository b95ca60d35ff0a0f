"""kemu img snapshot -l/-c/-a/-d: the internal snapshots of a qcow2 image, listed,
made, applied and deleted as qemu-img does, each side reading the other's."""

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
    assert r.returncode == 0 and r.stdout == ""           # as qemu-img: nothing to list
    r = run(*KEMU, "snapshot", "-c", "x", "-f", "raw", str(raw))
    q = run("qemu-img", "snapshot", "-c", "x", str(raw))      # (probes raw, and says so)
    assert r.returncode == q.returncode == 1
    assert r.stderr.replace("kemu img", "qemu-img") == q.stderr.splitlines(True)[-1]
    image = tmp_path / "e.qcow2"
    assert run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M").returncode == 0
    for args in (("-a", "nosuch"), ("-d", "nosuch"), ("-l", "-c", "x")):
        r = run(*KEMU, "snapshot", *args, str(image))
        q = run("qemu-img", "snapshot", *args, str(image))
        assert r.returncode == q.returncode == 1, args
        assert r.stderr.replace("kemu img", "qemu-img") == q.stderr.splitlines(True)[0], args
    bad = tmp_path / "bad.qcow2"
    assert run("qemu-img", "create", "-q", "-f", "qcow2", str(bad), "16M").returncode == 0
    data = bytearray(bad.read_bytes())
    data[60:64] = (3).to_bytes(4, "big")               # nb_snapshots = 3, no table
    data[64:72] = (1 << 40).to_bytes(8, "big")          # snapshots_offset far away
    bad.write_bytes(bytes(data))
    r = run(*KEMU, "snapshot", "-l", str(bad))
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


def qemu_io(image, *commands):
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    r = run(*args, str(image))
    assert r.returncode == 0 and "failed" not in r.stdout and "Pattern verification" \
        not in r.stdout, r.stdout + r.stderr
    return r.stdout


def check_clean(image):
    r = run("qemu-img", "check", str(image))
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io is not installed")
@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=4096,refcount_bits=4",
                                  "compat=0.10"])
def test_kemu_made_snapshots_pass_qemu_img_and_are_applied_by_it(tmp_path, opts):
    image = tmp_path / "d.qcow2"
    assert run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(image),
               "8M").returncode == 0
    qemu_io(image, "write -P 0x11 0 200k", "write -P 0x12 5M 4k")
    r = run(*KEMU, "snapshot", "-c", "before", str(image))
    assert r.returncode == 0, r.stderr
    check_clean(image)
    # the guest's writes after the snapshot are copied, the snapshot keeps the old data
    qemu_io(image, "write -P 0x21 64k 8k", "write -P 0x22 7M 4k")
    check_clean(image)
    listed = run("qemu-img", "snapshot", "-l", str(image)).stdout
    assert "before" in listed
    assert run(*KEMU, "snapshot", "-l", str(image)).stdout == listed
    assert run("qemu-img", "snapshot", "-a", "before", str(image)).returncode == 0
    check_clean(image)
    qemu_io(image, "read -P 0x11 0 200k", "read -P 0x12 5M 4k", "read -P 0 7M 4k")
    # and the other way: qemu-img's snapshot applied and deleted by kemu
    qemu_io(image, "write -P 0x31 0 4k")
    assert run("qemu-img", "snapshot", "-c", "theirs", str(image)).returncode == 0
    qemu_io(image, "write -P 0x41 0 4k")
    r = run(*KEMU, "snapshot", "-a", "theirs", str(image))
    assert r.returncode == 0, r.stderr
    check_clean(image)
    qemu_io(image, "read -P 0x31 0 4k", "read -P 0x11 4k 196k")
    r = run(*KEMU, "snapshot", "-d", "before", str(image))
    assert r.returncode == 0, r.stderr
    check_clean(image)
    r = run(*KEMU, "snapshot", "-d", "2", str(image))       # by id
    assert r.returncode == 0, r.stderr
    check_clean(image)
    assert run("qemu-img", "snapshot", "-l", str(image)).stdout == ""
    qemu_io(image, "read -P 0x31 0 4k", "read -P 0x11 4k 196k", "write -P 0x51 0 64k")
    check_clean(image)


def test_one_bit_refcounts_cannot_share_and_the_image_stays_clean(tmp_path):
    image = tmp_path / "o.qcow2"
    assert run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", str(image),
               "1M").returncode == 0
    r = run(*KEMU, "snapshot", "-c", "x", str(image))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("kemu img: Could not create snapshot 'x': -22 (Invalid argument)")
    check_clean(image)         # (qemu-img leaks a cluster here)


def test_many_snapshots_and_compressed_clusters_stay_consistent(tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes(b"kemu" * (1 << 18))
    image = tmp_path / "c.qcow2"
    assert run("qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(image)).returncode == 0
    for i in range(12):
        r = run(*KEMU, "snapshot", "-c", f"s{i}", str(image))
        assert r.returncode == 0, r.stderr
    check_clean(image)
    for i in range(0, 12, 2):
        assert run(*KEMU, "snapshot", "-d", f"s{i}", str(image)).returncode == 0
    check_clean(image)
    names = [line.split()[1] for line in
             run("qemu-img", "snapshot", "-l", str(image)).stdout.splitlines()[2:]]
    assert names == [f"s{i}" for i in range(1, 12, 2)]
    assert run("qemu-img", "snapshot", "-a", "s5", str(image)).returncode == 0
    assert run(*KEMU, "snapshot", "-a", "s11", str(image)).returncode == 0
    check_clean(image)
    r = run("qemu-img", "compare", str(src), str(image))
    assert r.returncode == 0, r.stdout + r.stderr


def test_img_info_lists_snapshots_as_qemu_img_info(tmp_path):
    image = tmp_path / "i.qcow2"
    assert run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M").returncode == 0
    assert run(*KEMU, "snapshot", "-c", "ours", str(image)).returncode == 0
    assert run("qemu-img", "snapshot", "-c", "theirs", str(image)).returncode == 0
    for output in ("human", "json"):
        ours = run(*KEMU, "info", f"--output={output}", str(image))
        theirs = run("qemu-img", "info", f"--output={output}", str(image))
        assert ours.returncode == 0 and ours.stdout == theirs.stdout, ours.stdout + ours.stderr
