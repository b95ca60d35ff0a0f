"""Which kernel, where: the aarch64 direct kernel boot of QEMU's virt (hw/arm/boot.c).

QEMU 7.2 (checked against qemu-system-aarch64 by tests/unit/test_arm64_boot.py):

* an ELF is not Linux: its ``PT_LOAD`` segments go to their physical
  addresses, the CPU starts at ``e_entry`` with every register zero; the
  device tree goes to the start of RAM when the image leaves room there
  (1 MiB, QEMU's device tree size, below its lowest address), and nowhere
  otherwise;
* anything else is Linux ("assume that raw images are linux kernels"): an
  arm64 Image at ``text_offset`` from the start of RAM (2 MiB further when
  the offset would overlap QEMU's 4 KiB boot stub), a file without the
  Image header (a raw binary) at RAM + 0x80000 (``KERNEL64_LOAD_ADDR``),
  either possibly gzip-compressed; x0 holds the device tree's address;
* the initrd of a Linux kernel goes to RAM + min(RAM / 2, 128 MiB), page
  aligned and not below the kernel's end, and the device tree after the
  initrd, aligned to 2 MiB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kemu.boot import elf
from kemu.boot.linux_arm64 import Arm64Image, inflate, read_boot_file
from kemu.errors import BootError
from kemu.memory import GuestMemory

MiB = 1 << 20
KERNEL64_LOAD_ADDR = 0x80000
BOOTLOADER_MAX_SIZE = 0x1000
PAGE = 0x1000
DTB_ALIGN = 2 * MiB
#: Room an arm64 Image needs beyond what is loaded to get going (kemu's check,
#: so that too small a -m fails in one line rather than deep in the guest).
LINUX_HEADROOM = 32 * MiB
#: The size QEMU's virt gives its device tree (fdt totalsize): below an ELF
#: image QEMU puts it only where this much room is left, and silently
#: leaves it out otherwise.
QEMU_FDT_SIZE = 1 * MiB


@dataclass(frozen=True)
class Kernel:
    kind: str                          # "Image", "raw" or "ELF"
    segments: tuple[elf.Segment, ...]  # (address, bytes, size in memory)
    entry: int
    end: int                           # QEMU's image_high_addr
    is_linux: bool

    @property
    def start(self) -> int:
        return min(s.paddr for s in self.segments)


def parse_kernel(data: bytes, ram_base: int, what: str = "kernel") -> Kernel:
    """An ELF, an arm64 Image or a raw binary, placed as QEMU places it."""
    if elf.is_elf(data):
        image = elf.parse(data, what)
        return Kernel("ELF", image.segments, image.entry, image.high, is_linux=False)
    data = inflate(data, what)
    if Arm64Image.has_magic(data):
        img = Arm64Image.parse(data, what)
        offset = img.text_offset
        if offset < BOOTLOADER_MAX_SIZE:
            offset += 2 * MiB
        entry = ram_base + offset
        return Kernel("Image", (elf.Segment(entry, img.data, img.image_size),), entry,
                      entry + img.image_size, is_linux=True)
    if not data:
        raise BootError(f"{what}: empty file")
    entry = ram_base + KERNEL64_LOAD_ADDR
    return Kernel("raw", (elf.Segment(entry, data, len(data)),), entry, entry + len(data),
                  is_linux=True)


def load_kernel_file(path: str | Path, ram_base: int) -> Kernel:
    return parse_kernel(read_boot_file(path, "kernel"), ram_base, f"kernel {path}")


@dataclass(frozen=True)
class BootLayout:
    kernel: Kernel
    initrd_addr: int
    initrd_size: int
    #: Where the device tree goes (None: nowhere, an ELF that covers RAM's start).
    dtb_addr: int | None
    #: The most bytes the device tree may take at ``dtb_addr``.
    dtb_room: int

    @property
    def entry(self) -> int:
        return self.kernel.entry

    @property
    def x0(self) -> int:
        """Linux gets the device tree in x0 (booting.rst); anything else zero."""
        return self.dtb_addr or 0 if self.kernel.is_linux else 0


def _align(value: int, to: int) -> int:
    return (value + to - 1) & ~(to - 1)


def plan_layout(kernel: Kernel, ram_base: int, ram_size: int, initrd_size: int) -> BootLayout:
    """Place kernel, initrd and device tree as QEMU does, or say in one line why not."""
    ram_end = ram_base + ram_size
    for seg in kernel.segments:
        if seg.paddr < ram_base or seg.paddr + seg.memsz > ram_end:
            if kernel.kind == "ELF":
                raise BootError(f"kernel: ELF segment at {seg.paddr:#x}+{seg.memsz:#x} lies "
                                f"outside RAM ({ram_base:#x}-{ram_end:#x})")
            raise BootError(f"too little memory: the {kernel.kind} kernel needs "
                            f"{(seg.paddr + seg.memsz - ram_base + MiB - 1) >> 20} MiB of RAM, "
                            f"the machine has {ram_size >> 20} MiB")
    if not kernel.is_linux:
        room = kernel.start - ram_base if kernel.start > ram_base else 0
        if kernel.end <= ram_base:
            room = ram_size
        if room < QEMU_FDT_SIZE:
            return BootLayout(kernel, 0, 0, None, 0)
        return BootLayout(kernel, 0, 0, ram_base, room)
    if kernel.kind == "Image":
        need = kernel.end - ram_base + initrd_size + LINUX_HEADROOM
        if need > ram_size:
            raise BootError(
                f"too little memory: kernel and initrd need at least {_align(need, MiB) >> 20} "
                f"MiB of RAM, the machine has {ram_size >> 20} MiB")
    initrd_addr = _align(max(ram_base + min(ram_size // 2, 128 * MiB), kernel.end), PAGE)
    if initrd_addr + initrd_size > ram_end:
        raise BootError(f"too little memory: the initrd does not fit after the kernel in "
                        f"{ram_size >> 20} MiB of RAM")
    dtb_addr = _align(initrd_addr + initrd_size, DTB_ALIGN)
    if dtb_addr >= ram_end:
        raise BootError("too little memory: no room for the device tree after kernel and initrd")
    return BootLayout(kernel, initrd_addr, initrd_size, dtb_addr, ram_end - dtb_addr)


def load(memory: GuestMemory, layout: BootLayout, initrd: bytes | None, dtb: bytes) -> None:
    """Write kernel, initrd and device tree into guest RAM (again at every reset)."""
    for seg in layout.kernel.segments:
        memory.write(seg.paddr, seg.data)
        if seg.memsz > len(seg.data):
            memory.write(seg.paddr + len(seg.data), bytes(seg.memsz - len(seg.data)))
    if initrd:
        memory.write(layout.initrd_addr, initrd)
    if layout.dtb_addr is not None:
        if len(dtb) > layout.dtb_room:
            raise BootError(f"device tree ({len(dtb)} bytes) does not fit at "
                            f"{layout.dtb_addr:#x} ({layout.dtb_room} bytes of room)")
        memory.write(layout.dtb_addr, dtb)
