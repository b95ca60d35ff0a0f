#!/usr/bin/env python3
"""savevm, loadvm and -loadvm into a qcow2 disk: kemu vs QEMU, side by side.

The default aarch64 guest with 256 MiB on both (``-M virt -cpu cortex-a57``,
the same kernel, initramfs and command line) and a 64 MiB qcow2 disk
(``-drive if=virtio``), booted to its shell.  Measured, per VMM:

* ``savevm``: the HMP command's round trip over QMP (``human-monitor-command``),
  the guest running before and after;
* ``loadvm``: the same for loading that snapshot back, then the time until
  the guest answers on its console;
* ``-loadvm``: a new process started from the snapshot, from the command to
  the guest answering on its console;
* the VM state's size as ``qemu-img snapshot -l`` lists it.

    .venv/bin/python bench/savevm_aarch64.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from snapshot_aarch64 import KEMU, Proc, answer_after, boot, machine_args, qemu_binary

from kemu.guest.debian import default_guest


def vmm_args(vmm: str, guest, disk: Path) -> list[str]:
    head = [qemu_binary()] if vmm == "qemu" else KEMU
    return head + machine_args(guest) + ["-drive", f"file={disk},format=qcow2,if=virtio"]


def hmp(q, line: str) -> float:
    t0 = time.perf_counter()
    out = q.run("human-monitor-command", **{"command-line": line})
    if out:
        raise SystemExit(f"{line}: {out!r}")
    return time.perf_counter() - t0


def one_run(vmm: str, guest, tmp: Path, n: int) -> dict:
    disk = tmp / f"{vmm}{n}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    cmd = vmm_args(vmm, guest, disk)
    p, q = boot(cmd, tmp / f"{vmm}{n}.qmp")
    try:
        save = hmp(q, "savevm bench")
        load = hmp(q, "loadvm bench")
        mark = len(p.out)
        t0 = time.perf_counter()
        p.send("echo loaded-$((6*7))\n")
        p.expect(b"loaded-42", start=mark)
        answer = time.perf_counter() - t0
        q.run("quit")
    finally:
        p.close()
    listed = subprocess.run(["qemu-img", "snapshot", "-l", str(disk)], capture_output=True,
                            text=True, check=True).stdout.splitlines()[-1]
    fresh = Proc(cmd + ["-loadvm", "bench"])
    try:
        restore = answer_after(fresh)
    finally:
        fresh.close()
    return {"savevm": save, "loadvm": load, "answer": answer, "-loadvm": restore,
            "size": " ".join(listed.split()[2:4])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    guest = default_guest("aarch64", show_progress=False)
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    results: dict[str, list[dict]] = {"kemu": [], "qemu": []}
    with tempfile.TemporaryDirectory(prefix="kemu-bench-savevm-") as d:
        for n in range(args.runs):
            for vmm in ("qemu", "kemu"):
                results[vmm].append(one_run(vmm, guest, Path(d), n))
    print(f"{'median of ' + str(args.runs):<22}{'kemu':>10}{'QEMU':>10}{'kemu/QEMU':>12}")
    for key in ("savevm", "loadvm", "answer", "-loadvm"):
        k = statistics.median(r[key] for r in results["kemu"])
        m = statistics.median(r[key] for r in results["qemu"])
        label = {"answer": "loadvm -> console"}.get(key, key)
        print(f"{label:<22}{k * 1000:>8.0f}ms{m * 1000:>8.0f}ms{k / m:>11.2f}x")
    print(f"{'VM state (qemu-img)':<22}{results['kemu'][0]['size']:>10}"
          f"{results['qemu'][0]['size']:>10}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
