#!/usr/bin/env python3
"""How fast QMP ``stop`` and ``quit`` take effect on a guest that spins: kemu vs QEMU.

The guest is bench/irq_latency.py's bare-metal image with an endless
sample count: it spins with no exits at all between timer interrupts.  For
each machine, over one QMP connection: ``stop`` then ``cont`` N times, timing
each ``stop`` from the command's send to its reply (QEMU and kemu both reply
once the vCPUs have stopped), then ``quit``, timed to the end of the process.

    .venv/bin/python bench/stop_latency.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from boot_aarch64 import ensure_qemu  # noqa: E402
from irq_latency import build_guest  # noqa: E402

from kemu.testing.qmp_client import QmpClient  # noqa: E402


def measure(cmd: list[str], sock: Path, rounds: int) -> tuple[list[float], float]:
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        qmp = QmpClient(sock)
        time.sleep(0.5)                                 # let the guest start spinning
        stops = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            qmp.execute("stop")
            stops.append((time.perf_counter() - t0) * 1000)
            qmp.execute("cont")
            time.sleep(0.02)
        t0 = time.perf_counter()
        qmp.file.write(b'{"execute": "quit"}\n')
        qmp.file.flush()
        proc.wait(timeout=30)
        return stops, (time.perf_counter() - t0) * 1000
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()
    qemu = ensure_qemu()
    with tempfile.TemporaryDirectory() as tmp:
        image = build_guest(Path(tmp), 1 << 40)
        load = os.getloadavg()[0]
        rows = {}
        for name, prog in (("kemu", [sys.executable, "-m", "kemu.cli"]), ("qemu", [qemu])):
            sock = Path(tmp) / f"{name}.sock"
            cmd = [*prog, "-M", "virt", "-cpu", "cortex-a57", "-m", "128", "-display", "none",
                   "-serial", "none", "-kernel", str(image),
                   "-qmp", f"unix:{sock},server=on,wait=off"]
            rows[name] = measure(cmd, sock, args.rounds)
    print(f"QMP on a spinning guest, {args.rounds} stop/cont rounds each; "
          f"host load average {load:.2f}, {os.cpu_count()} CPUs")
    for name, (stops, quit_ms) in rows.items():
        print(f"{name:5s} stop: median {statistics.median(stops):6.2f} ms, "
              f"max {max(stops):6.2f} ms; quit to process exit {quit_ms:6.1f} ms")


if __name__ == "__main__":
    main()
