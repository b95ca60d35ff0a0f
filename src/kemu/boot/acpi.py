"""ACPI tables of a hardware-reduced x86 microVM (ACPI 6.5 specification).

What Linux needs to run on a PC without firmware, PCI or an MP-table parser
(Debian's cloud kernels have CONFIG_X86_MPPARSE and
CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES off):

* RSDP (5.2.5) -> XSDT (5.2.8) -> FADT, MADT; FADT -> DSDT.
* FADT (5.2.9) with HW_REDUCED_ACPI (no PM1/GPE blocks, no SCI, no PM
  timer), the 8042 flag of IAPC_BOOT_ARCH (the keyboard controller exists),
  a reset register (port 0x64 <- 0xFE: the i8042 reset line, so Linux's
  default ACPI reboot works) and the sleep control/status registers of
  4.8.3.7 (hardware-reduced sleep: ``SLP_TYPx << 2 | SLP_EN`` written to the
  control register powers off with \\_S5).
* MADT (5.2.12): one Processor Local APIC per vCPU, the I/O APIC at
  0xFEC00000 with GSI base 0, LINT1 as NMI.  KVM routes GSI n to pin n, so
  no Interrupt Source Override is given.
* DSDT (5.2.11.1) in AML (chapter 20): \\_S5, and in \\_SB the devices
  Linux would otherwise not find: COM1 (PNP0501), the i8042 (PNP0303),
  the CMOS RTC (PNP0B00) and each virtio-mmio slot (LNRO0005, as Linux's
  virtio_mmio ACPI match table and QEMU's microvm name it) with its
  registers and level-triggered interrupt.

Tables are built as bytes for a given guest-physical base; checksums
(5.2.1, sum of all bytes is zero) are filled in.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

OEM_ID = b"KEMU  "
OEM_TABLE_ID = b"MICROVM "
CREATOR_ID = b"KEMU"

HEADER = struct.Struct("<4sIBB6s8sI4sI")                # 36 bytes
GAS = struct.Struct("<BBBBQ")                           # Generic Address Structure
GAS_SYSTEM_IO = 1
ACCESS_BYTE = 1

FADT_REVISION = 6
FADT_MINOR = 5
FADT_SIZE = 276
FADT_F_WBINVD = 1 << 0
FADT_F_RESET_REG_SUP = 1 << 10
FADT_F_HW_REDUCED_ACPI = 1 << 20
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
CMOS_CENTURY_INDEX = 0x32

MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_LOCAL_APIC_NMI = 4
LAPIC_ADDR = 0xFEE00000
IOAPIC_ADDR = 0xFEC00000

#: Hardware-reduced sleep registers (4.8.3.7): SLP_EN and the SLP_TYP field.
SLEEP_CONTROL_SLP_EN = 0x20
SLEEP_TYPE_SHIFT = 2
SLEEP_TYPE_MASK = 0x1C
SLEEP_STATUS_WAK_STS = 0x80
S5_SLEEP_TYPE = 5

#: The Generic Event Device's selector bits (kemu's own layout, read to clear).
GED_EVENT_POWER_BUTTON = 1 << 0


def checksum(data: bytes | bytearray) -> int:
    return -sum(data) & 0xFF


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the 36-byte header, ``body``, the checksum."""
    data = bytearray(HEADER.pack(signature, HEADER.size + len(body), revision, 0, OEM_ID,
                                 OEM_TABLE_ID, 1, CREATOR_ID, 1) + body)
    data[9] = checksum(data)
    return bytes(data)


def gas_io(port: int, bits: int = 8) -> bytes:
    return GAS.pack(GAS_SYSTEM_IO, bits, 0, ACCESS_BYTE, port)


