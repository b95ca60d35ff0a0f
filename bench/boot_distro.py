#!/usr/bin/env python3
"""Boot of a whole Debian 12 arm64 system (systemd): kemu vs qemu-system-aarch64.

The disk image is built once by ``scripts/build-distro-image.py`` (into
~/.cache/kemu/distro; this script says so and stops when it is absent).
Each round boots it under kemu and under QEMU, alternately, with the same
command line for both, the image opened with ``-snapshot`` (it stays
pristine), and measures:

* boot to login: from the start of the process to ``login:`` on the serial
  console;
* the guest's own split: ``systemd-analyze`` (kernel, userspace; firmware
  and loader where the guest knows them) after logging in as root and
  ``systemctl is-system-running --wait``;
* ``systemd-detect-virt``, the guest's UTC clock against the host's;
* once per VMM (``--no-apt`` skips it): ``apt-get update`` over user
  networking, which needs the right wall clock (the RTC) and DNS;
* the time from ``systemctl poweroff`` to the VMM's exit and its status.

Two ways to boot, one disk:

* direct kernel boot (default): ``-M virt -cpu cortex-a57 -m 1024
  -nographic -snapshot -kernel vmlinuz -initrd initrd.img -append ...``,
  the disk on ``virtio-blk-device`` and ``-netdev user`` on
  ``virtio-net-device`` (virtio-mmio: the same devices under both VMMs);
* ``--firmware``: ``-M virt -cpu cortex-a57 -m 1024 -bios QEMU_EFI.fd
  -drive file=disk.raw,format=raw,if=virtio -nic user -nographic -snapshot``:
  EDK2 finds GRUB at EFI/BOOT/BOOTAA64.EFI on the disk's EFI system
  partition, GRUB loads Linux.  The firmware phase (start to GRUB's
  message) and the kernel phase (GRUB's message to login) are reported
  apart.  Where kemu cannot run the firmware yet, one line says so and
  QEMU's figures still print.

Reports each boot as a JSON line, the medians, the ratio kemu/QEMU of
boot-to-login per round, and the host's load average before and after.

    .venv/bin/python bench/boot_distro.py [--runs N] [--no-apt] [--firmware]
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
FIRMWARE = Path("/usr/share/qemu-efi-aarch64/QEMU_EFI.fd")
KEMU = [sys.executable, "-m", "kemu.cli"]
#: The EFI stub's first message, once GRUB has handed over to the kernel.
EFI_STUB = rb"EFI stub: Booting Linux Kernel"
LOGIN_TIMEOUT = 1200.0


def load_image() -> dict:
    try:
        return json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        raise SystemExit(f"no distro image ({MANIFEST} is missing): build it once with "
                         "scripts/bootstrap.sh --distro (root, about 15 minutes)") from None


def direct_boot_args(image: dict) -> list[str]:
    return ["-M", "virt", "-cpu", "cortex-a57", "-m", "1024", "-nographic", "-snapshot",
            "-kernel", image["kernel"], "-initrd", image["initrd"], "-append", image["append"],
            "-drive", f"file={image['disk']},format=raw,if=none,id=root",
            "-device", "virtio-blk-device,drive=root",
            "-netdev", "user,id=net0", "-device", "virtio-net-device,netdev=net0"]


def firmware_boot_args(image: dict) -> list[str]:
    return ["-M", "virt", "-cpu", "cortex-a57", "-m", "1024", "-bios", str(FIRMWARE),
            "-drive", f"file={image['disk']},format=raw,if=virtio", "-nic", "user",
            "-nographic", "-snapshot"]


class VmmEnded(Exception):
    """The VMM ended before the console showed what was awaited."""


class Serial:
    """The VMM's serial console on its stdio."""

    def __init__(self, argv: list[str]) -> None:
        self.start = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.out = bytearray()
        self._pos = 0
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while data := self.proc.stdout.read1(4096):
            with self._lock:
                self.out.extend(data)

    def tail(self, n: int = 3000) -> str:
        with self._lock:
            return self.out[-n:].decode(errors="replace")

    def expect(self, pattern: bytes, timeout: float) -> re.Match:
        return self.expect_marks({}, pattern, timeout)[0]

    def expect_marks(self, marks: dict[str, bytes], final: bytes, timeout: float
                     ) -> tuple[re.Match, dict[str, float]]:
        """Wait for ``final``; note when each of ``marks`` first appeared on the way
        (seconds from the start, under the mark's name; ``final``'s under "")."""
        end = time.monotonic() + timeout
        times: dict[str, float] = {}
        regex = re.compile(final)
        while time.monotonic() < end:
            with self._lock:
                for key, mark in marks.items():
                    if key not in times and re.search(mark, self.out):
                        times[key] = time.monotonic() - self.start
                m = regex.search(self.out, self._pos)
                if m:
                    self._pos = m.end()
                    times[""] = time.monotonic() - self.start
                    return m, times
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise VmmEnded(f"exited with status {self.proc.returncode} before "
                               f"{final.decode()!r}: {self.tail(400).strip()}")
            time.sleep(0.02)
        self.proc.kill()
        raise SystemExit(f"{final!r} not seen in {timeout:.0f} s; console:\n{self.tail()}")

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

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


_SPAN = re.compile(r"([\d.]+)(min|ms|s|h)\b")


def timespan(text: str) -> float:
    """systemd's time span (``1min 2.345s``, ``870ms``) in seconds."""
    unit = {"h": 3600, "min": 60, "s": 1, "ms": 0.001}
    return round(sum(float(v) * unit[u] for v, u in _SPAN.findall(text)), 3)


