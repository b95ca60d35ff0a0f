"""virtio-blk over virtio-mmio on the x86-64 microvm board, driven by a purpose-built guest.

tests/guests/virtio_blk.c is a small virtio driver: it finds the device in
slot 0, negotiates features, sets up queue 0, reads, writes and flushes,
takes completions by polling and by the slot's interrupt through KVM's I/O
APIC, then misbehaves once (a buffer straddling the end of RAM) and checks
that the device asks for a reset and works again after one.  It reports
"key value" lines on the 16550; the disk is a raw image of random bytes
chosen here, so every byte the guest reports is checked against the host's.
"""

from __future__ import annotations

import logging
import os
import struct
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guests"))
import guestbuild

from kemu.backends.serial import SerialBackend
from kemu.machines.builder import build
from kemu.machines.config import DriveConfig, MachineConfig, MiB
from kemu.machines.runtime import Outcome, RunState

_reason = guestbuild.kvm_guest_unavailable()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

TIMEOUT = 60.0
SECTOR = 512
DISK_SECTORS = 128
MEMORY = 64 * MiB
# What tests/guests/virtio_blk.c uses.
READ_SECTORS = 4
WRITE_SECTOR = 6
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_BLK_F_FLUSH = 1 << 9
S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK, S_NEEDS_RESET = 1, 2, 4, 8, 64
INT_VRING, INT_CONFIG = 1, 2
BLK_S_OK, BLK_S_IOERR = 0, 1


def fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def pattern() -> bytes:
    return bytes(((i * 7 + 0x5A) & 0xFF) ^ ((i >> 8) & 0xFF) for i in range(SECTOR))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class Run:
    """One boot of the guest with the disk; console, outcome, disk and warnings after it."""

    def __init__(self, kernel: Path, disk: Path, eventfds: bool = True) -> None:
        self.out = bytearray()
        self.lock = threading.Lock()
        self.backend = SerialBackend(self._sink)
        config = MachineConfig(machine="microvm", accel="kvm", kernel=kernel, append="virtio-blk",
                               memory=MEMORY, no_reboot=True,
                               drives=[DriveConfig(disk, format="raw")],
                               extra={"eventfds": eventfds})
        self.board = build(config, self.backend)
        self.transport = self.board.virtio_slots[0].device
        self.outcome: Outcome | None = None

    def _sink(self, data: bytes) -> None:
        with self.lock:
            self.out += data

    @property
    def console(self) -> str:
        with self.lock:
            return self.out.decode(errors="replace")

    def values(self) -> dict[str, int]:
        kv: dict[str, int] = {}
        for line in self.console.splitlines():
            key, _, value = line.partition(" ")
            if value.startswith("0x"):
                assert key not in kv, f"{key} reported twice:\n{self.console}"
                kv[key] = int(value, 16)
        return kv

    def run(self) -> None:
        self.board.start()
        # The board drops its doorbells when it closes: keep them for their counts.
        self.doorbells = list(getattr(self.board, "ioeventfds", []))
        try:
            self.outcome = self.board.wait(TIMEOUT)
        finally:
            if self.outcome is None:
                self.board.stop()
                self.board.wait(10)
        assert self.outcome is not None, f"the guest did not finish; console:\n{self.console}"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    out = tmp_path_factory.mktemp("virtio-blk-guest")
    path = out / "virtio_blk.bzImage"
    path.write_bytes(guestbuild.build_bzimage("virtio_blk", out))
    return path


# The board serves QueueNotify through an ioeventfd on its I/O thread and raises the
# slot's IRQ through a resampling irqfd where KVM has them ("eventfds"); the other
# path is a vCPU exit for each and KVM_IRQ_LINE ("exits").
@pytest.fixture(scope="module", params=[True, False], ids=["eventfds", "exits"])
def run(request, kernel, tmp_path_factory):
    out = tmp_path_factory.mktemp("virtio-blk-disk")
    original = os.urandom(DISK_SECTORS * SECTOR)
    disk = out / "disk.raw"
    disk.write_bytes(original)

    records = _Records()
    logger = logging.getLogger("kemu.devices.virtio")     # the transports log device errors
    old_level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.WARNING)
    try:
        r = Run(kernel, disk, eventfds=request.param)
        r.run()
    finally:
        logger.removeHandler(records)
        logger.setLevel(old_level)
        if "r" in locals() and r.board.state not in (RunState.STOPPED, RunState.CREATED):
            r.board.stop()
            r.board.wait(10)
    r.original = original
    r.disk_after = disk.read_bytes()
    r.warnings = records.messages
    r.eventfds = request.param
    return r