# -- AML (ACPI 6.5 chapter 20) ------------------------------------------------------------
NAME_OP = 0x08
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
BYTE_PREFIX = 0x0A
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
ONE_OP = 0x01
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82
OP_REGION_OP = 0x80            # after EXT_OP_PREFIX
FIELD_OP = 0x81                # after EXT_OP_PREFIX
METHOD_OP = 0x14
STORE_OP = 0x70
AND_OP = 0x7B
IF_OP = 0xA0
NOTIFY_OP = 0x86
LOCAL0_OP = 0x60
NULL_NAME = 0x00
ROOT_CHAR = 0x5C
DUAL_NAME_PREFIX = 0x2E
REGION_SYSTEM_IO = 0x01
FIELD_DWORD_ACC = 0x03
FIELD_WRITE_AS_ZEROS = 0x02 << 5


def pkg_length(payload_len: int) -> bytes:
    """PkgLength (20.2.4), counting its own bytes."""
    for n in (1, 2, 3, 4):
        total = payload_len + n
        if n == 1 and total < 0x40:
            return bytes((total,))
        if n > 1 and total < 1 << (4 + 8 * (n - 1)):
            out = [((n - 1) << 6) | (total & 0x0F)]
            out += [(total >> (4 + 8 * i)) & 0xFF for i in range(n - 1)]
            return bytes(out)
    raise ValueError("AML package too long")


def name_seg(name: str) -> bytes:
    raw = name.encode().ljust(4, b"_")
    if len(raw) != 4:
        raise ValueError(f"bad AML name {name!r}")
    return raw


def aml_int(value: int) -> bytes:
    if value == 1:
        return bytes((ONE_OP,))
    if value < 0x100:
        return bytes((BYTE_PREFIX, value))
    return bytes((DWORD_PREFIX,)) + struct.pack("<I", value)


def aml_name(name: str, value: bytes) -> bytes:
    return bytes((NAME_OP,)) + name_seg(name) + value


def aml_string(text: str) -> bytes:
    return bytes((STRING_PREFIX,)) + text.encode() + b"\0"


def aml_package(*items: bytes) -> bytes:
    body = bytes((len(items),)) + b"".join(items)
    return bytes((PACKAGE_OP,)) + pkg_length(len(body)) + body


def aml_buffer(data: bytes) -> bytes:
    body = aml_int(len(data)) if len(data) != 1 else bytes((BYTE_PREFIX, 1))
    body += data
    return bytes((BUFFER_OP,)) + pkg_length(len(body)) + body


def aml_device(name: str, *terms: bytes) -> bytes:
    body = name_seg(name) + b"".join(terms)
    return bytes((EXT_OP_PREFIX, DEVICE_OP)) + pkg_length(len(body)) + body


def aml_scope(path: bytes, *terms: bytes) -> bytes:
    body = path + b"".join(terms)
    return bytes((SCOPE_OP,)) + pkg_length(len(body)) + body


def aml_path(*segs: str) -> bytes:
    """An absolute name path: ``\\SEG`` or ``\\SEG.SEG`` (20.2.2)."""
    if len(segs) == 1:
        return bytes((ROOT_CHAR,)) + name_seg(segs[0])
    if len(segs) == 2:
        return bytes((ROOT_CHAR, DUAL_NAME_PREFIX)) + name_seg(segs[0]) + name_seg(segs[1])
    raise ValueError("aml_path: one or two segments")


def aml_io_region(name: str, port: int, length: int) -> bytes:
    """``OperationRegion (name, SystemIO, port, length)``."""
    return (bytes((EXT_OP_PREFIX, OP_REGION_OP)) + name_seg(name) + bytes((REGION_SYSTEM_IO,))
            + aml_int(port) + aml_int(length))


def aml_dword_field(region: str, field_name: str) -> bytes:
    """``Field (region, DWordAcc, NoLock, WriteAsZeros) { field_name, 32 }``."""
    body = (name_seg(region) + bytes((FIELD_DWORD_ACC | FIELD_WRITE_AS_ZEROS,))
            + name_seg(field_name) + bytes((32,)))      # 32 bits: a one-byte PkgLength
    return bytes((EXT_OP_PREFIX, FIELD_OP)) + pkg_length(len(body)) + body


def aml_method(name: str, args: int, *terms: bytes, serialized: bool = True) -> bytes:
    body = name_seg(name) + bytes((args | (0x08 if serialized else 0),)) + b"".join(terms)
    return bytes((METHOD_OP,)) + pkg_length(len(body)) + body


