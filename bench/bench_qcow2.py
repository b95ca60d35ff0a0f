#!/usr/bin/env python3
"""Host-side throughput of the qcow2 layer against the raw file under it.

The same workloads run through :class:`kemu.backends.block.RawFile` and
:class:`kemu.backends.qcow2.Qcow2Image` (both on files in ``--dir``, so
the page cache serves both alike: this measures what the qcow2 layer adds,
not the disk):

* sequential write of ``--mib`` MiB in 1 MiB requests into a new image,
  then flush;
* sequential read of it in 1 MiB requests;
* 4 KiB random reads over it;
* 4 KiB random writes over it (qcow2: clusters already allocated);
* 4 KiB random writes into a new image (qcow2: each one allocates a
  64 KiB cluster and fills the rest with zeros), then flush.

Prints MB/s for both and the qcow2/raw ratio.

    .venv/bin/python bench/bench_qcow2.py [--mib 64] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kemu.backends.block import RawFile  # noqa: E402
from kemu.backends.qcow2 import Qcow2Image, create_qcow2  # noqa: E402

MiB = 1 << 20
BIG = MiB
SMALL = 4096


def new_raw(path: Path, size: int) -> RawFile:
    with open(path, "wb") as f:
        f.truncate(size)
    return RawFile(path)


def new_qcow2(path: Path, size: int) -> Qcow2Image:
    create_qcow2(path, size)
    return Qcow2Image.open(path)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def workloads(disk, size: int, offsets: list[int], payload: bytes, small: bytes) -> dict:
    """Run the workloads on an empty ``disk``; returns seconds per workload."""
    def seq_write():
        for off in range(0, size, BIG):
            disk.write(off, payload)
        disk.flush()

    def seq_read():
        for off in range(0, size, BIG):
            disk.read(off, BIG)

    def rand_read():
        for off in offsets:
            disk.read(off, SMALL)

    def rand_write():
        for off in offsets:
            disk.write(off, small)
        disk.flush()

    return {"sequential write 1M": timed(seq_write), "sequential read 1M": timed(seq_read),
            "random read 4K": timed(rand_read), "random write 4K": timed(rand_write)}


def alloc_writes(disk, offsets: list[int], small: bytes) -> float:
    def run():
        for off in offsets:
            disk.write(off, small)
        disk.flush()
    return timed(run)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=64, help="data per workload (MiB)")
    ap.add_argument("--dir", default=None, help="where the scratch images go")
    args = ap.parse_args()
    size = args.mib * MiB
    rnd = random.Random(0)
    payload = rnd.randbytes(BIG)
    small = rnd.randbytes(SMALL)
    offsets = [rnd.randrange(size // SMALL) * SMALL for _ in range(size // SMALL)]
    # allocating random writes: fewer of them (each costs a whole cluster)
    alloc_offsets = offsets[: len(offsets) // 4]
    results: dict[str, tuple[float, float, int]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        raw = new_raw(Path(d) / "disk.raw", size)
        qcow = new_qcow2(Path(d) / "disk.qcow2", size)
        try:
            t_raw = workloads(raw, size, offsets, payload, small)
            t_q = workloads(qcow, size, offsets, payload, small)
        finally:
            raw.close()
            qcow.close()
        for name in t_raw:
            results[name] = (t_raw[name], t_q[name], size)
        raw = new_raw(Path(d) / "fresh.raw", size)
        qcow = new_qcow2(Path(d) / "fresh.qcow2", size)
        try:
            results["random write 4K, allocating"] = (
                alloc_writes(raw, alloc_offsets, small), alloc_writes(qcow, alloc_offsets, small),
                len(alloc_offsets) * SMALL)
        finally:
            raw.close()
            qcow.close()
    print(f"{'workload':30} {'raw MB/s':>10} {'qcow2 MB/s':>11} {'qcow2/raw':>10}")
    for name, (tr, tq, nbytes) in results.items():
        mr, mq = nbytes / tr / 1e6, nbytes / tq / 1e6
        print(f"{name:30} {mr:10.1f} {mq:11.1f} {mq / mr:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
