#!/usr/bin/env python3
"""Restore latency of a microvm Linux on KVM: kemu vs QEMU, side by side.

The default x86-64 guest with 256 MiB on both (``-M microvm -accel kvm``,
QEMU with ``-cpu host``; the same kernel, initramfs and command line),
booted to its shell and saved QEMU's way (QMP ``migrate`` into a file
through ``exec:cat``).  Restore latency is from the command to the guest
answering on its console: a new process with ``-incoming "exec:cat FILE"``
for each peer, and kemu's in-process ``Machine.restore(dir)`` of a
snapshot directory.  The helpers (process, QMP, typing until the answer)
are bench/snapshot_aarch64.py's.

Where /dev/kvm is PVM (Linux does not boot on it) everything runs inside
the nested harness's L1 (:mod:`kemu.testing.nested`: QEMU TCG emulating
SVM), both peers in the same L1: only the ratio means anything.

    .venv/bin/python bench/snapshot_x86_kvm.py [--runs N] [--direct]
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from snapshot_aarch64 import KEMU, Proc, answer_after, saved_stream  # noqa: E402

from kemu.accel.kvm import kvm_is_hardware_backed  # noqa: E402
from kemu.guest.debian import default_guest  # noqa: E402
from kemu.testing import nested  # noqa: E402


def machine_args(guest) -> list[str]:
    return ["-M", "microvm", "-accel", "kvm", "-m", "256", "-kernel", str(guest.kernel),
            "-initrd", str(guest.initrd), "-append", guest.append, "-display", "none",
            "-monitor", "none", "-serial", "stdio"]


def inner(runs: int) -> None:
    from kemu import Machine
    from kemu.api import ConsoleTimeout
    guest = default_guest("x86_64", show_progress=False)
    qemu = [shutil.which("qemu-system-x86_64") or "qemu-system-x86_64", "-cpu", "host",
            "-nodefaults", "-no-user-config"] + machine_args(guest)
    kemu = KEMU + machine_args(guest)
    tmp = Path(tempfile.mkdtemp(prefix="kemu-bench-"))
    qfile = saved_stream(qemu, tmp, "qemu")
    kfile = saved_stream(kemu, tmp, "kemu")
    src = Machine.default_guest("x86_64", memory="256M")
    src.start()
    src.console.expect("# ", timeout=240)
    src.console.run("true", 120)
    snap = tmp / "snap"
    src.snapshot(snap)
    src.kill()
    results: dict[str, list[float]] = {"qemu -incoming": [], "kemu -incoming": [],
                                       "kemu Machine.restore": []}
    for _ in range(runs):
        for label, cmd in (("qemu -incoming", qemu + ["-incoming", f"exec:cat {qfile}"]),
                           ("kemu -incoming", kemu + ["-incoming", f"exec:cat {kfile}"])):
            p = Proc(cmd)
            try:
                results[label].append(answer_after(p, 300))
            finally:
                p.close()
        t0 = time.perf_counter()
        vm = Machine.restore(snap, overlay_dir=tmp, tag="bench")
        while True:
            vm.console.write("echo answer-$((6*7))\n")
            try:
                vm.console.expect("answer-42", timeout=0.02)
                break
            except ConsoleTimeout:
                if time.perf_counter() - t0 > 300:
                    raise
        results["kemu Machine.restore"].append(time.perf_counter() - t0)
        vm.kill()
    q = statistics.median(results["qemu -incoming"])
    print(f"restore latency, command to console answer, 256 MiB microvm ({runs} runs, median):")
    for label, values in results.items():
        m = statistics.median(values)
        print(f"  {label:24s} {m * 1000:8.0f} ms   ratio to QEMU {m / q:.2f}x   "
              f"(runs: {', '.join(f'{x * 1000:.0f}' for x in values)})")
    print(f"  stream sizes: QEMU {qfile.stat().st_size >> 20} MiB, "
          f"kemu {kfile.stat().st_size >> 20} MiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--inner", action="store_true", help="run here (inside L1)")
    ap.add_argument("--direct", action="store_true",
                    help="run on this host's /dev/kvm even if it is not hardware-backed")
    args = ap.parse_args()
    if args.inner or args.direct or kvm_is_hardware_backed():
        inner(args.runs)
        return 0
    reason = nested.nested_unavailable_reason()
    if reason:
        print(f"skipped: /dev/kvm is not hardware-backed and no nested harness: {reason}")
        return 0
    from kemu.guest.debian import cache_dir
    default_guest("x86_64", show_progress=sys.stderr.isatty())
    cmd = (f"cd {shlex.quote(str(ROOT))} && {shlex.quote(sys.executable)} "
           f"bench/snapshot_x86_kvm.py --inner --runs {args.runs}")
    result = nested.NestedHarness().run(cmd, timeout=900 + 300 * args.runs,
                                        env={"KEMU_NESTED": "1",
                                             "XDG_CACHE_HOME": str(cache_dir().parent)})
    print(f"in the nested harness's L1 (QEMU TCG, emulated SVM); L1 run {result.seconds:.0f} s, "
          f"status {result.status}")
    print(result.output.rstrip())
    return 0 if result.status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