def test_guest_finishes_and_powers_off(run):
    assert run.outcome == Outcome("poweroff", 0), run.console
    assert "fail" not in run.console, run.console
    assert run.console.endswith("done\n"), run.console


def test_finds_the_device_and_negotiates(run):
    kv = run.values()
    assert kv["magic"] == 0x74726976
    assert kv["version"] == 2
    assert kv["device_id"] == 2
    assert kv["dev_features"] & VIRTIO_F_VERSION_1
    assert kv["dev_features"] & VIRTIO_BLK_F_FLUSH
    assert kv["drv_features"] == VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH
    assert kv["features_ok"] == S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK
    assert kv["queue_num_max"] >= 8
    assert kv["ready0"] == 0
    assert kv["status"] == S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
    assert kv["capacity"] == DISK_SECTORS
    assert kv["blk_size"] == SECTOR
    assert kv["ram_end"] == MEMORY


def test_reads_return_the_host_bytes(run):
    kv = run.values()
    data = run.original
    first = data[:READ_SECTORS * SECTOR]
    # Polled, with VIRTQ_AVAIL_F_NO_INTERRUPT: no interrupt status raised.
    assert kv["read_status"] == BLK_S_OK
    assert kv["read_len"] == len(first) + 1           # data and the status byte
    assert kv["read_sum"] == fnv1a(first)
    assert kv["read_head"] == struct.unpack_from("<Q", first)[0]
    assert kv["poll_isr"] == 0
    # By interrupt: IRQ 5 through the I/O APIC, InterruptStatus "used buffer", ACKed.
    last = data[-2 * SECTOR:]
    assert kv["read2_status"] == BLK_S_OK
    assert kv["read2_len"] == len(last) + 1
    assert kv["read2_sum"] == fnv1a(last)
    assert kv["irq_isr"] == INT_VRING
    assert kv["isr_after_ack"] == 0


def test_doorbells_take_the_configured_path(run):
    if run.eventfds and run.doorbells:         # KVM has ioeventfd: no QueueNotify exits
        assert sum(d.count for d in run.doorbells) >= 8
    if not run.eventfds:
        assert not run.doorbells


def test_write_lands_in_the_host_file_and_flush_completes(run):
    kv = run.values()
    assert kv["write_status"] == BLK_S_OK
    assert kv["write_len"] == 1                       # only the status byte written
    assert kv["verify_status"] == BLK_S_OK
    assert kv["verify_bad"] == 0
    assert kv["flush_status"] == BLK_S_OK
    assert kv["flush_len"] == 1
    after, before = run.disk_after, run.original
    assert len(after) == len(before)
    off = WRITE_SECTOR * SECTOR
    assert after[off:off + SECTOR] == pattern()
    assert after[:off] == before[:off]                # nothing else changed
    assert after[off + SECTOR:] == before[off + SECTOR:]


def test_read_past_the_end_is_an_io_error(run):
    kv = run.values()
    assert kv["oob_status"] == BLK_S_IOERR
    # No data was written, so the used length (2.7.8: bytes written from the start
    # of the writable buffers, a lower bound) is 0 though the status byte was set.
    assert kv["oob_len"] == 0


def test_buffer_outside_ram_needs_reset_and_the_vmm_carries_on(run):
    """A data descriptor straddling the end of RAM: DEVICE_NEEDS_RESET with a
    configuration change interrupt, the request left unanswered, later requests
    ignored until the driver resets the device; after the reset it works again."""
    kv = run.values()
    assert kv["bad_isr"] == INT_CONFIG
    assert kv["bad_status"] == (S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
                                | S_NEEDS_RESET)
    assert kv["bad_used"] == 0
    assert kv["bad_req_status"] == 0xFF               # the device wrote nothing
    assert kv["stuck_used"] == 0
    assert kv["stuck_isr"] == 0
    assert kv["reset_status"] == 0
    assert kv["again_status"] == BLK_S_OK
    assert kv["again_sum"] == fnv1a(run.original[:READ_SECTORS * SECTOR])
    # read2, write, verify, flush, oob and again; the bad request.  Interrupts whose
    # InterruptStatus reads 0 are tolerated (and counted) by the guest, as by Linux.
    assert kv["irq_vring"] == 6
    assert kv["irq_config"] == 1
    assert any("needs reset" in m and "outside guest RAM" in m for m in run.warnings), run.warnings
    assert not run.transport.needs_reset              # cleared by the guest's reset