def aml_if(predicate: bytes, *terms: bytes) -> bytes:
    body = predicate + b"".join(terms)
    return bytes((IF_OP,)) + pkg_length(len(body)) + body


def aml_store_local0(source: bytes) -> bytes:
    """``Local0 = source``."""
    return bytes((STORE_OP,)) + source + bytes((LOCAL0_OP,))


def aml_local0_and(mask: int) -> bytes:
    """``Local0 & mask`` (no target)."""
    return bytes((AND_OP, LOCAL0_OP)) + aml_int(mask) + bytes((NULL_NAME,))


def aml_notify(target: bytes, value: int) -> bytes:
    return bytes((NOTIFY_OP,)) + target + aml_int(value)


# -- resource descriptors (6.4) -------------------------------------------------------------
def res_io(port: int, length: int) -> bytes:
    """I/O Port Descriptor (6.4.2.5), 16-bit decode, fixed at ``port``."""
    return struct.pack("<BBHHBB", 0x47, 0x01, port, port, 1, length)


def res_memory32_fixed(base: int, length: int) -> bytes:
    """32-bit Fixed Memory Range Descriptor (6.4.3.4), read/write."""
    return struct.pack("<BHBII", 0x86, 9, 0x01, base, length)


def res_interrupt(gsi: int, level: bool) -> bytes:
    """Extended Interrupt Descriptor (6.4.3.6): consumer, active high, exclusive."""
    flags = 0x01 | (0 if level else 0x02)
    return struct.pack("<BHBBI", 0x89, 6, flags, 1, gsi)


def res_word_bus_number(first: int, last: int) -> bytes:
    """Word Address Space Descriptor (6.4.3.5.3) of bus numbers, produced by a bridge
    (general flags: min and max fixed)."""
    return struct.pack("<BHBBBHHHHH", 0x88, 13, 2, 0x0C, 0, 0, first, last, 0,
                       last - first + 1)


def res_dword_memory(base: int, length: int) -> bytes:
    """DWord Address Space Descriptor (6.4.3.5.2) of a memory window a bridge produces:
    min and max fixed, read/write, non-cacheable."""
    return struct.pack("<BHBBBIIIII", 0x87, 23, 0, 0x0C, 0x01, 0, base, base + length - 1,
                       0, length)


def resource_template(*descriptors: bytes) -> bytes:
    return aml_buffer(b"".join(descriptors) + b"\x79\x00")     # End Tag, checksum 0


@dataclass(frozen=True)
class MmioDevice:
    """A virtio-mmio slot for the DSDT."""

    base: int
    size: int
    gsi: int


@dataclass(frozen=True)
class PcieHost:
    """A PCI Express host bridge (PCI Firmware 3.2 section 4.1): its ECAM window for
    buses 0..``last_bus`` (MCFG), its 32-bit memory window, and the GSIs of INTA-D."""

    ecam_base: int
    last_bus: int
    mmio_base: int
    mmio_size: int
    intx_gsis: tuple[int, int, int, int]


@dataclass
class AcpiConfig:
    nr_cpus: int
    sleep_control_port: int
    sleep_status_port: int
    reset_port: int = 0x64
    reset_value: int = 0xFE
    serial: tuple[int, int] | None = (0x3F8, 4)       # COM1 port, IRQ
    i8042: tuple[int, int, int] | None = (0x60, 0x64, 1)
    rtc: tuple[int, int] | None = (0x70, 8)
    virtio: list[MmioDevice] = field(default_factory=list)
    #: Generic Event Device (5.6.9) selector port and GSI: the power button.
    ged: tuple[int, int] | None = None
    #: PCI Express (QEMU's microvm pcie=on): MCFG, and \\_SB.PCI0 in the DSDT.
    pcie: PcieHost | None = None


