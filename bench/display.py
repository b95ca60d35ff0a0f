#!/usr/bin/env python3
"""The screen under load: kemu vs qemu-system-aarch64, side by side, one VNC client each.

Both run the default guest's display flavour (Debian's generic arm64 kernel,
virtio-gpu, fbcon) with ``-device virtio-gpu-device -device
virtio-keyboard-device -vnc 127.0.0.1:N -global virtio-mmio.force-legacy=false``
(QEMU 7.2's virtio-gpu is modern only).  Once booted, the guest scrolls its
screen (``while :; do dmesg; done > /dev/tty1``) while one VNC client (the
minimal RFB client below, asking for ZRLE, CopyRect and Raw, the same for
both) keeps one incremental FramebufferUpdateRequest outstanding.  Measured
over ``--seconds``: updates (frames) received per second, bytes per frame,
and the emulator's host CPU (user + system).  Then the loop is stopped, the
cursor's blinking turned off, and the idle screen watched for the same time:
bytes sent per second and per frame.

    .venv/bin/python bench/display.py [--rounds N] [--seconds S]

Rounds alternate kemu and QEMU; the report gives each round and the ratio
kemu/QEMU of the medians.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

from kemu.guest.debian import default_guest
from kemu.testing.stdio_console import cpu_seconds


class Guest:
    """An emulator process with the serial console on stdio."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.out = b""
        self._pos = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while data := self.proc.stdout.read1(65536):
            self.out += data
            if len(self.out) > 1 << 20:
                self.out = self.out[-65536:]
                self._pos = 0

    def expect(self, pattern: bytes, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < end:
            m = rx.search(self.out, self._pos)
            if m:
                self._pos = m.end()
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit(f"guest did not show {pattern!r}: {self.out[-500:]!r}")

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class RfbCounter:
    """A minimal RFB 3.8 client: keeps an incremental request outstanding, counts updates."""

    def __init__(self, port: int) -> None:
        for _ in range(200):
            try:
                self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except OSError:
                time.sleep(0.1)
        self.buf = b""
        self.frames = 0
        self.bytes = 0
        assert self._recv(12).startswith(b"RFB 003.")
        self.sock.sendall(b"RFB 003.008\n")
        n = self._recv(1)[0]
        types = self._recv(n)
        assert 1 in types, "the bench wants no authentication"
        self.sock.sendall(b"\x01")
        assert struct.unpack(">I", self._recv(4))[0] == 0
        self.sock.sendall(b"\x01")
        self.width, self.height = struct.unpack(">HH", self._recv(4))
        self._recv(16)
        self._recv(struct.unpack(">I", self._recv(4))[0])
        encodings = [16, 1, 0, -223]        # ZRLE, CopyRect, Raw, DesktopSize
        self.sock.sendall(struct.pack(">BxH", 2, len(encodings))
                          + struct.pack(f">{len(encodings)}i", *encodings))
        self._stop = False
        self.request(False)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _recv(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("server closed")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        self.bytes += n
        return data

    def request(self, incremental: bool) -> None:
        self.sock.sendall(struct.pack(">BBHHHH", 3, incremental, 0, 0, self.width, self.height))

    def _loop(self) -> None:
        try:
            while not self._stop:
                kind = self._recv(1)[0]
                if kind == 0:
                    self._update()
                    self.frames += 1
                    self.request(True)
                elif kind == 2:                    # Bell
                    pass
                elif kind == 3:                    # ServerCutText
                    self._recv(3)
                    self._recv(struct.unpack(">I", self._recv(4))[0])
                else:
                    raise SystemExit(f"unexpected server message {kind}")
        except (OSError, ConnectionError):
            pass

    def _update(self) -> None:
        self._recv(1)
        (n,) = struct.unpack(">H", self._recv(2))
        for _ in range(n):
            _x, _y, w, h, enc = struct.unpack(">HHHHi", self._recv(12))
            if enc == 0:
                self._recv(w * h * 4)
            elif enc == 1:
                self._recv(4)
            elif enc == 16:
                self._recv(struct.unpack(">I", self._recv(4))[0])
            elif enc == -223:
                self.width, self.height = w, h
            else:
                raise SystemExit(f"unexpected encoding {enc}")

    def sample(self) -> tuple[int, int]:
        return self.frames, self.bytes

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def run_one(name: str, argv: list[str], port: int, seconds: float) -> dict:
    guest = Guest(argv)
    try:
        guest.expect(rb"# ")
        guest.send("echo 0 > /sys/class/graphics/fbcon/cursor_blink; echo ready-$((1+1))\n")
        guest.expect(rb"ready-2")
        client = RfbCounter(port)
        time.sleep(1.0)                       # the first full frame
        guest.send("while :; do dmesg; done > /dev/tty1\n")
        time.sleep(1.0)
        f0, b0, c0, t0 = *client.sample(), cpu_seconds(guest.proc.pid), time.monotonic()
        time.sleep(seconds)
        f1, b1, c1, t1 = *client.sample(), cpu_seconds(guest.proc.pid), time.monotonic()
        guest.send("\x03")
        guest.send("echo stopped-$((2+2))\n")
        guest.expect(rb"stopped-4")
        time.sleep(1.5)                       # let the last lines reach the client
        g0, d0 = client.sample()
        time.sleep(seconds)
        g1, d1 = client.sample()
        client.close()
        frames = f1 - f0
        return {"name": name, "fps": frames / (t1 - t0),
                "bytes_per_frame": (b1 - b0) / frames if frames else 0.0,
                "cpu": (c1 - c0) / (t1 - t0),
                "idle_bytes_per_s": (d1 - d0) / seconds, "idle_frames": g1 - g0}
    finally:
        guest.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    qemu = shutil.which("qemu-system-aarch64")
    if qemu is None:
        raise SystemExit("qemu-system-aarch64 is missing (apt-get install qemu-system-arm)")
    image = default_guest("aarch64-display", show_progress=False)
    common = ["-M", "virt", "-cpu", "cortex-a57", "-m", "256", "-kernel", str(image.kernel),
              "-initrd", str(image.initrd), "-append", image.append,
              "-global", "virtio-mmio.force-legacy=false",
              "-device", "virtio-gpu-device", "-device", "virtio-keyboard-device",
              "-serial", "stdio", "-monitor", "none", "-display", "none", "-nodefaults"]
    kemu = [sys.executable, "-m", "kemu.cli"]
    results: dict[str, list[dict]] = {"kemu": [], "qemu": []}
    for r in range(args.rounds):
        for name, base, display in (("kemu", kemu, 371), ("qemu", [qemu], 372)):
            res = run_one(name, base + common + ["-vnc", f"127.0.0.1:{display}"],
                          5900 + display, args.seconds)
            results[name].append(res)
            print(f"round {r + 1} {name}: {res['fps']:.1f} frames/s, "
                  f"{res['bytes_per_frame'] / 1024:.1f} KiB/frame, CPU {res['cpu']:.2f} s/s; "
                  f"idle: {res['idle_bytes_per_s']:.0f} B/s in {res['idle_frames']} frames",
                  flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "name"}
           for name, rs in results.items()}
    k, q = med["kemu"], med["qemu"]
    print(f"median kemu: {k['fps']:.1f} frames/s, CPU {k['cpu']:.2f} s/s "
          f"({1000 * k['cpu'] / k['fps']:.0f} ms/frame); QEMU: {q['fps']:.1f} frames/s, "
          f"CPU {q['cpu']:.2f} s/s ({1000 * q['cpu'] / q['fps']:.0f} ms/frame); "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"kemu/QEMU: frames/s {k['fps'] / q['fps']:.2f}x, CPU {k['cpu'] / q['cpu']:.2f}x, "
          f"bytes/frame {k['bytes_per_frame'] / max(q['bytes_per_frame'], 1):.2f}x; "
          f"idle bytes/s kemu {k['idle_bytes_per_s']:.0f}, QEMU {q['idle_bytes_per_s']:.0f}")


if __name__ == "__main__":
    main()
