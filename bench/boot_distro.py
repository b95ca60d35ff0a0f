#!/usr/bin/env python3
"""Boot of a whole Debian 12 arm64 system (systemd): kemu vs qemu-system-aarch64.

The image is built once by ``scripts/build-distro-image.py`` (into
~/.cache/kemu/distro; this script says so and stops when it is absent).
Each round boots it under kemu and under QEMU, alternately, with the same
command line as a distro user gives it (``-M virt -cpu cortex-a57 -m 1024
-snapshot``, the image as a virtio disk, ``-nic user``, Debian's own kernel
and initramfs), and measures:

* boot to login: from the start of the process to ``login:`` on the serial
  console;
* the guest's own split: ``systemd-analyze`` (kernel, userspace) after
  logging in as root and ``systemctl is-system-running --wait``;
* ``systemd-detect-virt`` (QEMU's guest says ``qemu``);
* once per VMM (``--apt``, on by default): ``apt-get update`` over user
  networking, which needs the right wall clock (the RTC) and DNS;
* the time from ``systemctl poweroff`` to the VMM's exit status 0.

Reports per round and the medians, the ratio kemu/QEMU of boot-to-login,
and the host's load average before and after.

    .venv/bin/python bench/boot_distro.py [--runs N] [--no-apt]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

MANIFEST = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
            / "kemu" / "distro" / "debian12-arm64" / "manifest.json")
KEMU = [sys.executable, "-m", "kemu.cli"]


def load_image() -> dict:
    try:
        return json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        raise SystemExit(f"no distro image ({MANIFEST} is missing): build it once with "
                         "scripts/build-distro-image.py (root, tens of minutes)") from None


def command_line(image: dict) -> list[str]:
    return ["-M", "virt", "-cpu", "cortex-a57", "-m", "1024", "-nographic", "-snapshot",
            "-kernel", image["kernel"], "-initrd", image["initrd"], "-append", image["append"],
            "-drive", f"file={image['disk']},format=raw,if=none,id=root",
            "-device", "virtio-blk-device,drive=root",
            "-netdev", "user,id=net0", "-device", "virtio-net-device,netdev=net0"]


class Serial:
    """The VMM's serial console on its stdio."""

    def __init__(self, argv: list[str]) -> None:
        self.start = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.out = bytearray()
        self._pos = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while data := self.proc.stdout.read1(4096):
            with self._lock:
                self.out.extend(data)

    def expect(self, pattern: bytes, timeout: float) -> re.Match:
        end = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < end:
            with self._lock:
                m = regex.search(self.out, self._pos)
                if m:
                    self._pos = m.end()
                    return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.proc.kill()
        raise SystemExit(f"{pattern!r} not seen; console:\n"
                         f"{self.out[-3000:].decode(errors='replace')}")

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def run(self, command: str, timeout: float = 120) -> tuple[str, int]:
        """Output and status of a shell command (markers the echoed line cannot match)."""
        self.send(f"echo __S''__; {command}; echo __RC''=$?__\n")
        start = self.expect(rb"__S__\r?\n", 60).end()
        m = self.expect(rb"__RC=(\d+)__", timeout)
        text = self.out[start:m.start()].decode(errors="replace").replace("\r", "")
        return text.strip(), int(m.group(1))


def one_boot(name: str, argv: list[str], apt: bool) -> dict:
    vm = Serial(argv)
    vm.expect(rb"login: ", 900)
    login = time.monotonic() - vm.start
    vm.send("root\n")
    vm.expect(rb"# ", 120)
    vm.send("export TERM=dumb PS1='# '\n")
    vm.expect(rb"# ", 60)
    state, _ = vm.run("systemctl is-system-running --wait", 600)
    analyze, _ = vm.run("systemd-analyze", 120)
    virt, _ = vm.run("systemd-detect-virt")
    failed, _ = vm.run("systemctl --failed --no-legend --plain | wc -l")
    m = re.search(r"([\d.]+)(min|s|ms) \(kernel\) \+ (?:([\d.]+)min )?([\d.]+)(s|ms) "
                  r"\(userspace\)", analyze)
    result = {"vmm": name, "login_s": round(login, 2), "state": state.splitlines()[-1:],
              "virt": virt.splitlines()[-1:], "failed_units": failed.splitlines()[-1:],
              "analyze": analyze.splitlines()[0] if analyze else ""}
    if m:
        def secs(value: str, unit: str) -> float:
            return float(value) * {"min": 60, "s": 1, "ms": 0.001}[unit]
        result["kernel_s"] = secs(m.group(1), m.group(2))
        result["userspace_s"] = (float(m.group(3) or 0) * 60) + secs(m.group(4), m.group(5))
    if apt:
        out, rc = vm.run("apt-get update 2>&1 | tail -3", 600)
        _, ok = vm.run("apt-get update -qq 2>/dev/null", 600)
        result["apt_update"] = "ok" if ok == 0 else out.splitlines()[-1:]
    t0 = time.monotonic()
    vm.send("systemctl poweroff\n")
    rc = vm.proc.wait(300)
    result["poweroff_s"] = round(time.monotonic() - t0, 2)
    result["exit"] = rc
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3, help="rounds (one kemu and one QEMU boot each)")
    ap.add_argument("--no-apt", action="store_true", help="skip apt-get update in the guest")
    args = ap.parse_args()
    image = load_image()
    qemu = shutil.which("qemu-system-aarch64")
    if qemu is None:
        raise SystemExit("qemu-system-aarch64 is missing (apt-get install qemu-system-arm)")
    cmdline = command_line(image)
    print(f"load before: {os.getloadavg()}")
    rows = []
    for i in range(args.runs):
        apt = not args.no_apt and i == 0
        order = [("kemu", KEMU + cmdline), ("qemu", [qemu] + cmdline)]
        if i % 2:
            order.reverse()
        for name, argv in order:
            row = one_boot(name, argv, apt)
            row["round"] = i
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"load after: {os.getloadavg()}")

    def med(vmm: str, key: str) -> float | None:
        values = [r[key] for r in rows if r["vmm"] == vmm and key in r]
        return statistics.median(values) if values else None

    ratios = []
    for i in range(args.runs):
        k = next(r for r in rows if r["round"] == i and r["vmm"] == "kemu")
        q = next(r for r in rows if r["round"] == i and r["vmm"] == "qemu")
        ratios.append(k["login_s"] / q["login_s"])
    for key in ("login_s", "kernel_s", "userspace_s", "poweroff_s"):
        print(f"median {key}: kemu {med('kemu', key)}  qemu {med('qemu', key)}")
    print(f"boot-to-login ratio kemu/QEMU: median {statistics.median(ratios):.2f} "
          f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
