#!/usr/bin/env python3
"""virtio-blk sequential throughput from a guest: kemu vs qemu-system-aarch64, same guest.

The default guest (Debian's arm64 kernel + busybox) runs
``dd bs=1M count=256`` (``--mib``) with O_DIRECT, writing then reading a raw image on a
virtio-mmio disk, under kemu and under QEMU (``-M virt -cpu cortex-a57``,
``-device virtio-blk-device``), alternating.  Reports MB/s and kemu/QEMU.
With ``--format qcow2`` the disk is a new qcow2 image (``qemu-img create``)
before every boot, so the writes allocate clusters in both VMMs alike.

    .venv/bin/python bench/bench_blk.py [--runs N] [--format raw|qcow2] [--mib M]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from boot_aarch64 import ensure_qemu  # noqa: E402

from kemu.guest.debian import default_guest  # noqa: E402

#: MiB per dd (--mib): large enough that busybox time's 10 ms steps do not matter.
MIB = 256


def script(mib: int) -> str:
    return (f"time dd if=/dev/zero of=/dev/vda bs=1M count={mib} oflag=direct\n"
            f"time dd if=/dev/vda of=/dev/null bs=1M count={mib} iflag=direct\n"
            "poweroff -f\n")
REAL = re.compile(r"real\s+(\d+)m\s*([\d.]+)s")


def measure(cmd: list[str], mib: int) -> tuple[float, float]:
    """Boot, wait for the shell prompt, then type the script (QEMU drops early input)."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    seen = b""
    while b"# " not in seen:
        chunk = proc.stdout.read1(4096)
        if not chunk:
            break
        seen += chunk
    proc.stdin.write(script(mib).encode())
    proc.stdin.flush()
    rest, _err = proc.communicate(timeout=300)
    out = (seen + rest).decode(errors="replace")
    times = [int(m) * 60 + float(s) for m, s in REAL.findall(out)]
    if proc.returncode != 0 or len(times) != 2:
        raise SystemExit(f"{cmd[0]} failed:\n{out[-2000:]}")
    return mib * 1.048576 / times[0], mib * 1.048576 / times[1]


def new_disk(path: Path, fmt: str, mib: int) -> None:
    """A fresh, empty image of ``mib`` + 16 MiB, so every run starts alike."""
    path.unlink(missing_ok=True)
    size = (mib + 16) << 20
    if fmt == "raw":
        with open(path, "wb") as f:
            f.truncate(size)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                       check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--format", choices=("raw", "qcow2"), default="raw")
    ap.add_argument("--mib", type=int, default=MIB, help="MiB written then read")
    args = ap.parse_args()
    guest = default_guest("aarch64", show_progress=False)
    qemu = ensure_qemu()
    with tempfile.TemporaryDirectory() as tmp:
        disk = Path(tmp) / f"bench.{args.format}"
        common = ["-M", "virt", "-cpu", "cortex-a57", "-m", "256", "-nographic",
                  "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
                  "-append", guest.append]
        commands = {
            "kemu": [sys.executable, "-m", "kemu.cli", *common,
                     "-drive", f"file={disk},format={args.format},if=none,id=d0",
                     "-device", "virtio-blk-device,drive=d0"],
            "qemu": [qemu, *common, "-drive", f"file={disk},format={args.format},if=none,id=d0",
                     "-device", "virtio-blk-device,drive=d0"],
        }
        results = {k: [] for k in commands}
        for _ in range(args.runs):
            for name, cmd in commands.items():
                new_disk(disk, args.format, args.mib)
                results[name].append(measure(cmd, args.mib))
    print(f"dd bs=1M count={args.mib} with O_DIRECT in the guest on a {args.format} disk, "
          f"{args.runs} runs each, medians")
    med = {}
    for name, runs in results.items():
        w = statistics.median(r[0] for r in runs)
        r = statistics.median(r[1] for r in runs)
        med[name] = (w, r)
        print(f"{name:5s} write {w:7.1f} MB/s   read {r:7.1f} MB/s")
    print(f"ratio kemu/QEMU: write {med['kemu'][0] / med['qemu'][0]:.2f}  "
          f"read {med['kemu'][1] / med['qemu'][1]:.2f}")


if __name__ == "__main__":
    main()
