"""The virt board's two flash banks from ``-bios`` and ``-drive if=pflash``, as QEMU's virt.

QEMU's virt (hw/arm/virt.c, virt_flash_create/virt_firmware_init) always
has two pflash_cfi01 banks of 64 MiB at 0x0 and 0x04000000, 256 KiB
blocks, 4 bytes wide made of two x16 chips:

* ``-drive if=pflash,format=raw,file=F[,readonly=on][,unit=N]``: unit 0
  (flash0, firmware code) and unit 1 (flash1, UEFI variables); the image
  must be exactly the bank's size; writes reach the file at once unless
  ``readonly=on`` (then programming and erasing fail with status errors)
  or ``-snapshot``.
* ``-bios F``: F (at most 64 MiB, searched as given, then in QEMU's data
  directory) loaded into flash0's memory, which the guest may change
  but is never written back (no block backend, as QEMU).

The array of each bank is an anonymous host mapping that the vCPUs map
for reads and fetches while the bank is in read-array mode.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kemu.devices.pflash_cfi01 import PflashCfi01
from kemu.errors import ConfigError
from kemu.machines.config import DriveConfig, MachineConfig

FLASH_BASE = 0x00000000
FLASH_BANK_SIZE = 0x04000000
FLASH_BANKS = 2
FLASH_SECTOR = 256 << 10
#: Where QEMU looks for a -bios name that is not a path to a file (its data directory).
BIOS_DIRS = (Path("/usr/share/qemu"),)


@dataclass
class FlashBank:
    """One bank: the device, where it is, its host memory and its image file."""

    base: int
    device: PflashCfi01
    buffer: mmap.mmap
    fd: int | None = None
    #: Physical range changed since the bank last left read-array mode.
    dirty: list[int] = field(default_factory=list)

    @property
    def host_address(self) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))

    @property
    def size(self) -> int:
        return len(self.buffer)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def find_bios(name: Path) -> Path:
    """QEMU's qemu_find_file(QEMU_FILE_TYPE_BIOS): the name as given, then the data dirs."""
    if name.is_file():
        return name
    if "/" not in str(name):
        for d in BIOS_DIRS:
            if (d / name).is_file():
                return d / name
    raise ConfigError(f"Could not find ROM image '{name}'")


def pflash_units(config: MachineConfig) -> dict[int, DriveConfig]:
    """The -drive if=pflash drives by unit, numbered as QEMU numbers them."""
    units: dict[int, DriveConfig] = {}
    for drive in config.pflash:
        unit = drive.unit
        if unit is None:
            unit = 0
            while unit in units:
                unit += 1
        if unit in units:
            raise ConfigError(f"drive with bus=0, unit={unit} exists")
        if unit >= FLASH_BANKS:
            raise ConfigError(f"machine type does not support if=pflash,bus=0,unit={unit}")
        units[unit] = drive
    if config.bios is not None and 0 in units:
        raise ConfigError("The contents of the first flash device may be specified with "
                          "-bios or with -drive if=pflash... but you cannot use both "
                          "options at once")
    return units


def has_firmware(config: MachineConfig) -> bool:
    """QEMU's virt firmware_loaded: -bios, or a flash image in unit 0."""
    return config.bios is not None or 0 in pflash_units(config)


def _read_exact(fd: int, size: int, what: str) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, size - len(out), len(out))
        if not chunk:
            raise ConfigError(f"{what}: short read")
        out += chunk
    return bytes(out)


def _open_image(drive: DriveConfig, size: int, snapshot: bool) -> tuple[int, bool, bytes]:
    """The image file of a -drive if=pflash: fd, read-only, contents (exactly ``size``)."""
    if drive.format not in (None, "raw"):
        raise ConfigError(f"-drive if=pflash,format={drive.format}: kemu's flash takes raw "
                          "images (format=raw)")
    read_only = drive.read_only
    try:
        fd = os.open(drive.path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"Could not open '{drive.path}': {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"'{drive.path}': a flash image must be a regular file")
        if st.st_size != size:
            raise ConfigError(f"device requires {size} bytes, block backend provides "
                              f"{st.st_size} bytes")
        data = _read_exact(fd, size, str(drive.path))
    except BaseException:
        os.close(fd)
        raise
    if snapshot or drive.snapshot:       # writes stay in memory, as to QEMU's overlay
        os.close(fd)
        fd = -1
    return fd, read_only, data


def build_banks(config: MachineConfig,
                on_romd: Callable[["FlashBank", bool], None]) -> list[FlashBank]:
    """Both banks, loaded from -bios / -drive if=pflash; ``on_romd(bank, romd)`` is called
    when a bank enters or leaves read-array mode (its ``dirty`` range then says what changed)."""
    units = pflash_units(config)
    banks: list[FlashBank] = []
    try:
        for i in range(FLASH_BANKS):
            buffer = mmap.mmap(-1, FLASH_BANK_SIZE)
            fd = None
            read_only = False
            if i in units:
                fd, read_only, data = _open_image(units[i], FLASH_BANK_SIZE, config.snapshot)
                buffer[:] = data
                if fd < 0:
                    fd = None
            elif i == 0 and config.bios is not None:
                _load_bios(find_bios(config.bios), buffer)
            bank = FlashBank(FLASH_BASE + i * FLASH_BANK_SIZE, None, buffer, fd)  # type: ignore[arg-type]
            bank.device = PflashCfi01(buffer, sector_len=FLASH_SECTOR, read_only=read_only,
                                      on_romd=_romd_hook(bank, on_romd),
                                      on_update=_update_hook(bank))
            banks.append(bank)
    except BaseException:
        for bank in banks:
            bank.close()
        raise
    return banks


def _load_bios(path: Path, buffer: mmap.mmap) -> None:
    """QEMU's load_image_mr: the whole file at the bank's start, if it fits."""
    try:
        with open(path, "rb") as f:
            data = f.read(len(buffer) + 1)
    except OSError:
        raise ConfigError(f"Could not load ROM image '{path}'") from None
    if len(data) > len(buffer) or not data:
        raise ConfigError(f"Could not load ROM image '{path}'")
    buffer[:len(data)] = data


def _romd_hook(bank: FlashBank, on_romd: Callable[[FlashBank, bool], None]):
    def hook(romd: bool) -> None:
        on_romd(bank, romd)
        if romd:
            bank.dirty = []
    return hook


def _update_hook(bank: FlashBank):
    """QEMU's pflash_update: changed bytes go to the image at once; the range is kept
    so that code translated from it is dropped."""
    def hook(start: int, end: int) -> None:
        if bank.dirty:
            bank.dirty = [min(bank.dirty[0], start), max(bank.dirty[1], end)]
        else:
            bank.dirty = [start, end]
        if bank.fd is not None and not bank.device.read_only:
            try:
                os.pwrite(bank.fd, bank.buffer[start:end], start)
            except OSError as e:    # as QEMU: reported, the guest's view stays as written
                print(f"kemu: Could not update PFLASH: {e.strerror}", file=sys.stderr)
    return hook
