#!/usr/bin/env python3
"""TCP throughput host -> guest through user-mode networking: kemu vs qemu-system-aarch64.

The default guest (Debian's arm64 kernel + busybox) takes a DHCP lease and
runs ``nc -l -p PORT > /dev/null``; the host connects to 127.0.0.1 through
``hostfwd=tcp::HOSTPORT-:PORT``, sends ``--mib`` MiB and waits for the guest
to close the connection after the end of the data.  The time is measured on
the host, from connect to the guest's close.  Same guest, same virtio-mmio
NIC (``-device virtio-net-device``), alternating runs:

* kemu: ``-netdev user`` (passt);
* QEMU: ``-netdev user`` (libslirp), or ``--qemu-backend passt`` for
  passt through QEMU's ``-netdev stream`` (QEMU >= 7.2).

    .venv/bin/python bench/bench_net.py [--runs N] [--mib M] [--qemu-backend user|passt]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from boot_aarch64 import ensure_qemu

from kemu.guest.debian import default_guest

GUEST_PORT = 5001
DHCP = (r"""printf '%s\n' '#!/bin/sh' 'case "$1" in bound|renew) ip addr add "$ip/${subnet:-24}" """
        r"""dev "$interface"; [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"; """
        r"""for r in $router; do ip route add default via "$r"; break; done;; esac' """
        r"""> /tmp/d.sh; chmod +x /tmp/d.sh; ip link set eth0 up; """
        r"""udhcpc -i eth0 -n -q -s /tmp/d.sh >/dev/null 2>&1; echo DHCP-DONE""" "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_until(proc: subprocess.Popen, marker: bytes, seen: bytearray, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while marker not in seen:
        if time.monotonic() > deadline:
            raise SystemExit(f"timeout waiting for {marker!r}:\n{seen[-2000:].decode(errors='replace')}")
        chunk = proc.stdout.read1(4096)
        if not chunk:
            raise SystemExit(f"guest ended:\n{seen[-2000:].decode(errors='replace')}")
        seen += chunk


def measure(cmd: list[str], host_port: int, mib: int) -> float:
    """Boot, configure eth0, receive ``mib`` MiB from the host; returns MB/s."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    seen = bytearray()
    try:
        read_until(proc, b"# ", seen, 300)
        proc.stdin.write(DHCP.encode())
        proc.stdin.flush()
        read_until(proc, b"DHCP-DONE\r\n", seen, 120)
        proc.stdin.write(f"nc -l -p {GUEST_PORT} > /dev/null; echo NC-DONE\n".encode())
        proc.stdin.flush()
        time.sleep(2)
        chunk = b"\xa5" * (1 << 20)
        with socket.create_connection(("127.0.0.1", host_port), timeout=120) as s:
            start = time.monotonic()
            for _ in range(mib):
                s.sendall(chunk)
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):       # the guest's nc closes after the end of the data
                pass
            elapsed = time.monotonic() - start
        read_until(proc, b"NC-DONE\r\n", seen, 120)
        proc.stdin.write(b"poweroff -f\n")
        proc.stdin.flush()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return mib * (1 << 20) / 1e6 / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--qemu-backend", choices=("user", "passt"), default="user")
    args = ap.parse_args()
    guest = default_guest("aarch64", show_progress=False)
    qemu = ensure_qemu()
    common = ["-M", "virt", "-cpu", "cortex-a57", "-m", "256", "-nographic",
              "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", guest.append]
    results: dict[str, list[float]] = {"kemu": [], "qemu": []}
    for _ in range(args.runs):
        port = free_port()
        fwd = f"hostfwd=tcp::{port}-:{GUEST_PORT}"
        kemu = [sys.executable, "-m", "kemu.cli", *common, "-netdev", f"user,id=n0,{fwd}",
                "-device", "virtio-net-device,netdev=n0"]
        results["kemu"].append(measure(kemu, port, args.mib))
        port = free_port()
        if args.qemu_backend == "user":
            q = [qemu, *common, "-netdev", f"user,id=n0,hostfwd=tcp::{port}-:{GUEST_PORT}",
                 "-device", "virtio-net-device,netdev=n0"]
            results["qemu"].append(measure(q, port, args.mib))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                sock = f"{tmp}/passt.socket"
                os.chmod(tmp, 0o777)      # passt started as root binds as nobody
                passt = subprocess.Popen([shutil.which("passt"), "--foreground", "--quiet",
                                          "--socket", sock, "-t", f"{port}:{GUEST_PORT}"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                deadline = time.monotonic() + 10
                while not Path(sock).exists():
                    if passt.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("passt did not create its socket")
                    time.sleep(0.01)
                q = [qemu, *common, "-netdev",
                     f"stream,id=n0,server=off,addr.type=unix,addr.path={sock}",
                     "-device", "virtio-net-device,netdev=n0"]
                try:
                    results["qemu"].append(measure(q, port, args.mib))
                finally:
                    passt.terminate()
                    passt.wait()
    qemu_net = "slirp (-netdev user)" if args.qemu_backend == "user" else "passt (-netdev stream)"
    print(f"host -> guest TCP, {args.mib} MiB to 'nc -l' through hostfwd, {args.runs} runs, "
          f"medians; kemu: passt, QEMU: {qemu_net}")
    med = {k: statistics.median(v) for k, v in results.items()}
    for name, runs in results.items():
        print(f"{name:5s} {med[name]:8.2f} MB/s   runs: {', '.join(f'{r:.2f}' for r in runs)}")
    print(f"ratio kemu/QEMU: {med['kemu'] / med['qemu']:.3f}")


if __name__ == "__main__":
    main()
