"""QEMU's firmware configuration device (fw_cfg), MMIO flavour with DMA.

Interface as QEMU documents it (docs/specs/fw_cfg.rst) for the ARM virt
board, 0x18 bytes of registers, all big-endian as seen by the guest:

=======  =====  ===============================================================
0x00     1-8    data: the next bytes of the selected item, in item order
0x08     2      selector: selects an item and rewinds it (write-only)
0x10     4/8    DMA address: writing it (its low half, or all 8 bytes) runs the
                FWCfgDmaAccess at that guest address; reads "QEMU CFG"
=======  =====  ===============================================================

Items are keyed by a 16-bit selector (FW_CFG_ENTRY_MASK 0x3fff of it; the
arch-local space 0x8000 is empty on ARM).  0x0000 is the "QEMU" signature,
0x0001 the interface id (bit 0 traditional, bit 1 DMA), 0x0019 the file
directory (a be32 count, then per file be32 size, be16 select, be16
reserved and a 56-byte NUL-terminated name) of the named items from 0x0020,
sorted by name as QEMU sorts them.

A DMA access descriptor (FWCfgDmaAccess, all big-endian): be32 control
(ERROR 0x01, READ 0x02, SKIP 0x04, SELECT 0x08 with the selector in bits
31:16, WRITE 0x10), be32 length, be64 address.  The device writes the
control word back as 0, or ERROR.  Everything in it is guest-controlled:
the descriptor and every buffer must lie in guest RAM, else the access
ends with ERROR; no item here is writable (a DMA write is an ERROR, as QEMU
answers a write to a read-only item); a read past the item's end fills
zeros, as QEMU does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kemu.errors import ConfigError, MemoryAccessError
from kemu.memory import GuestMemory

# Register offsets and sizes.
DATA = 0x00
SELECTOR = 0x08
DMA_ADDRESS = 0x10
REGISTERS_SIZE = 0x18

# Well-known selectors (QEMU include/standard-headers/linux/qemu_fw_cfg.h).
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_KERNEL_SIZE = 0x08
FW_CFG_INITRD_SIZE = 0x0B
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_KERNEL_DATA = 0x11
FW_CFG_INITRD_DATA = 0x12
FW_CFG_CMDLINE_SIZE = 0x14
FW_CFG_CMDLINE_DATA = 0x15
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
#: QEMU's default number of file slots (FW_CFG_FILE_SLOTS_DFLT).
FILE_SLOTS = 0x20
MAX_ENTRY = FW_CFG_FILE_FIRST + FILE_SLOTS
FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_ENTRY_MASK = 0x3FFF
#: A file name's room in the directory, the NUL included (FW_CFG_MAX_FILE_PATH).
MAX_FILE_PATH = 56

FW_CFG_VERSION = 0x01
FW_CFG_VERSION_DMA = 0x02

SIGNATURE = b"QEMU"
DMA_SIGNATURE = b"QEMU CFG"

# FWCfgDmaAccess.control bits.
DMA_CTL_ERROR = 0x01
DMA_CTL_READ = 0x02
DMA_CTL_SKIP = 0x04
DMA_CTL_SELECT = 0x08
DMA_CTL_WRITE = 0x10
DMA_ACCESS = struct.Struct(">IIQ")   # control, length, address

#: Zero fill of a read past an item's end is done in pieces of this size.
_ZERO_CHUNK = 1 << 20


def _swap(value: int, size: int) -> int:
    """A big-endian register's value from the little-endian access the CPU made."""
    return int.from_bytes(value.to_bytes(size, "little"), "big")


@dataclass(frozen=True)
class FwCfgState:
    """What a guest changed: the selected item, where it is in it, the DMA address.
    The items themselves are configuration (the command line), not state."""

    version: int
    selected: int | None
    offset: int
    dma_address: int


@dataclass(frozen=True)
class FwCfgFile:
    """One entry of the file directory."""

    name: str
    select: int
    size: int


