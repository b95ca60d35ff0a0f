#!/usr/bin/env python3
"""Boot-to-poweroff of Debian's arm64 kernel: kemu vs qemu-system-aarch64, side by side.

Both boot the same kernel (the default guest's), the same initramfs (busybox
with an init that powers off as soon as it runs) and the same command line
(``cryptomgr.notests``), alternating rounds (one kemu run and one QEMU run
each).  Reports the median of the per-round ratios kemu/QEMU for wall time
and for CPU time (user + system of the process), each one's peak RSS, and
the host's load average before and after.

    .venv/bin/python bench/boot_aarch64.py [--runs N]   (default 10 rounds)

Installs Debian's qemu-system-arm if it is missing (needs root or sudo).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kemu.guest import cpio
from kemu.guest.debian import default_guest

APPEND = "console=ttyAMA0 rdinit=/init quiet cryptomgr.notests"
INIT = b"#!/bin/busybox sh\n/bin/busybox poweroff -f\n"


def ensure_qemu() -> str:
    qemu = shutil.which("qemu-system-aarch64")
    if qemu:
        return qemu
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "qemu-system-arm"], check=True)
    return shutil.which("qemu-system-aarch64")


def busybox_from_guest(guest) -> bytes:
    """Take busybox out of the default guest's initramfs."""
    import gzip
    data = gzip.decompress(guest.initrd.read_bytes())
    pos = 0
    while pos < len(data):
        namesize = int(data[pos + 94:pos + 102], 16)
        filesize = int(data[pos + 54:pos + 62], 16)
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        start = pos + 110 + namesize
        start += -start % 4
        if name == "bin/busybox":
            return data[start:start + filesize]
        pos = start + filesize
        pos += -pos % 4
    raise SystemExit("busybox not found in the default guest's initramfs")


def timed(cmd: list[str]) -> tuple[float, float, int, bytes]:
    """Wall time, CPU time (user + system), peak RSS (KiB) and output of a run."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{out.decode(errors='replace')[-2000:]}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    guest = default_guest("aarch64", show_progress=False)
    qemu = ensure_qemu()
    with tempfile.TemporaryDirectory() as tmp:
        initrd = Path(tmp) / "poweroff.cpio.gz"
        initrd.write_bytes(cpio.initramfs([
            cpio.directory("bin"), cpio.directory("dev"), cpio.chardev("dev/console", 5, 1),
            cpio.file("bin/busybox", busybox_from_guest(guest), 0o755),
            cpio.file("init", INIT, 0o755)]))
        common = ["-M", "virt", "-cpu", "cortex-a57", "-m", "256", "-nographic", "-no-reboot",
                  "-kernel", str(guest.kernel), "-initrd", str(initrd), "-append", APPEND]
        commands = {
            "kemu": [sys.executable, "-m", "kemu.cli", *common],
            "qemu": [qemu, *common],
        }
        results: dict[str, list[tuple[float, float, int]]] = {k: [] for k in commands}
        load_before = os.getloadavg()[0]
        for _ in range(args.runs):
            for name, cmd in commands.items():
                elapsed, cpu, rss, _out = timed(cmd)
                results[name].append((elapsed, cpu, rss))
        load_after = os.getloadavg()[0]
    print(f"kernel: {guest.kernel.name}, append: {APPEND!r}, {args.runs} rounds, alternating; "
          f"host load average {load_before:.2f} before, {load_after:.2f} after, "
          f"{os.cpu_count()} CPUs")
    for name in commands:
        walls = [w for w, _, _ in results[name]]
        cpus = [c for _, c, _ in results[name]]
        rss = max(r for _, _, r in results[name])
        print(f"{name:5s} wall median {statistics.median(walls):.2f} s, CPU median "
              f"{statistics.median(cpus):.2f} s, peak RSS {rss / 1024:.0f} MiB  "
              f"(wall: {' '.join(f'{t:.2f}' for t in walls)})")
    for i, what in ((0, "wall time"), (1, "CPU time")):
        ratios = [k[i] / q[i] for k, q in zip(results["kemu"], results["qemu"])]
        print(f"ratio kemu/QEMU ({what}): median {statistics.median(ratios):.2f} "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f})")

if __name__ == "__main__":
    main()