def dsdt(cfg: AcpiConfig) -> bytes:
    devices = []
    if cfg.serial:
        port, irq = cfg.serial
        devices.append(aml_device("COM1", aml_name("_HID", aml_string("PNP0501")),
                                  aml_name("_UID", aml_int(0)),
                                  aml_name("_CRS", resource_template(
                                      res_io(port, 8), res_interrupt(irq, level=False)))))
    if cfg.i8042:
        data, cmd, irq = cfg.i8042
        devices.append(aml_device("PS2K", aml_name("_HID", aml_string("PNP0303")),
                                  aml_name("_CRS", resource_template(
                                      res_io(data, 1), res_io(cmd, 1),
                                      res_interrupt(irq, level=False)))))
    if cfg.rtc:
        port, irq = cfg.rtc
        devices.append(aml_device("RTC_", aml_name("_HID", aml_string("PNP0B00")),
                                  aml_name("_CRS", resource_template(
                                      res_io(port, 2), res_interrupt(irq, level=False)))))
    for i, dev in enumerate(cfg.virtio):
        devices.append(aml_device(f"V{i:03X}", aml_name("_HID", aml_string("LNRO0005")),
                                  aml_name("_UID", aml_int(i)),
                                  aml_name("_CCA", aml_int(1)),
                                  aml_name("_CRS", resource_template(
                                      res_memory32_fixed(dev.base, dev.size),
                                      res_interrupt(dev.gsi, level=True)))))
    if cfg.ged:
        port, gsi = cfg.ged
        devices.append(aml_device("PWRB", aml_name("_HID", aml_string("PNP0C0C")),
                                  aml_name("_UID", aml_int(0))))
        # The GED's interrupt runs _EVT; reading the selector says which event
        # fired (and clears it, lowering the line): bit 0 is the power button.
        devices.append(aml_device(
            "GED0", aml_name("_HID", aml_string("ACPI0013")), aml_name("_UID", aml_int(0)),
            aml_name("_CRS", resource_template(res_interrupt(gsi, level=True))),
            aml_io_region("EREG", port, 4), aml_dword_field("EREG", "ESEL"),
            aml_method("_EVT", 1,
                       aml_store_local0(name_seg("ESEL")),
                       aml_if(aml_local0_and(GED_EVENT_POWER_BUTTON),
                              aml_notify(aml_path("_SB_", "PWRB"), 0x80)))))
    if cfg.pcie:
        devices.append(pci_root(cfg.pcie))
        # Linux uses an ECAM only where a motherboard resource reserves it (PCI
        # Firmware 3.2 section 4.1.2; without port 0xCF8 it does not consult e820).
        devices.append(aml_device("RES0", aml_name("_HID", aml_string("PNP0C02")),
                                  aml_name("_CRS", resource_template(res_memory32_fixed(
                                      cfg.pcie.ecam_base, (cfg.pcie.last_bus + 1) << 20)))))
    body = aml_scope(b"\\_SB_", *devices)
    body += aml_name("_S5_", aml_package(aml_int(S5_SLEEP_TYPE), aml_int(0), aml_int(0),
                                         aml_int(0)))
    return table(b"DSDT", 2, body)


def pci_root(host: PcieHost) -> bytes:
    """``\\_SB.PCI0``: a PCI Express root bridge (PNP0A08, compatible PNP0A03) with the
    bus numbers and memory window it decodes, and its interrupt routing table (_PRT,
    6.2.13): device d's INTx pin p reaches GSI ``intx_gsis[(d + p) % 4]``, the
    swizzle of the host's INTx lines, with no link devices (source 0: a GSI)."""
    routes = [aml_package(aml_int((device << 16) | 0xFFFF), aml_int(pin), aml_int(0),
                          aml_int(host.intx_gsis[(device + pin) % 4]))
              for device in range(32) for pin in range(4)]
    return aml_device(
        "PCI0", aml_name("_HID", aml_string("PNP0A08")), aml_name("_CID", aml_string("PNP0A03")),
        aml_name("_SEG", aml_int(0)), aml_name("_UID", aml_int(0)), aml_name("_BBN", aml_int(0)),
        aml_name("_CRS", resource_template(res_word_bus_number(0, host.last_bus),
                                           res_dword_memory(host.mmio_base, host.mmio_size))),
        aml_name("_PRT", aml_package(*routes)))


