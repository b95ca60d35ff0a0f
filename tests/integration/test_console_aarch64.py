"""virtio-console on the aarch64 virt board: the guest writes to hvc0, the host sees it."""

import subprocess
import sys

KEMU = [sys.executable, "-m", "kemu.cli"]


def test_guest_writes_to_hvc0(guest):
    proc = subprocess.run(
        KEMU + ["run", "-device", "virtio-serial-device", "-device", "virtconsole"],
        check=False, input=b"ls /sys/class/tty/ | grep hvc0\n"
              b"echo from-hvc0-$((6*7)) > /dev/hvc0; sleep 1\npoweroff -f\n",
        capture_output=True, timeout=180)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, proc.stderr.decode()
    assert "from-hvc0-42" in out                # the computed text, not the echoed command


def test_virtconsole_needs_its_bus(guest):
    proc = subprocess.run(KEMU + ["run", "-device", "virtconsole"], check=False, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert "virtio-serial-device" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
