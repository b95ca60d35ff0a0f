#!/usr/bin/env python3
"""-smp 2 on the arm64 virt board: kemu vs QEMU's multi-threaded TCG, side by side.

Two guests, each run by kemu and by ``qemu-system-aarch64 -accel
tcg,thread=multi`` with the same kernel (the default guest's), initramfs and
command line, alternating rounds:

* boot: ``-smp 2`` boot to poweroff (an init that powers off at once);
* job: a parallel CPU-bound guest job, two ``md5sum`` of a 48 MiB file at
  once, timed inside the guest from /proc/uptime (both machines' clocks are
  the host's), then poweroff.

Reports medians of wall time, of the job's time, of the host CPU time the
process used (user + system; "cores" is CPU time over wall time), and the
per-round ratios kemu/QEMU.

    .venv/bin/python bench/smp_aarch64.py [--runs N] [--smp N] [--gic-version 2|3]
                                              (default 5 rounds, 2 CPUs, GICv2)
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

from boot_aarch64 import busybox_from_guest, ensure_qemu, timed

from kemu.guest import cpio
from kemu.guest.debian import default_guest

APPEND = "console=ttyAMA0 rdinit=/init quiet cryptomgr.notests"
BB = "/bin/busybox"
BOOT_INIT = f"#!{BB} sh\n{BB} poweroff -f\n"
JOB_INIT = f"""#!{BB} sh
{BB} mount -t proc proc /proc
{BB} dd if=/dev/zero of=/f bs=1M count=48 2>/dev/null
read t0 rest < /proc/uptime
{BB} md5sum /f > /dev/null & {BB} md5sum /f > /dev/null
wait
read t1 rest < /proc/uptime
echo "JOB $t0 $t1 CPUS $({BB} nproc)"
{BB} poweroff -f
"""


def initramfs(busybox: bytes, init: str) -> bytes:
    return cpio.initramfs([
        cpio.directory("bin"), cpio.directory("dev"), cpio.directory("proc"),
        cpio.chardev("dev/console", 5, 1), cpio.chardev("dev/null", 1, 3),
        cpio.chardev("dev/zero", 1, 5), cpio.file("bin/busybox", busybox, 0o755),
        cpio.file("init", init.encode(), 0o755)])


def job_seconds(out: bytes, smp: int) -> float:
    m = re.search(rb"JOB ([\d.]+) ([\d.]+) CPUS (\d+)", out)
    if not m or int(m.group(3)) != smp:
        raise SystemExit(f"the job did not report (or saw the wrong CPU count):\n"
                         f"{out.decode(errors='replace')[-1500:]}")
    return float(m.group(2)) - float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--gic-version", choices=["2", "3"], default="2")
    args = ap.parse_args()
    guest = default_guest("aarch64", show_progress=False)
    qemu = ensure_qemu()
    busybox = busybox_from_guest(guest)
    with tempfile.TemporaryDirectory() as tmp:
        images = {}
        for name, init in (("boot", BOOT_INIT), ("job", JOB_INIT)):
            images[name] = Path(tmp) / f"{name}.cpio.gz"
            images[name].write_bytes(initramfs(busybox, init))
        common = ["-M", f"virt,gic-version={args.gic_version}", "-cpu", "cortex-a57",
                  "-m", "256", "-smp", str(args.smp), "-nographic", "-no-reboot",
                  "-kernel", str(guest.kernel), "-append", APPEND]
        peers = {"kemu": [sys.executable, "-m", "kemu.cli", *common],
                 "qemu": [qemu, "-accel", "tcg,thread=multi", *common]}
        # results[scenario][peer] = [(wall, cpu, job)]
        results = {s: {p: [] for p in peers} for s in images}
        load_before = os.getloadavg()[0]
        for _ in range(args.runs):
            for scenario, image in images.items():
                for peer, cmd in peers.items():
                    wall, cpu, _rss, out = timed([*cmd, "-initrd", str(image)])
                    job = job_seconds(out, args.smp) if scenario == "job" else wall
                    results[scenario][peer].append((wall, cpu, job))
        load_after = os.getloadavg()[0]
    print(f"-smp {args.smp}, gic-version={args.gic_version}, kernel {guest.kernel.name}, "
          f"{args.runs} rounds alternating; host "
          f"load average {load_before:.2f} before, {load_after:.2f} after, "
          f"{os.cpu_count()} host CPUs")
    for scenario, by_peer in results.items():
        what = "boot to poweroff" if scenario == "boot" else "two md5sum of 48 MiB at once"
        print(f"{scenario}: {what}")
        for peer, rows in by_peer.items():
            wall = statistics.median(r[0] for r in rows)
            cpu = statistics.median(r[1] for r in rows)
            job = statistics.median(r[2] for r in rows)
            extra = f", job {job:.2f} s" if scenario == "job" else ""
            print(f"  {peer}: wall {wall:.2f} s{extra}, host CPU {cpu:.2f} s "
                  f"({cpu / wall:.2f} cores)  (walls: {' '.join(f'{r[0]:.2f}' for r in rows)})")
        k, q = by_peer["kemu"], by_peer["qemu"]
        idx = 2 if scenario == "job" else 0
        ratio = [a[idx] / b[idx] for a, b in zip(k, q)]
        cpu_ratio = [a[1] / b[1] for a, b in zip(k, q)]
        print(f"  ratio kemu/QEMU: {'job' if idx == 2 else 'wall'} median "
              f"{statistics.median(ratio):.2f} (min {min(ratio):.2f}, max {max(ratio):.2f}), "
              f"host CPU median {statistics.median(cpu_ratio):.2f}")


if __name__ == "__main__":
    main()
