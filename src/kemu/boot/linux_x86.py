"""Loading an x86-64 Linux kernel: bzImage (64-bit boot protocol) or PVH vmlinux.

bzImage, per the Linux/x86 boot protocol (Documentation/x86/boot.rst):

* The real-mode setup occupies ``(setup_sects + 1) * 512`` bytes (0 sectors
  means 4); the setup header sits at 0x1f1 with ``boot_flag`` 0xAA55 at
  0x1fe and the magic "HdrS" at 0x202, and ends at ``0x202 + byte[0x201]``.
* The rest of the file, the protected-mode kernel, is loaded at 1 MiB
  (``LOADED_HIGH``).  The 64-bit entry point is its load address + 0x200
  ("64-bit Boot Protocol", protocol 2.12+ with ``XLF_KERNEL_64``).
* The loader fills a zero page (``struct boot_params``, 4 KiB): the setup
  header copied from the image and then ``type_of_loader`` 0xff,
  ``cmd_line_ptr`` (at most ``cmdline_size`` bytes), ``ramdisk_image`` /
  ``ramdisk_size`` (the initrd ends below ``initrd_addr_max``), and the
  e820 map (arch/x86/include/uapi/asm/bootparam.h: ``e820_entries`` at
  0x1e8, ``e820_table`` at 0x2d0, 128 entries of 20 bytes).
* The kernel needs ``init_size`` bytes of RAM from its runtime start
  address (``pref_address``, or the load address rounded up to
  ``kernel_alignment`` when relocatable), so the initrd goes above that.

PVH, per Xen's docs/misc/pvh.pandoc and xen/include/public/arch-x86/hvm/start_info.h:
an ELF ``vmlinux`` whose ``XEN_ELFNOTE_PHYS32_ENTRY`` note (type 18, owner
"Xen") gives a 32-bit entry point, entered with ``%ebx`` pointing at a
``struct hvm_start_info`` (magic 0x336ec578, version 1 with a memory map).

Everything here is pure layout: functions take and return bytes and
addresses, and :func:`load_bzimage` / :func:`load_pvh` only write into a
:class:`~kemu.memory.GuestMemory`.  Bad input raises a one-line
:class:`~kemu.errors.BootError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from kemu.boot import elf
from kemu.boot.linux_arm64 import read_boot_file
from kemu.errors import BootError
from kemu.memory import GuestMemory

# -- guest-physical layout (low memory as Firecracker lays it out) -----------------------
PVH_START_INFO_ADDR = 0x6000
PVH_MODLIST_ADDR = 0x6040
PVH_MEMMAP_ADDR = 0x6080
PVH_MEMMAP_MAX = (0x7000 - PVH_MEMMAP_ADDR) // 24
ZERO_PAGE_ADDR = 0x7000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000          # bytes reserved for the command line, NUL included
EBDA_START = 0x9FC00           # where the PC's Extended BIOS Data Area would start
HIMEM_START = 0x100000         # 1 MiB: where a LOADED_HIGH kernel goes
MMIO_HOLE_START = 0xC0000000   # the 32-bit MMIO hole: [3 GiB, 4 GiB)
MMIO_HOLE_END = 1 << 32

# -- e820 types (ACPI 6.5, 15 "System Address Map Interfaces") --------------------------
E820_RAM = 1
E820_RESERVED = 2
E820_MAX_ENTRIES_ZEROPAGE = 128

# -- setup header (boot.rst "The real-mode kernel header") ---------------------------------
BOOT_FLAG = 0xAA55
HDRS_MAGIC = 0x53726448        # "HdrS"
MIN_VERSION = 0x020C           # 2.12: XLF_KERNEL_64 / the 64-bit entry
LOADED_HIGH = 1 << 0
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
LOADER_TYPE_UNDEFINED = 0xFF
ENTRY_64_OFFSET = 0x200
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF     # before protocol 2.03

SETUP_HEADER_OFFSET = 0x1F1
SETUP_HEADER_END = 0x290       # end of boot_params.hdr (edd_mbr_sig_buffer follows)

#: (offset, struct format) of the header fields kemu reads or writes.
_HDR = {
    "setup_sects": (0x1F1, "B"), "syssize": (0x1F4, "I"), "vid_mode": (0x1FA, "H"),
    "boot_flag": (0x1FE, "H"), "jump": (0x200, "H"), "header": (0x202, "I"),
    "version": (0x206, "H"), "type_of_loader": (0x210, "B"), "loadflags": (0x211, "B"),
    "code32_start": (0x214, "I"), "ramdisk_image": (0x218, "I"),
    "ramdisk_size": (0x21C, "I"), "heap_end_ptr": (0x224, "H"),
    "cmd_line_ptr": (0x228, "I"), "initrd_addr_max": (0x22C, "I"),
    "kernel_alignment": (0x230, "I"), "relocatable_kernel": (0x234, "B"),
    "min_alignment": (0x235, "B"), "xloadflags": (0x236, "H"), "cmdline_size": (0x238, "I"),
    "payload_offset": (0x248, "I"), "payload_length": (0x24C, "I"),
    "pref_address": (0x258, "Q"), "init_size": (0x260, "I"),
}
SETUP_HEADER_MIN_FILE = 0x264   # bytes of file needed to read every field above

# -- zero page fields outside the header (bootparam.h) -------------------------------------
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SENTINEL = 0x1EF
BP_E820_TABLE = 0x2D0
E820_ENTRY = struct.Struct("<QQI")

# -- PVH -----------------------------------------------------------------------------------
XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC_VALUE = 0x336EC578
HVM_START_INFO = struct.Struct("<IIIIQQQQII")        # version 1, 56 bytes
HVM_MODLIST_ENTRY = struct.Struct("<QQQQ")
HVM_MEMMAP_ENTRY = struct.Struct("<QQII")
ELF64_EHDR = elf.EHDR
ELF64_PHDR = elf.PHDR
PT_LOAD = elf.PT_LOAD
PT_NOTE = 4
EM_X86_64 = 62
#: Refuse kernels whose segments or payload exceed this.
MAX_KERNEL_SIZE = 512 << 20


def _field(data: bytes, name: str) -> int:
    off, fmt = _HDR[name]
    return struct.unpack_from("<" + fmt, data, off)[0]


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


@dataclass(frozen=True)
class BzImage:
    """A parsed bzImage: its setup header fields and the protected-mode payload."""

    data: bytes
    setup_sects: int
    version: int
    loadflags: int
    xloadflags: int
    kernel_alignment: int
    relocatable: bool
    pref_address: int
    init_size: int
    initrd_addr_max: int
    cmdline_size: int
    header_end: int

    @property
    def setup_size(self) -> int:
        return (self.setup_sects + 1) * 512

    @property
    def payload(self) -> memoryview:
        return memoryview(self.data)[self.setup_size:]

    def runtime_start(self, load_addr: int = HIMEM_START) -> int:
        """Where the kernel runs from (boot.rst, the ``init_size`` field)."""
        if self.relocatable:
            start = max(load_addr, self.pref_address)
            align = self.kernel_alignment or 1
            return (start + align - 1) // align * align
        return self.pref_address

    def memory_end(self, load_addr: int = HIMEM_START) -> int:
        """First byte above what the kernel needs before it reads the e820 map."""
        return max(load_addr + len(self.payload),
                   self.runtime_start(load_addr) + self.init_size)

    @classmethod
    def parse(cls, data: bytes, what: str = "kernel") -> BzImage:
        if len(data) < SETUP_HEADER_MIN_FILE:
            raise BootError(f"{what}: truncated: {len(data)} bytes is too short for a "
                            "bzImage setup header")
        if _field(data, "boot_flag") != BOOT_FLAG:
            raise BootError(f"{what}: not a bzImage (no 0xAA55 boot flag at 0x1fe)")
        if _field(data, "header") != HDRS_MAGIC:
            raise BootError(f"{what}: not a bzImage, or older than boot protocol 2.00 "
                            "(no HdrS magic at 0x202)")
        version = _field(data, "version")
        if version < MIN_VERSION:
            raise BootError(f"{what}: boot protocol {version >> 8}.{version & 0xFF:02d} is too "
                            "old: 2.12 or later is needed for the 64-bit entry")
        xloadflags = _field(data, "xloadflags")
        if not xloadflags & XLF_KERNEL_64:
            raise BootError(f"{what}: not a 64-bit kernel (XLF_KERNEL_64 is clear)")
        loadflags = _field(data, "loadflags")
        if not loadflags & LOADED_HIGH:
            raise BootError(f"{what}: a zImage (not LOADED_HIGH) cannot be booted")
        setup_sects = _field(data, "setup_sects") or 4
        setup_size = (setup_sects + 1) * 512
        # As QEMU and boot loaders do, the kernel is the rest of the file: syssize
        # (in 16-byte units, so often a few bytes past the end) is not checked.
        if len(data) < setup_size:
            raise BootError(f"{what}: truncated: the header announces {setup_size} bytes of "
                            f"setup, the file has {len(data)}")
        init_size = _field(data, "init_size")
        payload_size = len(data) - setup_size
        if max(init_size, payload_size) > MAX_KERNEL_SIZE:
            raise BootError(f"{what}: too big: needs {max(init_size, payload_size) >> 20} MiB, "
                            f"the limit is {MAX_KERNEL_SIZE >> 20} MiB")
        align = _field(data, "kernel_alignment")
        return cls(
            data=bytes(data), setup_sects=setup_sects, version=version, loadflags=loadflags,
            xloadflags=xloadflags, kernel_alignment=align,
            relocatable=bool(_field(data, "relocatable_kernel")),
            pref_address=_field(data, "pref_address"), init_size=init_size,
            initrd_addr_max=_field(data, "initrd_addr_max") or DEFAULT_INITRD_ADDR_MAX,
            cmdline_size=_field(data, "cmdline_size"),
            header_end=min(0x202 + data[0x201], SETUP_HEADER_END))

    @classmethod
    def load_file(cls, path: str | Path) -> BzImage:
        return cls.parse(read_boot_file(path, "kernel"), f"kernel {path}")


def is_bzimage(data: bytes) -> bool:
    return len(data) >= 0x206 and _field(data, "boot_flag") == BOOT_FLAG and \
        _field(data, "header") == HDRS_MAGIC


# -- memory map ---------------------------------------------------------------------------------
def ram_layout(size: int) -> list[tuple[int, int]]:
    """Split ``size`` bytes of RAM around the 32-bit MMIO hole: ``[(base, size), ...]``."""
    if size <= MMIO_HOLE_START:
        return [(0, size)]
    return [(0, MMIO_HOLE_START), (MMIO_HOLE_END, size - MMIO_HOLE_START)]


def e820_map(ram: list[tuple[int, int]] | GuestMemory,
             reserved: list[tuple[int, int]] | tuple = ()) -> list[E820Entry]:
    """The e820 map of a PC without firmware: RAM below the EBDA, a reserved EBDA,
    nothing for the legacy VGA/ROM area [0xa0000, 1 MiB), RAM from 1 MiB, plus
    ``reserved`` ranges (e.g. ACPI tables or MMIO a board wants kept from RAM)."""
    if isinstance(ram, GuestMemory):
        ram = [(r.base, r.size) for r in ram.regions]
    out: list[E820Entry] = []
    for base, size in sorted(ram):
        end = base + size
        if base < EBDA_START:
            out.append(E820Entry(base, min(end, EBDA_START) - base, E820_RAM))
            if end > EBDA_START:
                out.append(E820Entry(EBDA_START, 0xA0000 - EBDA_START, E820_RESERVED))
        if end > HIMEM_START:
            start = max(base, HIMEM_START)
            out.append(E820Entry(start, end - start, E820_RAM))
    out.extend(E820Entry(b, s, E820_RESERVED) for b, s in reserved)
    out.sort(key=lambda e: e.addr)
    return out


def low_ram_end(e820: list[E820Entry]) -> int:
    """End of the RAM entry that starts at 1 MiB (where kernel and initrd go)."""
    for e in e820:
        if e.type == E820_RAM and e.addr <= HIMEM_START < e.end:
            return min(e.end, MMIO_HOLE_START)
    raise BootError("guest RAM must extend past 1 MiB to load a kernel")


def place_initrd(size: int, addr_max: int, ram_end: int, kernel_end: int) -> int:
    """Highest page-aligned address where ``size`` bytes end at or below ``addr_max``
    (inclusive, as ``initrd_addr_max``) and below ``ram_end``, above the kernel."""
    top = min(addr_max + 1, ram_end)
    addr = (top - size) & ~0xFFF
    if size > top or addr < kernel_end:
        raise BootError(f"initrd of {size} bytes does not fit in RAM between the kernel "
                        f"(ends {kernel_end:#x}) and {top:#x}: give the guest more memory")
    return addr


def check_cmdline(cmdline: str | bytes, limit: int) -> bytes:
    raw = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    if b"\0" in raw:
        raise BootError("kernel command line contains a NUL byte")
    if len(raw) > limit:
        raise BootError(f"kernel command line is {len(raw)} bytes, the kernel accepts "
                        f"at most {limit}")
    return raw


@dataclass(frozen=True)
class LinuxBoot:
    """Where things were put; what the vCPU setup needs."""

    entry: int                  # 64-bit entry (bzImage) or 32-bit PVH entry
    boot_params: int            # zero page (bzImage) or hvm_start_info (PVH)
    kernel_addr: int
    kernel_end: int
    cmdline_addr: int
    initrd_addr: int = 0
    initrd_size: int = 0
    e820: list[E820Entry] = field(default_factory=list)
    pvh: bool = False


def build_boot_params(image: BzImage, cmdline_addr: int, initrd_addr: int, initrd_size: int,
                      e820: list[E820Entry], acpi_rsdp: int = 0) -> bytes:
    """The 4 KiB zero page (``struct boot_params``) for ``image``."""
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError(f"{len(e820)} e820 entries, the zero page holds "
                        f"{E820_MAX_ENTRIES_ZEROPAGE}")
    bp = bytearray(4096)
    bp[SETUP_HEADER_OFFSET:image.header_end] = image.data[SETUP_HEADER_OFFSET:image.header_end]

    def put(name: str, value: int) -> None:
        off, fmt = _HDR[name]
        struct.pack_into("<" + fmt, bp, off, value)

    put("vid_mode", 0xFFFF)                 # "normal" video mode
    put("type_of_loader", LOADER_TYPE_UNDEFINED)
    put("cmd_line_ptr", cmdline_addr & 0xFFFFFFFF)
    put("ramdisk_image", initrd_addr & 0xFFFFFFFF)
    put("ramdisk_size", initrd_size & 0xFFFFFFFF)
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    struct.pack_into("<I", bp, BP_EXT_RAMDISK_IMAGE, initrd_addr >> 32)
    struct.pack_into("<I", bp, BP_EXT_RAMDISK_SIZE, initrd_size >> 32)
    struct.pack_into("<Q", bp, BP_ACPI_RSDP_ADDR, acpi_rsdp)
    bp[BP_E820_ENTRIES] = len(e820)
    for i, e in enumerate(e820):
        E820_ENTRY.pack_into(bp, BP_E820_TABLE + i * E820_ENTRY.size, e.addr, e.size, e.type)
    return bytes(bp)


def _write(memory: GuestMemory, addr: int, data: bytes | memoryview, what: str) -> None:
    if not memory.contains(addr, len(data)):
        raise BootError(f"{what} ({len(data)} bytes at {addr:#x}) does not fit in guest RAM: "
                        "give the guest more memory")
    memory.write(addr, data)


def load_bzimage(memory: GuestMemory, image: BzImage, cmdline: str | bytes = "",
                 initrd: bytes | None = None, e820: list[E820Entry] | None = None,
                 acpi_rsdp: int = 0) -> LinuxBoot:
    """Load ``image`` at 1 MiB, the command line, the initrd and the zero page."""
    e820 = e820_map(memory) if e820 is None else e820
    ram_end = low_ram_end(e820)
    kernel_end = image.memory_end(HIMEM_START)
    if kernel_end > ram_end:
        raise BootError(f"kernel needs RAM up to {kernel_end:#x} (init_size "
                        f"{image.init_size:#x}), RAM below 4 GiB ends at {ram_end:#x}: "
                        "give the guest more memory")
    raw = check_cmdline(cmdline, min(image.cmdline_size, CMDLINE_MAX - 1))
    initrd_addr = initrd_size = 0
    if initrd:
        initrd_size = len(initrd)
        initrd_addr = place_initrd(initrd_size, image.initrd_addr_max, ram_end, kernel_end)
        _write(memory, initrd_addr, initrd, "initrd")
    _write(memory, HIMEM_START, image.payload, "kernel")
    _write(memory, CMDLINE_ADDR, raw + b"\0", "command line")
    bp = build_boot_params(image, CMDLINE_ADDR, initrd_addr, initrd_size, e820, acpi_rsdp)
    _write(memory, ZERO_PAGE_ADDR, bp, "zero page")
    return LinuxBoot(entry=HIMEM_START + ENTRY_64_OFFSET, boot_params=ZERO_PAGE_ADDR,
                     kernel_addr=HIMEM_START, kernel_end=kernel_end, cmdline_addr=CMDLINE_ADDR,
                     initrd_addr=initrd_addr, initrd_size=initrd_size, e820=e820)


# -- PVH ------------------------------------------------------------------------------------------
ElfSegment = elf.Segment


@dataclass(frozen=True)
class PvhKernel:
    entry: int
    segments: tuple[ElfSegment, ...]

    @property
    def end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)

    @property
    def start(self) -> int:
        return min(s.paddr for s in self.segments)

    @classmethod
    def load_file(cls, path: str | Path) -> PvhKernel:
        return parse_pvh_elf(read_boot_file(path, "kernel"), f"kernel {path}")


def _notes(blob: bytes):
    off = 0
    while off + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, off)
        name_off = off + 12
        desc_off = name_off + (namesz + 3) // 4 * 4
        end = desc_off + (descsz + 3) // 4 * 4
        if end > len(blob) or namesz > len(blob) or descsz > len(blob):
            return
        yield blob[name_off:name_off + namesz], ntype, blob[desc_off:desc_off + descsz]
        off = end


def parse_pvh_elf(data: bytes, what: str = "kernel") -> PvhKernel:
    """An ELF64 x86-64 vmlinux with a ``XEN_ELFNOTE_PHYS32_ENTRY`` note."""
    if len(data) < ELF64_EHDR.size or data[:4] != b"\x7fELF":
        raise BootError(f"{what}: not an ELF file")
    (ident, _type, machine, _version, _entry, phoff, _shoff, _flags, _ehsize, phentsize,
     phnum, _shentsize, _shnum, _shstrndx) = ELF64_EHDR.unpack_from(data)
    if ident[4] != 2 or ident[5] != 1:
        raise BootError(f"{what}: not a little-endian 64-bit ELF file")
    if machine != EM_X86_64:
        raise BootError(f"{what}: ELF machine {machine} is not x86-64")
    if phentsize < ELF64_PHDR.size or phoff + phnum * phentsize > len(data):
        raise BootError(f"{what}: truncated: program headers lie outside the file")
    segments = []
    entry = None
    total = 0
    for i in range(phnum):
        p_type, _pf, offset, _vaddr, paddr, filesz, memsz, _align = \
            ELF64_PHDR.unpack_from(data, phoff + i * phentsize)
        if p_type not in (PT_LOAD, PT_NOTE):
            continue
        if offset + filesz > len(data):
            raise BootError(f"{what}: truncated: segment {i} ends at {offset + filesz:#x}, "
                            f"the file has {len(data):#x} bytes")
        if p_type == PT_NOTE:
            for name, ntype, desc in _notes(data[offset:offset + filesz]):
                if name.rstrip(b"\0") == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY \
                        and len(desc) in (4, 8):
                    entry = int.from_bytes(desc, "little")
            continue
        if filesz > memsz:
            raise BootError(f"{what}: segment {i} has more file bytes than memory bytes")
        total += memsz
        if total > MAX_KERNEL_SIZE:
            raise BootError(f"{what}: too big: segments exceed {MAX_KERNEL_SIZE >> 20} MiB")
        segments.append(ElfSegment(paddr, bytes(data[offset:offset + filesz]), memsz))
    if not segments:
        raise BootError(f"{what}: no loadable segments")
    if entry is None:
        raise BootError(f"{what}: no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY note); "
                        "the kernel needs CONFIG_PVH")
    if entry >= 1 << 32:
        raise BootError(f"{what}: PVH entry point {entry:#x} is above 4 GiB")
    return PvhKernel(entry, tuple(segments))


def build_start_info(cmdline_addr: int, memmap_addr: int, memmap_entries: int,
                     modlist_addr: int = 0, nr_modules: int = 0, rsdp: int = 0) -> bytes:
    """``struct hvm_start_info`` version 1 (start_info.h)."""
    return HVM_START_INFO.pack(HVM_START_MAGIC_VALUE, 1, 0, nr_modules, modlist_addr,
                               cmdline_addr, rsdp, memmap_addr, memmap_entries, 0)


def load_pvh(memory: GuestMemory, kernel: PvhKernel, cmdline: str | bytes = "",
             initrd: bytes | None = None, e820: list[E820Entry] | None = None,
             acpi_rsdp: int = 0) -> LinuxBoot:
    """Load the ELF segments, command line, initrd (module 0) and ``hvm_start_info``."""
    e820 = e820_map(memory) if e820 is None else e820
    if len(e820) > PVH_MEMMAP_MAX:
        raise BootError(f"{len(e820)} memory map entries, at most {PVH_MEMMAP_MAX} fit")
    for seg in kernel.segments:
        if seg.paddr < HIMEM_START:
            raise BootError(f"kernel segment at {seg.paddr:#x} overlaps the boot structures "
                            "below 1 MiB")
        if not memory.contains(seg.paddr, seg.memsz):
            raise BootError(f"kernel segment at {seg.paddr:#x}+{seg.memsz:#x} is outside "
                            "guest RAM: give the guest more memory")
        memory.write(seg.paddr, seg.data)
        memory.write(seg.paddr + len(seg.data), bytes(seg.memsz - len(seg.data)))
    raw = check_cmdline(cmdline, CMDLINE_MAX - 1)
    _write(memory, CMDLINE_ADDR, raw + b"\0", "command line")
    initrd_addr = initrd_size = 0
    nr_modules = 0
    if initrd:
        initrd_size = len(initrd)
        initrd_addr = place_initrd(initrd_size, MMIO_HOLE_START - 1, low_ram_end(e820),
                                   kernel.end)
        _write(memory, initrd_addr, initrd, "initrd")
        memory.write(PVH_MODLIST_ADDR, HVM_MODLIST_ENTRY.pack(initrd_addr, initrd_size, 0, 0))
        nr_modules = 1
    memory.write(PVH_MEMMAP_ADDR, b"".join(HVM_MEMMAP_ENTRY.pack(e.addr, e.size, e.type, 0)
                                           for e in e820))
    memory.write(PVH_START_INFO_ADDR, build_start_info(
        CMDLINE_ADDR, PVH_MEMMAP_ADDR, len(e820), PVH_MODLIST_ADDR if nr_modules else 0,
        nr_modules, acpi_rsdp))
    return LinuxBoot(entry=kernel.entry, boot_params=PVH_START_INFO_ADDR,
                     kernel_addr=kernel.start, kernel_end=kernel.end, cmdline_addr=CMDLINE_ADDR,
                     initrd_addr=initrd_addr, initrd_size=initrd_size, e820=e820, pvh=True)
