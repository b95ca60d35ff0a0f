#!/usr/bin/env python3
"""Restore latency of a microvm Linux on KVM: kemu vs QEMU, side by side.

The default x86-64 guest with 256 MiB on both (``-M microvm -accel kvm``,
QEMU with ``-cpu host``; the same kernel, initramfs and command line),
booted to its shell and saved QEMU's way (QMP ``migrate`` into a file
through ``exec:cat``).  Restore latency is from the command to the guest
answering on its console: a new process with ``-incoming "exec:cat FILE"``
for each peer, and kemu's in-process ``Machine.restore(dir)`` of a
snapshot directory.  With ``--migration``, also live migration over a UNIX
socket of a guest dirtying memory (total time and downtime).  The helpers (process, QMP, typing until the answer)
are bench/snapshot_aarch64.py's.

Where /dev/kvm is PVM (Linux does not boot on it) everything runs inside
the nested harness's L1 (:mod:`kemu.testing.nested`: QEMU TCG emulating
SVM), both peers in the same L1: only the ratio means anything.

    .venv/bin/python bench/snapshot_x86_kvm.py [--runs N] [--migration] [--direct]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from snapshot_aarch64 import KEMU, compare_live_migrations, compare_restores  # noqa: E402

from kemu.accel.kvm import kvm_is_hardware_backed  # noqa: E402
from kemu.guest.debian import default_guest  # noqa: E402
from kemu.testing import nested  # noqa: E402


def machine_args(guest) -> list[str]:
    return ["-M", "microvm", "-accel", "kvm", "-m", "256", "-kernel", str(guest.kernel),
            "-initrd", str(guest.initrd), "-append", guest.append, "-display", "none",
            "-monitor", "none", "-serial", "stdio"]


def inner(runs: int, migration: bool) -> None:
    from kemu import Machine
    guest = default_guest("x86_64", show_progress=False)
    qemu = [shutil.which("qemu-system-x86_64") or "qemu-system-x86_64", "-cpu", "host",
            "-nodefaults", "-no-user-config"] + machine_args(guest)
    kemu = KEMU + machine_args(guest)
    tmp = Path(tempfile.mkdtemp(prefix="kemu-bench-"))
    compare_restores(qemu, kemu, lambda: Machine.default_guest("x86_64", memory="256M"), runs,
                     tmp, "256 MiB microvm on KVM", timeout=300,
                     interval=0.25 if os.environ.get("KEMU_NESTED") else 0.02)
    if migration:
        compare_live_migrations(qemu, kemu, runs, tmp)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--migration", action="store_true",
                    help="also live migration (total time, downtime) of a guest dirtying memory")
    ap.add_argument("--inner", action="store_true", help="run here (inside L1)")
    ap.add_argument("--direct", action="store_true",
                    help="run on this host's /dev/kvm even if it is not hardware-backed")
    args = ap.parse_args()
    if args.inner or args.direct or kvm_is_hardware_backed():
        inner(args.runs, args.migration)
        return 0
    reason = nested.nested_unavailable_reason()
    if reason:
        print(f"skipped: /dev/kvm is not hardware-backed and no nested harness: {reason}")
        return 0
    from kemu.guest.debian import cache_dir
    default_guest("x86_64", show_progress=sys.stderr.isatty())
    cmd = (f"cd {shlex.quote(str(ROOT))} && {shlex.quote(sys.executable)} "
           f"bench/snapshot_x86_kvm.py --inner --runs {args.runs}"
           f"{' --migration' if args.migration else ''}")
    result = nested.NestedHarness().run(cmd, timeout=900 + 300 * args.runs,
                                        env={"KEMU_NESTED": "1",
                                             "XDG_CACHE_HOME": str(cache_dir().parent)})
    print(f"in the nested harness's L1 (QEMU TCG, emulated SVM); L1 run {result.seconds:.0f} s, "
          f"status {result.status}")
    print(result.output.rstrip())
    return 0 if result.status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