def mcfg(host: PcieHost) -> bytes:
    """MCFG (PCI Firmware 3.2 section 4.1.2): one ECAM allocation, segment 0."""
    return table(b"MCFG", 1, bytes(8) + struct.pack("<QHBBI", host.ecam_base, 0, 0,
                                                    host.last_bus, 0))


def madt(nr_cpus: int) -> bytes:
    body = bytearray(struct.pack("<II", LAPIC_ADDR, 0))
    for cpu in range(nr_cpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, 1)       # enabled
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, nr_cpus, 0, IOAPIC_ADDR, 0)
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, 0xFF, 0, 1)
    return table(b"APIC", 5, bytes(body))


def fadt(cfg: AcpiConfig, dsdt_addr: int) -> bytes:
    body = bytearray(FADT_SIZE - HEADER.size)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into("<" + fmt, body, offset - HEADER.size, *values)

    put(40, "I", dsdt_addr)
    put(108, "B", CMOS_CENTURY_INDEX)
    # MSI needs a PCI bus to come from: with none, say so (Linux then never tries).
    put(109, "H", IAPC_8042 | IAPC_VGA_NOT_PRESENT | (0 if cfg.pcie else IAPC_MSI_NOT_SUPPORTED))
    put(112, "I", FADT_F_WBINVD | FADT_F_RESET_REG_SUP | FADT_F_HW_REDUCED_ACPI)
    body[116 - HEADER.size:128 - HEADER.size] = gas_io(cfg.reset_port)
    put(128, "B", cfg.reset_value)
    put(131, "B", FADT_MINOR)
    put(140, "Q", dsdt_addr)
    body[244 - HEADER.size:256 - HEADER.size] = gas_io(cfg.sleep_control_port)
    body[256 - HEADER.size:268 - HEADER.size] = gas_io(cfg.sleep_status_port)
    put(268, "Q", int.from_bytes(b"KEMU\0\0\0\0", "little"))
    return table(b"FACP", FADT_REVISION, bytes(body))


def xsdt(entries: list[int]) -> bytes:
    return table(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in entries))


def rsdp(xsdt_addr: int) -> bytes:
    """RSDP revision 2 (5.2.5.3): no RSDT, the XSDT's address."""
    data = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, 0, 36,
                                 xsdt_addr, 0, bytes(3)))
    data[8] = checksum(data[:20])
    data[32] = checksum(data)
    return bytes(data)


def _align(n: int, a: int = 16) -> int:
    return (n + a - 1) // a * a


def build_tables(base: int, cfg: AcpiConfig) -> tuple[int, bytes]:
    """All tables laid out from ``base``: (RSDP address, bytes to write at ``base``)."""
    blob = bytearray()
    rsdp_addr = base
    blob += bytes(36)
    xsdt_addr = base + _align(len(blob))
    entries = 3 if cfg.pcie else 2
    blob = blob.ljust(xsdt_addr - base, b"\0") + bytes(36 + 8 * entries)
    fadt_addr = base + _align(len(blob))
    blob = blob.ljust(fadt_addr - base, b"\0") + bytes(FADT_SIZE)
    madt_bytes = madt(cfg.nr_cpus)
    madt_addr = base + _align(len(blob))
    blob = blob.ljust(madt_addr - base, b"\0") + madt_bytes
    dsdt_bytes = dsdt(cfg)
    dsdt_addr = base + _align(len(blob))
    blob = blob.ljust(dsdt_addr - base, b"\0") + dsdt_bytes
    tables = [fadt_addr, madt_addr]
    if cfg.pcie:
        tables.append(base + _align(len(blob)))
        blob = blob.ljust(tables[-1] - base, b"\0") + mcfg(cfg.pcie)

    def place(addr: int, data: bytes) -> None:
        blob[addr - base:addr - base + len(data)] = data

    place(rsdp_addr, rsdp(xsdt_addr))
    place(xsdt_addr, xsdt(tables))
    place(fadt_addr, fadt(cfg, dsdt_addr))
    return rsdp_addr, bytes(blob)
