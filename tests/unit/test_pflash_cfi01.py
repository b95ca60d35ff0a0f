"""The CFI flash command set as QEMU's pflash_cfi01 on virt (4 bytes wide, two x16 chips),
driven the way EDK2's VirtNorFlashDxe drives it (commands replicated per chip)."""

from __future__ import annotations

import pytest

from kemu.devices.pflash_cfi01 import PflashCfi01

SECTOR = 256 << 10
SIZE = 4 * SECTOR


def dual(cmd: int) -> int:
    """EDK2's CREATE_DUAL_CMD: a command for both x16 chips of the bank."""
    return cmd | cmd << 16


class Bank:
    def __init__(self, read_only: bool = False, size: int = SIZE) -> None:
        self.storage = bytearray(b"\xa5" * size)
        self.romd_log: list[bool] = []
        self.updates: list[tuple[int, int]] = []
        self.dev = PflashCfi01(self.storage, sector_len=SECTOR, read_only=read_only,
                               on_romd=self.romd_log.append,
                               on_update=lambda a, b: self.updates.append((a, b)))

    def cmd(self, offset: int, cmd: int) -> None:
        self.dev.write(offset, 4, dual(cmd))

    def status(self, offset: int = 0) -> int:
        return self.dev.read(offset, 4)


def test_read_array_and_modes():
    b = Bank()
    assert b.dev.romd
    assert b.dev.read(8, 4) == 0xA5A5A5A5
    b.cmd(0, 0x70)
    assert b.romd_log == [False]          # reads reach the device in a command mode
    assert b.status() == 0x00800080       # ready, from each chip
    assert b.dev.read(0, 2) == 0x0080
    b.cmd(0, 0xFF)
    assert b.romd_log == [False, True]
    assert b.dev.read(0, 4) == 0xA5A5A5A5


def test_cfi_query_table():
    b = Bank()
    b.cmd(0x55 * 4, 0x98)
    q = [b.dev.read(i * 4, 4) for i in range(0x40)]
    assert all(v >> 16 == v & 0xFFFF for v in q)      # both chips answer alike
    table = bytes(v & 0xFF for v in q)
    assert table[0x10:0x13] == b"QRY"
    assert table[0x13] == 0x01 and table[0x15] == 0x31
    chip_size = 1 << table[0x27]
    assert chip_size * 2 == SIZE                       # two chips make the bank
    blocks = table[0x2D] + (table[0x2E] << 8) + 1
    block = (table[0x2F] << 8 | table[0x30] << 16)
    assert blocks == SIZE // SECTOR and block * 2 == SECTOR
    assert table[0x2A] == 0x0B                         # 2 KiB write buffer per chip
    assert table[0x31:0x34] == b"PRI"
    assert b.dev.read(0x1000 * 4, 4) == 0              # outside the table
    b.cmd(0, 0xFF)
    assert b.dev.romd and b.dev.read(0, 4) == 0xA5A5A5A5


def test_virt_bank_geometry_as_qemu():
    """QEMU's virt: 64 MiB banks, 256 KiB sectors -> 2^25-byte chips, 256 blocks."""
    dev = PflashCfi01(bytearray(64 << 20), sector_len=SECTOR)
    dev.write(0, 4, dual(0x98))
    table = bytes(dev.read(i * 4, 4) & 0xFF for i in range(0x40))
    assert table[0x27] == 25
    assert (table[0x2D], table[0x2E], table[0x2F], table[0x30]) == (0xFF, 0x00, 0x00, 0x02)
    assert dev.writeblock_size == 4096


def test_read_identifier():
    b = Bank()
    b.cmd(0, 0x90)
    assert b.dev.read(0, 4) == 0x00890089
    assert b.dev.read(4, 4) == 0x00180018
    assert b.dev.read(8, 4) == 0


def test_word_program_and_status():
    b = Bank()
    b.cmd(0x100, 0x40)
    b.dev.write(0x100, 4, 0x12345678)
    assert b.storage[0x100:0x104] == bytes.fromhex("78563412")
    assert b.updates == [(0x100, 0x104)]
    assert b.status(0x100) & 0x00800080 == 0x00800080
    b.cmd(0, 0x50)                       # clear status: back to read array
    assert b.dev.romd
    b.cmd(0, 0x70)
    assert b.status() == 0               # cleared
    b.cmd(0, 0xFF)
    assert b.dev.read(0x100, 4) == 0x12345678


