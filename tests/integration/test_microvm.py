"""The x86-64 microvm board on this host's /dev/kvm, with purpose-built guests.

The guests of tests/guests are booted *through the board*
(:class:`kemu.machines.x86_microvm.MicroVm`, built by the machine builder
from a :class:`MachineConfig`), not through the raw loader: they talk to the
board's real 16550, CMOS RTC, MP table, in-kernel irqchip and i8042.  On PVM
hosts (kvm_pvm) guest kernel code is emulated, so the guests are tiny; real
Linux on the board is tested in the nested harness (tests/nested).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guests"))
import guestbuild

from kemu.backends.serial import SerialBackend
from kemu.machines.builder import build
from kemu.machines.config import MachineConfig, MiB
from kemu.machines.runtime import Outcome, RunState

_reason = guestbuild.kvm_guest_unavailable()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def guest_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("microvm-guests")
    path = out / "microvm.bzImage"
    path.write_bytes(guestbuild.build_bzimage("microvm", out))
    pvh = out / "pvh.elf"
    pvh.write_bytes(guestbuild.build_pvh(out))
    return out


class Board:
    """A board from the builder with its console captured."""

    def __init__(self, kernel: Path, append: str = "", smp: int = 1, no_reboot: bool = True,
                 memory: int = 64 * MiB, send_on_ready: bytes = b"ping\n") -> None:
        self.out = bytearray()
        self.lock = threading.Lock()
        self.backend = SerialBackend(self._sink)
        config = MachineConfig(machine="microvm", accel="kvm", kernel=kernel, append=append,
                               memory=memory, smp=smp, no_reboot=no_reboot)
        self.board = build(config, self.backend)
        self.send_on_ready = send_on_ready
        self.sent = 0

    def _sink(self, data: bytes) -> None:
        with self.lock:
            self.out += data
            # The guest announces it listens; the host types a line (from the vCPU
            # thread, as a terminal would: the backend queues and pumps it).
            n = self.out.count(b"ready for input")
        if n > self.sent and self.send_on_ready:
            self.sent = n
            threading.Thread(target=self._send, daemon=True).start()

    def _send(self) -> None:
        with self.board.lock:            # the backend is fed under the machine lock
            self.backend.send(self.send_on_ready)

    @property
    def console(self) -> str:
        with self.lock:
            return self.out.decode(errors="replace")

    def lines(self) -> dict[str, list[str]]:
        kv: dict[str, list[str]] = {}
        for line in self.console.splitlines():
            key, _, value = line.partition(" ")
            kv.setdefault(key, []).append(value)
        return kv

    def wait_for(self, text: str, count: int = 1, timeout: float = TIMEOUT) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.console.count(text) >= count:
                return True
            time.sleep(0.02)
        return False

    def finish(self) -> Outcome:
        outcome = self.board.wait(TIMEOUT)
        if outcome is None:
            self.board.stop()
            self.board.wait(10)
            pytest.fail(f"the guest did not finish; console:\n{self.console}")
        return outcome


@pytest.fixture
def boards():
    made: list[Board] = []

    def make(*args, **kw) -> Board:
        b = Board(*args, **kw)
        made.append(b)
        return b
    yield make
    for b in made:
        if b.board.state not in (RunState.STOPPED, RunState.CREATED):
            b.board.stop()
            b.board.wait(10)


def test_boots_bzimage_and_reports_over_the_16550(guest_dir, boards):
    """Console through the 16550 model, the RTC, the MP table, the UART's THRE and
    receive interrupts through KVM's I/O APIC, and the i8042 reset ending the
    machine under -no-reboot."""
    b = boards(guest_dir / "microvm.bzImage", append="console=ttyS0 kemu.test")
    b.board.start()
    outcome = b.finish()
    assert outcome == Outcome("reset", 0), b.console
    kv = b.lines()
    assert kv["cmdline"] == ["console=ttyS0 kemu.test"]
    assert int(kv["lsr"][0], 16) == 0x60           # THRE | TEMT
    assert int(kv["scr"][0], 16) == 0xA5
    assert int(kv["iir"][0], 16) == 0xC1           # 16550A FIFOs, no interrupt
    now = time.gmtime()
    assert int(kv["rtc_year"][0], 16) == int(str(now.tm_year), 16)   # BCD
    assert int(kv["rtc_month"][0], 16) == int(str(now.tm_mon), 16)
    assert int(kv["mp_sum"][0], 16) == 0
    assert [int(v, 16) for v in kv["mp_apic"]] == [0]
    assert int(kv["mp_ioapic"][0], 16) == 0xFEC00000
    assert int(kv["thre_iir"][0], 16) == 0xC2      # THRE, read in the IRQ 4 handler
    assert kv["rx"] == ["ping"]                    # typed by the host, taken by interrupt
    assert b.console.endswith("resetting\n")


def test_virtio_slots_are_announced_on_the_command_line_without_acpi(guest_dir, boards):
    from kemu.devices.virtio.mmio import VirtioMmioTransport
    from kemu.machines.x86_microvm import VIRTIO_IRQS, VIRTIO_MMIO

    b = boards(guest_dir / "microvm.bzImage", append="console=ttyS0")
    b.board.acpi = False            # with ACPI (the default) they are in the DSDT
    for _ in range(2):
        b.board.add_virtio(VirtioMmioTransport(None, b.board.memory, b.board.virtio_irq(0)))
    b.board.start()
    assert b.finish().reason == "reset"
    base, size = VIRTIO_MMIO
    assert b.lines()["cmdline"] == [
        (f"console=ttyS0 virtio_mmio.device={size}@{base:#x}:{VIRTIO_IRQS[0]} "
        f"virtio_mmio.device={size}@{base + size:#x}:{VIRTIO_IRQS[1]}")]


@pytest.mark.parametrize("n", [2, 4])
def test_smp_every_vcpu_reports_its_apic_id(guest_dir, boards, n):
    """-smp N: the MP table lists N processors; the BSP starts the others with
    INIT/SIPI (they wait in KVM, each on its own vCPU thread) and each reports
    the same id through CPUID leaf 1, leaf 0xB and its local APIC."""
    b = boards(guest_dir / "microvm.bzImage", append="kemu.smp", smp=n)
    assert len(b.board.cpus) == n
    b.board.start()
    assert b.finish() == Outcome("reset", 0), b.console
    kv = b.lines()
    assert [int(v, 16) for v in kv["mp_apic"]] == list(range(n))
    assert sorted(int(v, 16) for v in kv["cpu"]) == [(i << 16) | (i << 8) | i for i in range(n)]
    assert len(b.board.vcpu_thread_ids()) == n


def test_reset_without_no_reboot_restarts_the_guest(guest_dir, boards):
    """Without -no-reboot the i8042 reset boots the kernel again (a fresh VM), and the
    console, RTC and interrupts work in the new boot too."""
    b = boards(guest_dir / "microvm.bzImage", append="again", smp=2, no_reboot=False)
    resets = []
    b.board.on_reset = lambda: resets.append(True)
    b.board.start()
    assert b.wait_for("resetting", 3), b.console
    b.board.stop()
    assert b.board.wait(TIMEOUT) == Outcome("quit", 0)
    assert len(resets) >= 2
    assert b.console.count("rx ping") >= 3


def test_pvh_kernel_through_the_board(guest_dir, boards):
    """An ELF with a PVH entry note boots through the same board; pause, resume
    and stop work on a guest that halts forever."""
    b = boards(guest_dir / "pvh.elf", append="pvh via microvm", send_on_ready=b"")
    states: list[RunState] = []
    b.board.on_state = states.append
    b.board.start()
    assert b.wait_for("pvh via microvm"), b.console
    assert b.board.pause()
    assert b.board.state == RunState.PAUSED
    b.board.resume()
    end = time.monotonic() + TIMEOUT
    while b.board.state != RunState.RUNNING and time.monotonic() < end:
        time.sleep(0.01)
    b.board.stop()
    assert b.board.wait(TIMEOUT) == Outcome("quit", 0)
    assert states == [RunState.RUNNING, RunState.PAUSED, RunState.RUNNING, RunState.STOPPED]


def test_console_panic_line_ends_the_machine(guest_dir, boards):
    """The shared console watcher: Linux's panic line ends the machine with status 1,
    its halt line ("reboot: System halted", a power-off without ACPI) with 0."""
    b = boards(guest_dir / "pvh.elf", append="x", send_on_ready=b"")
    b.board.start()
    b.wait_for("x")
    b.backend.write(b"[    1.0] Kernel panic - not syncing: Attempted to kill init!\n")
    outcome = b.board.wait(TIMEOUT)
    assert outcome == Outcome("panic", 1, "guest kernel panic: Kernel panic - not syncing: "
                                          "Attempted to kill init!")
    b = boards(guest_dir / "pvh.elf", append="y", send_on_ready=b"")
    b.board.start()
    b.wait_for("y")
    b.backend.write(b"[    1.0] reboot: System halted\r\n")
    assert b.board.wait(TIMEOUT) == Outcome("poweroff", 0)


def test_builder_rejects_bad_configs(guest_dir):
    from kemu.errors import ConfigError
    backend = SerialBackend(lambda d: None)
    with pytest.raises(ConfigError, match="kvm"):
        build(MachineConfig(machine="microvm", accel="tcg",
                            kernel=guest_dir / "microvm.bzImage"), backend)
    with pytest.raises(ConfigError, match="-smp"):
        build(MachineConfig(machine="microvm", accel="kvm", smp=0,
                            kernel=guest_dir / "microvm.bzImage"), backend)


def test_serial_file_and_pty_shorthands(guest_dir, tmp_path):
    """QEMU's ``-serial file:PATH`` and ``-serial pty`` spellings: the guest's output
    reaches the file, and the pty QEMU's way names on stderr."""
    import os
    import re
    import subprocess
    import select
    from kemu.testing.stdio_console import KEMU
    base = ["-M", "microvm", "-accel", "kvm", "-m", "64", "-kernel",
            str(guest_dir / "pvh.elf"), "-display", "none", "-monitor", "none"]

    def wait_for(predicate, proc) -> None:
        end = time.monotonic() + TIMEOUT
        while not predicate():
            assert proc.poll() is None, proc.stderr.read().decode(errors="replace")
            assert time.monotonic() < end, "the guest's line did not come"
            time.sleep(0.02)

    log = tmp_path / "serial.log"
    proc = subprocess.Popen(KEMU + base + ["-append", "to a file", "-serial", f"file:{log}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        wait_for(lambda: log.exists() and b"to a file" in log.read_bytes(), proc)
    finally:
        proc.kill()
        proc.wait()
    proc = subprocess.Popen(KEMU + base + ["-append", "to a pty", "-serial", "pty"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        line = proc.stderr.readline().decode()
        m = re.match(r"char device redirected to (/dev/pts/\d+) \(label serial0\)", line)
        assert m, line
        fd = os.open(m.group(1), os.O_RDONLY | os.O_NOCTTY)
        try:
            seen = bytearray()

            def pty_shows() -> bool:
                if select.select([fd], [], [], 0.1)[0]:
                    seen.extend(os.read(fd, 4096))
                return b"to a pty" in seen
            wait_for(pty_shows, proc)
        finally:
            os.close(fd)
    finally:
        proc.kill()
        proc.wait()
