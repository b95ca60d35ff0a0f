"""CFI parallel NOR flash with the Intel/Sharp command set, as QEMU's pflash_cfi01.

The virt board has two banks of it (firmware code and UEFI variables).
Command set (CFI primary vendor command set 0001, the one Intel's and
Micron's P30 parts implement, and QEMU's ``hw/block/pflash_cfi01.c``
emulates), written to any address of the bank:

=========  =======================================================================
0xff/0x00  read array (0x00 is QEMU's historical alias); also 0xf0 (AMD probe)
0x70       read status register
0x90       read device identifier (manufacturer at word 0, device at word 1)
0x98       CFI query (the table at word offsets 0x10-0x3f)
0x50       clear status register
0x10/0x40  word program: the next write is the data
0x20       block erase (the block containing the address), then 0xd0 confirms
0x60       block lock setup, then 0xd0 (unlock) or 0x01 (lock): accepted, not modelled
0xe8       write to buffer: the next write is the word count - 1, then that many
           data words plus one, then 0xd0 confirms
=========  =======================================================================

Status register (SR): bit 7 ready (WSM idle; writes here complete at once),
bit 5 erase error, bit 4 program error (a write to a read-only bank).

Geometry as QEMU's virt: the bank is ``bank_width`` bytes wide (4) made of
``bank_width // device_width`` x16 chips side by side, so commands are
written replicated per chip (EDK2 writes ``cmd | cmd << 16``), and status,
identifier and CFI answers come back replicated the same way.  Query and
identifier reads take the word address (byte offset >> 2).  The table
describes one chip: 2^25 bytes, 256 uniform blocks of 128 KiB (256 KiB per
bank block), a write buffer of 2^11 bytes per chip.

Only the array, the mode and the status are state; the array lives in a
host buffer that the accelerator maps for reads while the device is in
read-array mode (QEMU's ROMD mode): ``on_romd(True/False)`` tells the
board when reads must reach :meth:`read` instead, and ``on_update(start,
end)`` which bytes of the array changed (to write them back to the image
file and to drop code translated from them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# Commands (CFI 0001 / Intel StrataFlash).
CMD_READ_ARRAY = 0xFF
CMD_READ_ARRAY_QEMU = 0x00
CMD_AMD_PROBE = 0xF0
CMD_READ_STATUS = 0x70
CMD_READ_ID = 0x90
CMD_CFI_QUERY = 0x98
CMD_CLEAR_STATUS = 0x50
CMD_PROGRAM = 0x40
CMD_PROGRAM_ALT = 0x10
CMD_BLOCK_ERASE = 0x20
CMD_BLOCK_ERASE_ALT = 0x28
CMD_LOCK_SETUP = 0x60
CMD_WRITE_BUFFER = 0xE8
CMD_CONFIRM = 0xD0
CMD_LOCK_BLOCK = 0x01

# Status register bits.
SR_READY = 0x80
SR_ERASE_ERROR = 0x20
SR_PROGRAM_ERROR = 0x10

#: Commands after which reads return the status register (QEMU's list).
_STATUS_MODES = {CMD_PROGRAM_ALT, CMD_BLOCK_ERASE, CMD_BLOCK_ERASE_ALT, CMD_PROGRAM,
                 CMD_CLEAR_STATUS, CMD_LOCK_SETUP, CMD_READ_STATUS, CMD_WRITE_BUFFER}

#: The CFI table's size in bytes (offsets 0x00-0x3f of one chip's query space).
CFI_TABLE_SIZE = 0x40


def cfi_table(bank_size: int, sector_len: int, bank_width: int,
              device_width: int) -> tuple[bytes, int]:
    """The CFI query table of one chip, and the bank's write-buffer size in bytes
    (JESD68.01 layout; values as QEMU's pflash_cfi01 fills them)."""
    chips = bank_width // device_width
    blocks = bank_size // sector_len
    chip_sector = sector_len // chips
    chip_size = chip_sector * blocks
    t = bytearray(CFI_TABLE_SIZE)
    t[0x10:0x13] = b"QRY"
    t[0x13], t[0x15] = 0x01, 0x31          # Intel command set; extended table at 0x31
    t[0x1B], t[0x1C] = 0x45, 0x55          # Vcc 4.5-5.5 V; no Vpp
    t[0x1F], t[0x20], t[0x21] = 0x07, 0x07, 0x0A     # typical timeouts
    t[0x23], t[0x24], t[0x25] = 0x04, 0x04, 0x04     # maximum timeouts
    t[0x27] = chip_size.bit_length() - 1    # device size 2^n bytes
    t[0x28] = 0x02                          # x8/x16 interface
    t[0x2A] = 0x08 if bank_width == 1 else 0x0B       # write buffer 2^n bytes per chip
    t[0x2C] = 0x01                          # one erase block region
    t[0x2D] = (blocks - 1) & 0xFF
    t[0x2E] = ((blocks - 1) >> 8) & 0xFF
    t[0x2F] = (chip_sector >> 8) & 0xFF
    t[0x30] = (chip_sector >> 16) & 0xFF
    t[0x31:0x36] = b"PRI10"                  # primary extended query, version 1.0
    t[0x3F] = 0x01                          # one protection field
    return bytes(t), (1 << t[0x2A]) * chips


@dataclass(frozen=True)
class PflashState:
    """The command state machine (the array is memory, saved with it)."""

    version: int
    cmd: int
    wcycle: int
    status: int
    counter: int


class PflashCfi01:
    """One bank: ``read``/``write`` at offsets in the bank, the array in ``storage``."""

    name = "pflash-cfi01"

    def __init__(self, storage, *, sector_len: int = 256 << 10, bank_width: int = 4,
                 device_width: int = 2, ident: tuple[int, int] = (0x89, 0x18),
                 read_only: bool = False,
                 on_romd: Callable[[bool], None] = lambda romd: None,
                 on_update: Callable[[int, int], None] = lambda start, end: None) -> None:
        size = len(storage)
        if size % sector_len or bank_width % device_width:
            raise ValueError("flash size must be whole blocks, bank width whole chips")
        self.storage = storage
        self.size = size
        self.sector_len = sector_len
        self.bank_width = bank_width
        self.device_width = device_width
        self.ident = ident
        self.read_only = read_only
        self._table, self.writeblock_size = cfi_table(size, sector_len, bank_width,
                                                      device_width)
        self._on_romd = on_romd
        self._on_update = on_update
        self.romd = True
        self.cmd = 0
        self.wcycle = 0
        self.status = SR_READY
        self.counter = 0

    # -- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        """QEMU's pflash_cfi01_system_reset: read array, WSM ready."""
        self.cmd = 0
        self.wcycle = 0
        self.status = SR_READY
        self._set_romd(True)

    def save(self) -> PflashState:
        return PflashState(1, self.cmd, self.wcycle, self.status, self.counter)

    def restore(self, state: PflashState) -> None:
        from kemu.state import check_version
        check_version("pflash", state.version)
        self.cmd, self.wcycle = state.cmd & 0xFF, max(0, min(3, state.wcycle))
        self.status, self.counter = state.status & 0xFF, state.counter & 0xFFFFFFFF
        self._set_romd(self.cmd == 0 and self.wcycle == 0)

    def _set_romd(self, romd: bool) -> None:
        if romd != self.romd:
            self.romd = romd
            self._on_romd(romd)

    # -- reads -------------------------------------------------------------------------------
    def _replicate(self, value: int, width: int) -> int:
        """One chip's answer repeated for each chip across an access of ``width`` bytes."""
        out = 0
        bits = 8 * self.device_width
        for shift in range(0, 8 * width, bits):
            out |= (value & ((1 << bits) - 1)) << shift
        return out

    def _query(self, offset: int) -> int:
        """QEMU's pflash_cfi_query / pflash_devid_query for one bank-wide word."""
        word = offset // self.bank_width
        if self.cmd == CMD_CFI_QUERY:
            value = self._table[word] if word < CFI_TABLE_SIZE else 0
        else:
            value = {0: self.ident[0], 1: self.ident[1]}.get(word & 0xFF, 0)
        return self._replicate(value, self.bank_width)

    def read(self, offset: int, size: int) -> int:
        if not (0 <= offset and offset + size <= self.size and size in (1, 2, 4, 8)):
            return 0
        if size == 8:    # as QEMU's 4-byte implementation: two accesses
            return self.read(offset, 4) | self.read(offset + 4, 4) << 32
        cmd = self.cmd
        if cmd in _STATUS_MODES:
            if size > self.device_width:
                return self._replicate(self.status, size)
            return self.status
        if cmd in (CMD_READ_ID, CMD_CFI_QUERY):
            value = 0
            for i in range(0, size, self.bank_width):
                value |= self._query(offset + i) << (8 * i)
            return value & ((1 << (8 * size)) - 1) if size < self.bank_width else value
        if cmd != 0:      # an unknown mode: back to reading the array, as QEMU
            self.cmd = self.wcycle = 0
        return int.from_bytes(self.storage[offset:offset + size], "little")

    # -- writes ------------------------------------------------------------------------------
    def write(self, offset: int, size: int, value: int) -> None:
        if not (0 <= offset and offset + size <= self.size and size in (1, 2, 4, 8)):
            return
        if size == 8:
            self.write(offset, 4, value & 0xFFFFFFFF)
            self.write(offset + 4, 4, value >> 32)
            return
        value &= (1 << (8 * size)) - 1
        cmd = value & 0xFF
        if self.wcycle == 0:
            self._set_romd(False)      # I/O mode while a command runs
            self._first_cycle(offset, cmd)
        elif self.wcycle == 1:
            self._second_cycle(offset, size, value, cmd)
        elif self.wcycle == 2:
            self._buffer_data(offset, size, value)
        else:
            if self.cmd == CMD_WRITE_BUFFER and cmd == CMD_CONFIRM:
                self.wcycle = 0
                self.status |= SR_READY
            else:
                self._read_array()

    def _first_cycle(self, offset: int, cmd: int) -> None:
        if cmd in (CMD_READ_ARRAY, CMD_READ_ARRAY_QEMU, CMD_AMD_PROBE):
            self._read_array()
        elif cmd == CMD_CLEAR_STATUS:
            self.status = 0
            self._read_array()
        elif cmd in (CMD_READ_STATUS, CMD_READ_ID):
            self.cmd = cmd
        elif cmd in (CMD_BLOCK_ERASE, CMD_BLOCK_ERASE_ALT):
            # QEMU erases on the setup cycle, and 0xd0 completes the command.
            start = offset & ~(self.sector_len - 1)
            if self.read_only:
                self.status |= SR_ERASE_ERROR
            else:
                self.storage[start:start + self.sector_len] = b"\xff" * self.sector_len
                self._on_update(start, start + self.sector_len)
            self.status |= SR_READY
            self.cmd, self.wcycle = cmd, 1
        elif cmd == CMD_WRITE_BUFFER:
            self.status |= SR_READY
            self.cmd, self.wcycle = cmd, 1
        elif cmd in (CMD_PROGRAM, CMD_PROGRAM_ALT, CMD_LOCK_SETUP, CMD_CFI_QUERY):
            self.cmd, self.wcycle = cmd, 1
        else:
            self._read_array()          # an unknown command (QEMU's error_flash)

    def _second_cycle(self, offset: int, size: int, value: int, cmd: int) -> None:
        mode = self.cmd
        if mode in (CMD_PROGRAM, CMD_PROGRAM_ALT):
            self._program(offset, size, value)
            self.status |= SR_READY
            self.wcycle = 0
        elif mode in (CMD_BLOCK_ERASE, CMD_BLOCK_ERASE_ALT, CMD_LOCK_SETUP):
            if cmd == CMD_CONFIRM or (mode == CMD_LOCK_SETUP and cmd == CMD_LOCK_BLOCK):
                self.wcycle = 0
                self.status |= SR_READY
            else:
                self._read_array()
        elif mode == CMD_WRITE_BUFFER:
            # The word count - 1, in one chip's width (each chip gets the same count).
            self.counter = value & ((1 << (8 * self.device_width)) - 1)
            self.wcycle = 2
        elif mode == CMD_CFI_QUERY:
            if cmd == CMD_READ_ARRAY:
                self._read_array()
        else:
            self._read_array()

    def _buffer_data(self, offset: int, size: int, value: int) -> None:
        if self.cmd != CMD_WRITE_BUFFER:
            self._read_array()
            return
        self._program(offset, size, value)
        self.status |= SR_READY
        if self.counter == 0:
            self.wcycle = 3             # the confirm cycle
            if self.read_only:
                self.status |= SR_PROGRAM_ERROR
        self.counter = (self.counter - 1) & 0xFFFFFFFF

    def _program(self, offset: int, size: int, value: int) -> None:
        """Store ``value`` at ``offset`` (QEMU stores it; real flash could only clear bits)."""
        if self.read_only:
            self.status |= SR_PROGRAM_ERROR
            return
        self.storage[offset:offset + size] = value.to_bytes(size, "little")
        self._on_update(offset, offset + size)

    def _read_array(self) -> None:
        self.cmd = 0
        self.wcycle = 0
        self._set_romd(True)