def test_block_erase():
    b = Bank()
    b.cmd(SECTOR + 0x1234, 0x20)
    b.cmd(SECTOR + 0x1234, 0xD0)
    assert b.storage[SECTOR:2 * SECTOR] == b"\xff" * SECTOR
    assert b.storage[SECTOR - 1] == 0xA5 and b.storage[2 * SECTOR] == 0xA5
    assert b.updates == [(SECTOR, 2 * SECTOR)]
    assert b.status() == 0x00800080
    b.cmd(0, 0xFF)
    assert b.dev.read(SECTOR, 4) == 0xFFFFFFFF


def test_block_unlock_then_erase_as_edk2():
    b = Bank()
    b.cmd(0, 0x60)
    b.cmd(0, 0xD0)
    assert b.status() == 0x00800080
    b.cmd(0, 0x20)
    b.cmd(0, 0xD0)
    b.cmd(0, 0xFF)
    assert b.dev.read(0, 4) == 0xFFFFFFFF


def test_write_to_buffer_as_edk2():
    """VirtNorFlashDxe's NorFlashWriteBuffer: 0xe8, poll ready, count-1, words, 0xd0."""
    b = Bank()
    target = 0x2000
    words = [0x11111111 * (i + 1) & 0xFFFFFFFF for i in range(8)]
    b.cmd(target, 0xE8)
    assert b.status(target) & 0x00800080 == 0x00800080
    b.dev.write(target, 4, dual(len(words) - 1))
    for i, w in enumerate(words):
        b.dev.write(target + 4 * i, 4, w)
    b.cmd(target, 0xD0)
    assert b.status(target) == 0x00800080
    b.cmd(0, 0xFF)
    assert [b.dev.read(target + 4 * i, 4) for i in range(8)] == words
    assert b.dev.read(target + 32, 4) == 0xA5A5A5A5


def test_read_only_bank_reports_errors_and_keeps_data():
    b = Bank(read_only=True)
    b.cmd(0, 0x40)
    b.dev.write(0, 4, 0)
    assert b.status() & 0x00100010 == 0x00100010     # program error
    b.cmd(0, 0x50)
    b.cmd(0, 0x20)
    b.cmd(0, 0xD0)
    assert b.status() & 0x00200020 == 0x00200020     # erase error
    b.cmd(0, 0xFF)
    assert b.storage == bytearray(b"\xa5" * SIZE) and b.updates == []


def test_wide_access_is_two_bank_accesses():
    b = Bank()
    b.cmd(0, 0x40)
    b.dev.write(0, 8, 0x00FF00FF_12345678)    # the data word, then read array at 4
    assert b.storage[0:4] == bytes.fromhex("78563412") and b.dev.romd
    b.cmd(0, 0x70)
    assert b.dev.read(0, 8) == 0x00800080_00800080


def test_unknown_command_returns_to_read_array():
    b = Bank()
    b.cmd(0, 0x33)
    assert b.dev.romd and b.dev.read(0, 4) == 0xA5A5A5A5


def test_reset_and_state():
    b = Bank()
    b.cmd(0, 0xE8)
    saved = b.dev.save()
    b.dev.reset()
    assert b.dev.romd and b.dev.cmd == 0 and b.dev.status == 0x80
    b.dev.restore(saved)
    assert not b.dev.romd and b.dev.cmd == 0xE8 and b.dev.wcycle == 1


@pytest.mark.parametrize("offset,size", [(-4, 4), (SIZE - 2, 4), (SIZE, 1), (0, 3)])
def test_accesses_outside_or_odd_are_harmless(offset, size):
    b = Bank()
    assert b.dev.read(offset, size) == 0
    b.dev.write(offset, size, 0x40)
    assert b.dev.romd and b.updates == []


def test_any_sequence_keeps_the_machine_sound():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    cmds = st.sampled_from([0x00, 0x10, 0x20, 0x28, 0x40, 0x50, 0x60, 0x70, 0x90, 0x98,
                            0xD0, 0xE8, 0xFF, 0x01, 0x33])
    ops = st.lists(st.tuples(st.booleans(), st.integers(-8, SIZE + 8),
                             st.sampled_from([1, 2, 4, 8]),
                             st.one_of(cmds.map(dual), st.integers(0, 2**64 - 1))),
                   max_size=40)

    @settings(max_examples=200, deadline=None)
    @given(ops)
    def run(seq):
        b = Bank(size=2 * SECTOR)
        for is_write, offset, size, value in seq:
            if is_write:
                b.dev.write(offset, size, value)
            else:
                assert 0 <= b.dev.read(offset, size) < 1 << (8 * size)
        assert len(b.storage) == 2 * SECTOR
        assert b.dev.romd == (b.dev.cmd == 0 and b.dev.wcycle == 0) or b.dev.cmd == 0
        for start, end in b.updates:
            assert 0 <= start < end <= 2 * SECTOR

    run()