def analyze_split(text: str) -> dict[str, float]:
    """``Startup finished in 3.1s (firmware) + 20.5s (kernel) + 1min 2s (userspace) = ...``."""
    line = next((ln for ln in text.splitlines() if "Startup finished" in ln), "")
    body = line.split(" in ", 1)[-1].split(" = ")[0]
    return {f"{phase}_s": timespan(span)
            for span, phase in re.findall(r"([\d.minsh ]+?) \((\w+)\)", body)}


def one_boot(name: str, argv: list[str], apt: bool, marks: dict[str, bytes]) -> dict:
    vm = Serial(argv)
    try:
        _, seen = vm.expect_marks(marks, rb"login: ", LOGIN_TIMEOUT)
        result: dict = {"vmm": name, "login_s": round(seen.pop(""), 2)}
        for key, t in seen.items():
            result[f"to_{key}_s"] = round(t, 2)
        if "grub" in seen:
            result["firmware_phase_s"] = round(seen["grub"], 2)
            result["kernel_phase_s"] = round(result["login_s"] - seen["grub"], 2)
        vm.send("root\n")
        vm.expect(rb"# ", 120)
        vm.send("export TERM=dumb PS1='# '\n")
        vm.expect(rb"# ", 60)
        state, _ = vm.run("systemctl is-system-running --wait", 600)
        analyze, _ = vm.run("systemd-analyze", 120)
        virt, _ = vm.run("systemd-detect-virt")
        failed, _ = vm.run("systemctl --failed --no-legend --plain | wc -l")
        guest_now, _ = vm.run("date -u +%s")
        skew = None
        if guest_now.splitlines() and guest_now.splitlines()[-1].isdigit():
            skew = int(guest_now.splitlines()[-1]) - round(time.time())
        result.update({"state": (state.splitlines() or [""])[-1],
                       "virt": (virt.splitlines() or [""])[-1],
                       "failed_units": (failed.splitlines() or [""])[-1],
                       "clock_skew_s": skew,
                       "analyze": next((ln for ln in analyze.splitlines()
                                        if "Startup finished" in ln), analyze[:200])})
        result.update(analyze_split(analyze))
        if apt:
            out, rc = vm.run("apt-get update >/tmp/apt.log 2>&1; rc=$?; tail -4 /tmp/apt.log; "
                             "test $rc = 0", 900)
            result["apt_update"] = "ok" if rc == 0 else out.splitlines()[-2:]
        t0 = time.monotonic()
        vm.send("systemctl poweroff\n")
        try:
            rc = vm.proc.wait(300)
        except subprocess.TimeoutExpired:
            rc = "no exit in 300 s"
        result["poweroff_s"] = round(time.monotonic() - t0, 2)
        result["exit"] = rc
        return result
    finally:
        vm.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="rounds (one kemu and one QEMU boot each)")
    ap.add_argument("--no-apt", action="store_true", help="skip apt-get update in the guest")
    ap.add_argument("--firmware", action="store_true",
                    help="boot through EDK2 (-bios QEMU_EFI.fd) and GRUB from the disk")
    ap.add_argument("--only", choices=("kemu", "qemu"), help="boot under one VMM only")
    args = ap.parse_args()
    image = load_image()
    qemu = shutil.which("qemu-system-aarch64")
    if qemu is None:
        raise SystemExit("qemu-system-aarch64 is missing (apt-get install qemu-system-arm)")
    if args.firmware:
        if not FIRMWARE.exists():
            raise SystemExit(f"{FIRMWARE} is missing (apt-get install qemu-efi-aarch64)")
        cmdline = firmware_boot_args(image)
        marks = {"grub": image["grub_mark"].encode(), "efi_stub": EFI_STUB}
    else:
        cmdline = direct_boot_args(image)
        marks = {}
    print(f"command line (both VMMs): {' '.join(cmdline)}")
    print(f"load before: {os.getloadavg()}", flush=True)
    vmms = {"kemu": KEMU + cmdline, "qemu": [qemu] + cmdline}
    if args.only:
        vmms = {args.only: vmms[args.only]}
    rows = []
    for i in range(args.runs):
        order = list(vmms.items())
        if i % 2:
            order.reverse()
        for name, argv in order:
            if name not in vmms:
                continue
            apt = not args.no_apt and not any(r["vmm"] == name for r in rows)
            try:
                row = one_boot(name, argv, apt, marks)
            except VmmEnded as e:
                if name != "kemu" or not args.firmware:
                    raise SystemExit(f"{name}: {e}") from None
                print(f"kemu: cannot boot through firmware here ({e}); QEMU only",
                      flush=True)
                del vmms[name]
                continue
            row["round"] = i
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"load after: {os.getloadavg()}")
    summarize(rows, args.runs, args.firmware)


def summarize(rows: list[dict], runs: int, firmware: bool) -> None:
    def med(vmm: str, key: str) -> float | None:
        values = [r[key] for r in rows if r["vmm"] == vmm and r.get(key) is not None]
        return round(statistics.median(values), 2) if values else None

    keys = ["login_s", "kernel_s", "userspace_s", "poweroff_s"]
    if firmware:
        keys[1:1] = ["firmware_phase_s", "to_efi_stub_s", "kernel_phase_s"]
    for key in keys:
        print(f"median {key}: kemu {med('kemu', key)}  qemu {med('qemu', key)}")
    ratios = []
    for i in range(runs):
        k = next((r for r in rows if r["round"] == i and r["vmm"] == "kemu"), None)
        q = next((r for r in rows if r["round"] == i and r["vmm"] == "qemu"), None)
        if k and q:
            ratios.append(k["login_s"] / q["login_s"])
    if ratios:
        print(f"boot-to-login ratio kemu/QEMU: median {statistics.median(ratios):.2f} "
              f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    else:
        print("boot-to-login ratio kemu/QEMU: n/a (not both VMMs booted)")


if __name__ == "__main__":
    main()
