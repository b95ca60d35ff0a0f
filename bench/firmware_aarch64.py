#!/usr/bin/env python3
"""EDK2 (Debian's qemu-efi-aarch64 QEMU_EFI.fd) from reset to its UEFI shell:
kemu vs qemu-system-aarch64 on the same command line, alternately, in one run.

Measures, per round, the wall time from the start of the process to the
first byte on the serial console (the VMM's own start-up) and to the
shell's ``Shell>`` prompt (the 5 s startup.nsh countdown is skipped by a
key press as soon as it shows, for both), then the medians and the ratio
kemu/QEMU, and the host's load average before and after.

    .venv/bin/python bench/firmware_aarch64.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

EDK2 = Path("/usr/share/qemu-efi-aarch64/QEMU_EFI.fd")
ARGS = ["-M", "virt", "-cpu", "cortex-a57", "-m", "512", "-nographic", "-nic", "none",
        "-bios", str(EDK2)]
KEMU = [sys.executable, "-m", "kemu.cli"]


def one_run(command: list[str], timeout: float = 900.0) -> tuple[float, float]:
    """(seconds to first console output, seconds to the shell prompt)."""
    start = time.monotonic()
    proc = subprocess.Popen(command + ARGS, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    os.set_blocking(proc.stdout.fileno(), False)
    buf = b""
    first = None
    skipped = False
    try:
        while time.monotonic() - start < timeout:
            chunk = proc.stdout.read(65536)
            if chunk:
                if first is None:
                    first = time.monotonic() - start
                buf += chunk
                if not skipped and b"startup.nsh" in buf:
                    proc.stdin.write(b"\x1b")    # skip the countdown, as a user would
                    proc.stdin.flush()
                    skipped = True
                if b"Shell> " in buf:
                    return first, time.monotonic() - start
            elif proc.poll() is not None:
                break
            else:
                time.sleep(0.005)
        raise SystemExit(f"{command[0]}: no shell prompt; console:\n"
                         f"{buf[-2000:].decode(errors='replace')}")
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    opts = ap.parse_args()
    if not EDK2.is_file():
        raise SystemExit(f"{EDK2} is missing (apt-get install qemu-efi-aarch64)")
    qemu = shutil.which("qemu-system-aarch64")
    if qemu is None:
        raise SystemExit("qemu-system-aarch64 is missing")
    load0 = os.getloadavg()
    results: dict[str, list[tuple[float, float]]] = {"kemu": [], "qemu": []}
    for i in range(opts.runs):
        for name, command in (("kemu", KEMU), ("qemu", [qemu])):
            first, shell = one_run(command)
            results[name].append((first, shell))
            print(f"round {i + 1} {name}: first output {first:.2f} s, shell {shell:.2f} s",
                  flush=True)
    med = {name: statistics.median(s for _, s in runs) for name, runs in results.items()}
    print(f"median to shell: kemu {med['kemu']:.2f} s, QEMU {med['qemu']:.2f} s, "
          f"kemu/QEMU {med['kemu'] / med['qemu']:.2f}x")
    print(f"load average before {load0[0]:.1f}, after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
