#!/usr/bin/env python3
"""Restore latency, memory per forked copy and live migration: kemu vs QEMU, side by side.

The default aarch64 guest with 256 MiB on both (``-M virt -cpu cortex-a57``,
the same kernel, initramfs and command line), booted to its shell.

* Restore latency, from the command to the guest answering on its console:
  QEMU's ``-incoming "exec:cat FILE"`` of a stream its ``migrate`` wrote to
  a file, beside kemu's ``-incoming`` of its own stream the same way (a new
  process each), and kemu's in-process ``Machine.restore(dir)``.
* Memory per forked copy: ``Machine.fork(n)``, the process's PSS growth per
  copy and the guest RAM each copy dirtied (its private pages of the
  snapshot's memory file), and forks per second; beside the PSS of one QEMU
  process restored with ``-incoming``.
* Live migration of a guest dirtying memory in a loop (``dd`` from
  /dev/urandom into a file in RAM) over a UNIX socket to a destination
  process, the same ``max-bandwidth`` and ``downtime-limit`` on both: total
  time and downtime as ``query-migrate`` reports them.

    .venv/bin/python bench/snapshot_aarch64.py [--runs N] [--copies N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kemu.guest.debian import default_guest
from kemu.testing.qmp_client import QmpClient

KEMU = [sys.executable, "-m", "kemu.cli"]
DIRTY = ("(while true; do dd if=/dev/urandom of=/tmp/noise bs=64k count=32 2>/dev/null; "
         "done) & :\n")
PARAMS = {"max-bandwidth": 1 << 30, "downtime-limit": 300}


def qemu_binary() -> str:
    qemu = shutil.which("qemu-system-aarch64")
    if not qemu:
        raise SystemExit("qemu-system-aarch64 is not installed (apt-get install qemu-system-arm)")
    return qemu


def machine_args(guest) -> list[str]:
    return ["-M", "virt", "-cpu", "cortex-a57", "-m", "256", "-kernel", str(guest.kernel),
            "-initrd", str(guest.initrd), "-append", guest.append, "-display", "none",
            "-monitor", "none", "-serial", "stdio"]


class Proc:
    """A VMM process with its console on stdio."""

    def __init__(self, cmd: list[str]) -> None:
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.out = b""
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while data := self.proc.stdout.read1(65536):
            with self._cond:
                self.out += data
                self._cond.notify_all()

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def expect(self, marker: bytes, timeout: float = 120, start: int = 0) -> float:
        with self._cond:
            if not self._cond.wait_for(lambda: marker in self.out[start:], timeout):
                raise SystemExit(f"{marker!r} not seen: {self.out[-500:]!r}")
        return time.perf_counter()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Qmp(QmpClient):
    def run(self, name: str, **args):
        return self.execute(name, **args)

    def wait_migration(self) -> dict:
        info = super().wait_migration(("completed", "failed", "cancelled"), 300)
        if info["status"] != "completed":
            raise SystemExit(f"migration {info['status']}: {info}")
        return info


def boot(cmd: list[str], qmp_path: Path) -> tuple[Proc, Qmp]:
    p = Proc(cmd + ["-qmp", f"unix:{qmp_path},server=on,wait=off"])
    p.expect(b"# ")
    p.send("echo booted-$((40+2))\n")
    p.expect(b"booted-42")
    return p, Qmp(qmp_path)


def pss_kib(pid: int | str) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def answer_after(p: Proc, timeout: float = 120, interval: float = 0.02) -> float:
    """Seconds from the process start to the guest's answer on its console.

    The command is typed again every ``interval`` seconds until the answer
    comes: what is typed before the guest's UART listens may be dropped
    (QEMU's), or taken by the shell's line editor as the answer to the
    cursor-position query it had sent before the save.  (Under nested TCG a
    16550 fed every 20 ms overruns and no whole line gets through: longer.)"""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        p.send("echo answer-$((6*7))\n")
        with p._cond:
            if p._cond.wait_for(lambda: b"answer-42" in p.out, interval):
                return time.perf_counter() - p.started
    raise SystemExit(f"no answer: {p.out[-500:]!r}")


# -- restore latency ---------------------------------------------------------------------------
def saved_stream(cmd: list[str], tmp: Path, name: str) -> Path:
    """Boot, then ``migrate`` into a file (QEMU's way of saving a machine)."""
    p, q = boot(cmd, tmp / f"{name}.qmp")
    try:
        out = tmp / f"{name}.stream"
        # running: QEMU's stream then says so, and -incoming starts the guest
        q.run("migrate", uri=f"exec:cat > {out}")
        q.wait_migration()
        return out
    finally:
        p.close()


def restore_latency(args, guest, tmp: Path) -> None:
    qemu = [qemu_binary()] + machine_args(guest)
    kemu = KEMU + machine_args(guest)
    from kemu import Machine
    compare_restores(qemu, kemu, lambda: Machine.default_guest(memory="256M"), args.runs, tmp,
                     "256 MiB guest")


def compare_restores(qemu: list[str], kemu: list[str], make_source, runs: int, tmp: Path,
                     what: str, timeout: float = 120, interval: float = 0.02) -> None:
    """Restore latency of QEMU's and kemu's ``-incoming "exec:cat FILE"`` (new
    processes) and of kemu's in-process ``Machine.restore``, ``runs`` times each,
    printed with the ratios to QEMU.  ``make_source()``: an unstarted kemu Machine
    of the same guest, booted here and snapshotted for ``Machine.restore``."""
    qfile = saved_stream(qemu, tmp, "qemu")
    kfile = saved_stream(kemu, tmp, "kemu")
    from kemu import Machine
    from kemu.api import ConsoleTimeout
    src = make_source()
    src.start()
    src.console.expect("# ", timeout=timeout)
    src.console.run("true", timeout)
    snap = tmp / "snap"
    src.snapshot(snap)
    src.kill()
    results = {"qemu -incoming": [], "kemu -incoming": [], "kemu Machine.restore": []}
    for _ in range(runs):
        for label, cmd in (("qemu -incoming", qemu + ["-incoming", f"exec:cat {qfile}"]),
                           ("kemu -incoming", kemu + ["-incoming", f"exec:cat {kfile}"])):
            p = Proc(cmd)
            try:
                results[label].append(answer_after(p, timeout, interval))
                if label == "qemu -incoming":
                    results.setdefault("qemu restored PSS KiB", []).append(pss_kib(p.proc.pid))
            finally:
                p.close()
        t0 = time.perf_counter()
        vm = Machine.restore(snap, overlay_dir=tmp, tag="bench")
        while True:
            vm.console.write("echo answer-$((6*7))\n")
            try:
                vm.console.expect("answer-42", timeout=interval)
                break
            except ConsoleTimeout:
                if time.perf_counter() - t0 > timeout:
                    raise
        results["kemu Machine.restore"].append(time.perf_counter() - t0)
        vm.kill()
    print(f"\nrestore latency, command to console answer, {what} ({runs} runs, median):")
    q = statistics.median(results["qemu -incoming"])
    for label in ("qemu -incoming", "kemu -incoming", "kemu Machine.restore"):
        m = statistics.median(results[label])
        print(f"  {label:24s} {m * 1000:8.0f} ms   ratio to QEMU {m / q:.2f}x   "
              f"(runs: {', '.join(f'{x * 1000:.0f}' for x in results[label])})")
    print(f"  QEMU restored process PSS: {statistics.median(results['qemu restored PSS KiB'])} KiB"
          f"  (stream sizes: QEMU {qfile.stat().st_size >> 20} MiB, "
          f"kemu {kfile.stat().st_size >> 20} MiB)")


# -- fork ----------------------------------------------------------------------------------------
def fork_memory(args, tmp: Path) -> None:
    from kemu import Machine
    vm = Machine.default_guest(memory="256M")
    vm.start()
    vm.console.expect("# ", timeout=120)
    vm.console.run("true")
    before = pss_kib("self")
    t0 = time.perf_counter()
    copies = vm.fork(args.copies, tmp / "fork")
    forked = time.perf_counter() - t0
    try:
        for c in copies:
            c.console.run("echo hello > /tmp/x && cat /tmp/x", timeout=60)
        grown = pss_kib("self") - before
        dirty = []
        with open("/proc/self/smaps") as f:
            current = None
            for line in f:
                fields = line.split()
                if "-" in fields[0] and len(fields) >= 5:
                    current = fields[-1].endswith("fork/memory.ram")
                elif current and fields[0] == "Private_Dirty:":
                    dirty.append(int(fields[1]))
    finally:
        for c in copies:
            c.kill()
        vm.kill()
    print(f"\nfork of a 256 MiB guest into {args.copies} copies (in one process):")
    print(f"  {args.copies / forked:.1f} forks/s ({forked:.2f} s for {args.copies}, snapshot "
          f"included)")
    print(f"  process PSS grew {grown >> 10} MiB: {grown / args.copies / 1024:.1f} MiB per copy "
          f"(engine, translation cache and the pages it dirtied; a full copy of RAM would be "
          f"256 MiB)")
    print(f"  guest RAM dirtied per copy: {statistics.median(dirty) / 1024:.1f} MiB "
          f"(median of {len(dirty)})")


# -- live migration --------------------------------------------------------------------------------
def migrate_once(cmd: list[str], tmp: Path, name: str) -> dict:
    src, qs = boot(cmd, tmp / f"{name}-src.qmp")
    sock = tmp / f"{name}-mig.sock"
    dst = Proc(cmd + ["-qmp", f"unix:{tmp / f'{name}-dst.qmp'},server=on,wait=off",
                      "-incoming", f"unix:{sock}"])
    try:
        qd = Qmp(tmp / f"{name}-dst.qmp")
        src.send(DIRTY)
        time.sleep(2)
        qs.run("migrate-set-parameters", **PARAMS)
        qs.run("migrate", uri=f"unix:{sock}")
        info = qs.wait_migration()
        dst.send("echo moved-$((6*7))\n")
        dst.expect(b"moved-42", 60)
        del qd
        return info
    finally:
        src.close()
        dst.close()
        for f in tmp.glob(f"{name}-*"):
            f.unlink()


def live_migration(args, guest, tmp: Path) -> None:
    compare_live_migrations([qemu_binary()] + machine_args(guest), KEMU + machine_args(guest),
                            args.runs, tmp)


def compare_live_migrations(qemu: list[str], kemu: list[str], runs: int, tmp: Path) -> None:
    """``runs`` live migrations of each peer's guest (booted with ``qemu`` / ``kemu``)
    while it dirties memory; total time and downtime, with the ratios."""
    rows = {"qemu": [], "kemu": []}
    for _ in range(runs):
        rows["qemu"].append(migrate_once(qemu, tmp, "qemu"))
        rows["kemu"].append(migrate_once(kemu, tmp, "kemu"))
    print(f"\nlive migration over a UNIX socket, guest dirtying memory ({runs} runs, median; "
          f"max-bandwidth {PARAMS['max-bandwidth'] >> 20} MiB/s, downtime-limit "
          f"{PARAMS['downtime-limit']} ms on both):")
    med = {}
    for who, infos in rows.items():
        total = statistics.median(i["total-time"] for i in infos)
        down = statistics.median(i["downtime"] for i in infos)
        sent = statistics.median(i["ram"]["transferred"] for i in infos)
        passes = statistics.median(i["ram"]["dirty-sync-count"] for i in infos)
        med[who] = (total, down)
        print(f"  {who}: total {total:.0f} ms, downtime {down:.0f} ms, "
              f"{sent / (1 << 20):.1f} MiB sent, {passes:.0f} passes")
    print(f"  ratio kemu/QEMU: total {med['kemu'][0] / med['qemu'][0]:.2f}x, downtime "
          f"{med['kemu'][1] / max(med['qemu'][1], 1):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--only", choices=("restore", "fork", "migrate"))
    args = ap.parse_args()
    guest = default_guest("aarch64", show_progress=False)
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="kemu-bench-snap-") as d:
        tmp = Path(d)
        if args.only in (None, "restore"):
            restore_latency(args, guest, tmp)
        if args.only in (None, "fork"):
            fork_memory(args, tmp)
        if args.only in (None, "migrate"):
            live_migration(args, guest, tmp)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
