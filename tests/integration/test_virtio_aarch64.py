"""Virtio devices on the aarch64 virt board under TCG, driven by Debian's kernel."""

import re
import subprocess
import sys

KEMU = [sys.executable, "-m", "kemu.cli"]


def boot(args, script: str, timeout=180):
    proc = subprocess.run(KEMU + ["run", *args], input=script.encode(), capture_output=True,
                          timeout=timeout)
    out = proc.stdout.decode(errors="replace").replace("\r", "")
    assert proc.returncode == 0, f"{proc.stderr.decode()}\n{out[-3000:]}"
    return out


def test_rng_gives_entropy(guest):
    out = boot(["-device", "virtio-rng-device"],
               "cat /sys/class/misc/hw_random/rng_current\n"
               "echo DISTINCT=$(head -c 4096 /dev/hwrng | od -An -tx1 -v | tr -s ' ' '\\n'"
               " | sort -u | wc -l)\n"
               "poweroff -f\n")
    assert "virtio_rng.0" in out
    distinct = int(re.search(r"DISTINCT=(\d+)", out).group(1))
    assert distinct > 200                      # 4 KiB of real entropy covers most byte values
