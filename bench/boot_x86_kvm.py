#!/usr/bin/env python3
"""Boot-to-poweroff of Debian's amd64 kernel on KVM: kemu vs QEMU, both ``-M microvm``.

Both boot the same kernel (the default x86-64 guest's bzImage), the same
initramfs (the default guest's, with an /init that prints ``uname -m`` and
the CPU count and powers off at once) and the same command line, alternating
runs: ``kemu -M microvm -accel kvm`` and ``qemu-system-x86_64 -M microvm
-accel kvm -cpu host``, 512 MiB, one vCPU.  Reports each run's wall time,
the medians and the ratio kemu / QEMU.

Where /dev/kvm is PVM (Linux does not boot on it) the runs happen inside
the nested harness's L1 (:mod:`kemu.testing.nested`: QEMU TCG emulating
SVM), both peers in the same L1, so only the ratio means anything; the
whole L1 is slower than hardware by a large factor.  With ``--exits`` it
also runs bench/bench_kvm_exits.py in the same place (real KVM exits).

    .venv/bin/python bench/boot_x86_kvm.py [--runs N] [--exits] [--direct]
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kemu.accel.kvm import kvm_is_hardware_backed
from kemu.guest.debian import default_guest
from kemu.testing import nested


def commands(kernel: Path, initrd: Path, append: str) -> dict[str, str]:
    common = ["-m", "512", "-smp", "1", "-kernel", str(kernel), "-initrd", str(initrd),
              "-append", append, "-display", "none", "-serial", "stdio", "-no-reboot"]
    kemu = [sys.executable, "-m", "kemu.cli", "-M", "microvm", "-accel", "kvm", *common]
    qemu = ["qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-cpu", "host",
            "-nodefaults", "-no-user-config", *common]
    return {"kemu": shlex.join(kemu), "qemu": shlex.join(qemu)}


def script(runs: int, cmds: dict[str, str], exits: bool, exit_n: int) -> str:
    lines = [f"cd {shlex.quote(str(ROOT))}"]
    for i in range(runs):
        for name, cmd in cmds.items():
            lines.append(f"t0=$(date +%s%N); {cmd} > ${{TMPDIR:-/tmp}}/out-{name}-{i} 2>&1; rc=$?; "
                         f"t1=$(date +%s%N); echo \"BENCH {name} {i} $rc $(( (t1 - t0) / 1000000 ))"
                         f" $(grep -c {nested.L2_REPORT} ${{TMPDIR:-/tmp}}/out-{name}-{i})\"")
    lines.append(f"tail -5 ${{TMPDIR:-/tmp}}/out-kemu-{runs - 1}")
    if exits:
        lines.append(f"echo EXITS-BEGIN; {shlex.quote(sys.executable)} bench/bench_kvm_exits.py "
                     f"-n {exit_n} --repeat 3; echo EXITS-END")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="boots of each peer")
    ap.add_argument("--exits", action="store_true", help="also run bench_kvm_exits.py")
    ap.add_argument("--exit-n", type=int, default=20000, help="round trips for --exits")
    ap.add_argument("--direct", action="store_true",
                    help="run on this host's /dev/kvm even if it is not hardware-backed")
    args = ap.parse_args()
    guest = default_guest("x86_64", show_progress=sys.stderr.isatty())
    initrd = nested.l2_initrd(guest.initrd, "bench-initrd.cpio.gz")
    cmds = commands(guest.kernel, initrd, guest.append)
    text = script(args.runs, cmds, args.exits, args.exit_n)
    if args.direct or kvm_is_hardware_backed():
        where = "this host's /dev/kvm"
        output = subprocess.run(["sh", "-c", text], capture_output=True, text=True,
                                check=False).stdout
    else:
        reason = nested.nested_unavailable_reason()
        if reason:
            print(f"skipped: /dev/kvm is not hardware-backed and no nested harness: {reason}")
            return 0
        where = "nested L1 (QEMU TCG, emulated SVM)"
        result = nested.NestedHarness().run(text, timeout=600 + args.runs * 400)
        output = result.output
        print(f"L1 run: {result.seconds:.1f} s, status {result.status}")
    times: dict[str, list[float]] = {"kemu": [], "qemu": []}
    for m in re.finditer(r"BENCH (\w+) (\d+) (\d+) (\d+) (\d+)", output):
        name, _i, rc, ms, reported = m.groups()
        ok = rc == "0" and reported == "1"
        print(f"  {name:<5} run {int(_i) + 1}: {int(ms) / 1000:7.2f} s"
              f"{'' if ok else f'  (FAILED: status {rc}, report lines {reported})'}")
        if ok:
            times[name].append(int(ms) / 1000)
    print(f"boot to poweroff on {where}, Debian {guest.kernel_version}, -m 512 -smp 1:")
    for name, ts in times.items():
        if ts:
            print(f"  {name:<5} median {statistics.median(ts):7.2f} s  (n={len(ts)})")
    if times["kemu"] and times["qemu"]:
        print(f"  ratio kemu / QEMU: "
              f"{statistics.median(times['kemu']) / statistics.median(times['qemu']):.2f}x")
    m = re.search(r"EXITS-BEGIN\n(.*?)EXITS-END", output, re.DOTALL)
    if m:
        print(f"bench_kvm_exits.py on {where}:")
        print(m.group(1).rstrip())
    if not (times["kemu"] and times["qemu"]):
        print(output[-4000:])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
