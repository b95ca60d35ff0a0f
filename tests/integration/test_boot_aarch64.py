"""Real boots of Debian's arm64 kernel on the virt board under the tcg accelerator."""

import subprocess
import time

import sys

KEMU = [sys.executable, "-m", "kemu.cli"]


def test_piped_commands_print_and_power_off(guest):
    proc = subprocess.run(KEMU + ["run"], input=b"uname -m\npoweroff -f\n",
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert b"\naarch64" in proc.stdout.replace(b"\r", b"")


def test_interactive_shell_timer_and_busy_guest(guest, console_factory):
    c = console_factory("run")
    c.expect(rb"kemu guest ready")
    c.expect(rb"# ")
    assert c.run("uname -m").strip() == "aarch64"
    cpuinfo = c.run("cat /proc/cpuinfo")
    assert "processor\t: 0" in cpuinfo and "CPU implementer\t: 0x41" in cpuinfo
    # Guest time follows the host clock: a second's sleep takes a second more than
    # a command's round trip (measured now: it grows on a loaded host).
    t0 = time.monotonic()
    c.run("true")
    round_trip = time.monotonic() - t0
    t0 = time.monotonic()
    c.run("sleep 1")
    assert 0.9 < time.monotonic() - t0 < 5 + 3 * round_trip
    # A busy guest must not starve the timer.
    c.send("yes > /dev/null &\n")
    t0 = time.monotonic()
    c.run("true")
    round_trip = time.monotonic() - t0
    t0 = time.monotonic()
    c.run("sleep 1")
    assert 0.9 < time.monotonic() - t0 < 5 + 3 * round_trip
    assert "yes" in c.run("ps")
    c.send("poweroff -f\n")
    assert c.wait(60) == 0


def test_qemu_command_line_runs_unchanged(guest, console_factory):
    c = console_factory("-M", "virt", "-cpu", "cortex-a57", "-m", "256", "-kernel",
                        str(guest.kernel), "-initrd", str(guest.initrd), "-append",
                        "console=ttyAMA0 rdinit=/init quiet cryptomgr.notests",
                        "-nographic", "-no-reboot")
    c.expect(rb"# ")
    assert "MemTotal" in c.run("head -1 /proc/meminfo")
    c.send("reboot -f\n")                       # -no-reboot: a reset ends kemu
    assert c.wait(60) == 0


def test_kernel_panic_is_one_line_and_status_1(guest, tmp_path):
    proc = subprocess.run(KEMU + ["-M", "virt", "-m", "256", "-kernel", str(guest.kernel),
                                  "-append", "console=ttyAMA0 quiet cryptomgr.notests",
                                  "-nographic"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kemu: guest kernel panic: Kernel panic")
    assert "Traceback" not in proc.stderr.decode()


def test_ctrl_a_x_quits(guest, console_factory):
    c = console_factory("run")
    c.expect(rb"# ")
    c.send("\x01x")
    assert c.wait(60) == 0
    assert "kemu: terminated" in c.stderr