class FwCfg:
    """The fw_cfg device: items, the selector state machine and DMA."""

    name = "fw-cfg"

    def __init__(self, memory: GuestMemory, nb_cpus: int = 1, max_cpus: int | None = None,
                 nographic: bool = False) -> None:
        self._memory = memory
        self._items: dict[int, bytes] = {}
        self._files: dict[str, bytes] = {}
        self._selected: int | None = None
        self._offset = 0
        self._dma_address = 0
        self.add_item(FW_CFG_SIGNATURE, SIGNATURE)
        self.add_item(FW_CFG_ID, struct.pack("<I", FW_CFG_VERSION | FW_CFG_VERSION_DMA))
        self.add_item(FW_CFG_UUID, bytes(16))
        self.add_item(FW_CFG_NOGRAPHIC, struct.pack("<H", int(nographic)))
        self.add_item(FW_CFG_BOOT_MENU, struct.pack("<H", 0))
        self.add_item(FW_CFG_NB_CPUS, struct.pack("<H", nb_cpus))
        self.add_item(FW_CFG_MAX_CPUS, struct.pack("<H", max_cpus or nb_cpus))
        self._rebuild_directory()

    # -- items -------------------------------------------------------------------------------
    def add_item(self, key: int, data: bytes) -> None:
        """A numbered item (below the file range)."""
        if not 0 <= key < FW_CFG_FILE_FIRST:
            raise ValueError(f"fw_cfg key {key:#x} is not a numbered item")
        self._items[key] = bytes(data)

    def add_file(self, name: str, data: bytes) -> None:
        """A named item, as ``-fw_cfg name=NAME,...`` adds it; refused in one line when
        QEMU would refuse it."""
        raw = name.encode()
        if not raw or len(raw) >= MAX_FILE_PATH:
            raise ConfigError(f"-fw_cfg: name {name!r} must be 1 to {MAX_FILE_PATH - 1} bytes")
        if name in self._files:
            raise ConfigError(f"-fw_cfg: duplicate fw_cfg file name {name!r}")
        if len(self._files) >= FILE_SLOTS:
            raise ConfigError(f"-fw_cfg: no more than {FILE_SLOTS} fw_cfg files")
        if len(data) >= 1 << 32:
            raise ConfigError(f"-fw_cfg: {name!r} is larger than 4 GiB")
        self._files[name] = bytes(data)
        self._rebuild_directory()

    def add_kernel(self, kernel: bytes, initrd: bytes | None, cmdline: str | None) -> None:
        """The items QEMU's ARM boot code (arm_setup_firmware_boot) fills when
        -kernel is given to a firmware: kernel (already decompressed), initrd
        (size 0 without one) and the command line with its NUL."""
        self.add_item(FW_CFG_KERNEL_SIZE, struct.pack("<I", len(kernel)))
        self.add_item(FW_CFG_KERNEL_DATA, kernel)
        self.add_item(FW_CFG_INITRD_SIZE, struct.pack("<I", len(initrd or b"")))
        self.add_item(FW_CFG_INITRD_DATA, initrd or b"")
        if cmdline is not None:
            data = cmdline.encode() + b"\0"
            self.add_item(FW_CFG_CMDLINE_SIZE, struct.pack("<I", len(data)))
            self.add_item(FW_CFG_CMDLINE_DATA, data)

    def files(self) -> list[FwCfgFile]:
        return [FwCfgFile(name, FW_CFG_FILE_FIRST + i, len(self._files[name]))
                for i, name in enumerate(sorted(self._files))]

    def _rebuild_directory(self) -> None:
        entries = self.files()
        out = bytearray(struct.pack(">I", len(entries)))
        for f in entries:
            out += struct.pack(">IHH", f.size, f.select, 0)
            out += f.name.encode().ljust(MAX_FILE_PATH, b"\0")
        self._items[FW_CFG_FILE_DIR] = bytes(out)

    def _item(self, key: int) -> bytes | None:
        if FW_CFG_FILE_FIRST <= key < MAX_ENTRY:
            names = sorted(self._files)
            i = key - FW_CFG_FILE_FIRST
            return self._files[names[i]] if i < len(names) else None
        return self._items.get(key)

    def reset(self) -> None:
        """QEMU's fw_cfg_reset: the signature selected, no DMA address."""
        self.select(FW_CFG_SIGNATURE)
        self._dma_address = 0

    def save(self) -> FwCfgState:
        return FwCfgState(1, self._selected, self._offset, self._dma_address)

    def restore(self, state: FwCfgState) -> None:
        from kemu.state import check_version
        check_version("fw_cfg", state.version)
        self.select(FW_CFG_SIGNATURE if state.selected is None else state.selected)
        if state.selected is None:
            self._selected = None
        self._offset = max(0, state.offset)
        self._dma_address = state.dma_address & ((1 << 64) - 1)

    # -- selector and data -------------------------------------------------------------------
    def select(self, key: int) -> None:
        """QEMU's fw_cfg_select: rewind, and an invalid key selects nothing."""
        self._offset = 0
        if key & FW_CFG_ARCH_LOCAL or (key & FW_CFG_ENTRY_MASK) >= MAX_ENTRY:
            self._selected = None     # no arch-local items on ARM
        else:
            self._selected = key & FW_CFG_ENTRY_MASK

    def _current(self) -> bytes | None:
        return None if self._selected is None else self._item(self._selected)

    def _read_data(self, size: int) -> bytes:
        """The next ``size`` bytes of the item, zero-padded past its end."""
        data = self._current()
        if data is None or self._offset >= len(data):
            return bytes(size)
        chunk = data[self._offset:self._offset + size]
        self._offset += len(chunk)
        return chunk.ljust(size, b"\0")

    # -- registers ---------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if DATA <= offset < DATA + 8 and 1 <= size <= 8:
            return int.from_bytes(self._read_data(size), "little")
        if DMA_ADDRESS <= offset and offset + size <= DMA_ADDRESS + 8 and size in (4, 8):
            start = offset - DMA_ADDRESS
            return int.from_bytes(DMA_SIGNATURE[start:start + size], "little")
        return 0   # the selector reads 0, as QEMU's; other accesses read 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == SELECTOR and size == 2:
            self.select(_swap(value, 2))
        elif offset == DMA_ADDRESS and size == 8:
            self._dma_address = _swap(value, 8)
            self.dma_transfer(self._dma_address)
        elif offset == DMA_ADDRESS and size == 4:
            self._dma_address = _swap(value, 4) << 32
        elif offset == DMA_ADDRESS + 4 and size == 4:
            self._dma_address |= _swap(value, 4)
            self.dma_transfer(self._dma_address)
        # Data register writes are ignored (QEMU 2.4+); other accesses too.

    # -- DMA ---------------------------------------------------------------------------------
    def dma_transfer(self, address: int) -> None:
        """Run the FWCfgDmaAccess at guest physical ``address`` (QEMU's fw_cfg_dma_transfer)."""
        memory = self._memory
        try:
            control, length, buffer = memory.read_obj(address, DMA_ACCESS)
        except MemoryAccessError:
            return   # QEMU drops a descriptor it cannot read (nothing to report into)
        if control & DMA_CTL_SELECT:
            self.select(control >> 16)
        error = 0
        if control & DMA_CTL_READ:
            kind = "read"
        elif control & DMA_CTL_WRITE:
            kind = "write"
        elif control & DMA_CTL_SKIP:
            kind = "skip"
        else:
            kind, length = "none", 0
        data = self._current()
        while length > 0:
            if data is None or self._offset >= len(data):
                n = length
                if kind == "read" and not self._fill_zero(buffer, n):
                    error = DMA_CTL_ERROR
                elif kind == "write":
                    error = DMA_CTL_ERROR
            else:
                n = min(length, len(data) - self._offset)
                if kind == "read":
                    try:
                        memory.write(buffer, data[self._offset:self._offset + n])
                    except MemoryAccessError:
                        error = DMA_CTL_ERROR
                elif kind == "write":
                    error = DMA_CTL_ERROR   # no writable item
                self._offset += n
            buffer += n
            length -= n
            if error:
                break
        try:
            memory.write(address, struct.pack(">I", error))
        except MemoryAccessError:
            pass

    def _fill_zero(self, address: int, length: int) -> bool:
        if not self._memory.contains(address, length):
            return False
        while length > 0:
            n = min(length, _ZERO_CHUNK)
            self._memory.write(address, bytes(n))
            address += n
            length -= n
        return True
