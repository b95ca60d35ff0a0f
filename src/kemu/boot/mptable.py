"""The Intel MultiProcessor Specification 1.4 table of a firmware-less PC.

Linux (arch/x86/kernel/mpparse.c) finds the MP floating pointer structure by
scanning the last KiB of base memory, the BIOS ROM area 0xF0000-0xFFFFF and
the EBDA; it points at the MP configuration table, which lists:

* one processor entry per vCPU (its local APIC id, enabled, the first the
  bootstrap processor): how Linux learns how many CPUs to start;
* the ISA bus, the I/O APIC (in KVM's irqchip: id, address 0xFEC00000);
* one I/O interrupt entry per I/O APIC pin: ISA IRQ n on pin n, as KVM's
  default GSI routing (no IRQ 0 to pin 2 override), with the polarity and
  trigger mode a board asks for (virtio-mmio holds its line high: level);
* the local interrupts: ExtINT on LINT0 of the BSP (virtual wire mode, the
  8259 before Linux switches to the I/O APIC) and NMI on LINT1 of all.

Structures and field orders from the MP spec, chapter 4 (tables 4-1 to 4-12),
as Linux's arch/x86/include/asm/mpspec_def.h declares them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

MPF_SIGNATURE = b"_MP_"
MPC_SIGNATURE = b"PCMP"
MP_SPEC_REV = 4                 # 1.4
APIC_DEFAULT_ADDR = 0xFEE00000
IOAPIC_DEFAULT_ADDR = 0xFEC00000
APIC_VERSION = 0x14             # integrated local APIC
IOAPIC_VERSION = 0x11
IOAPIC_PINS = 24

MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = range(5)
CPU_ENABLED = 1
CPU_BOOTPROCESSOR = 2
CPU_SIGNATURE = 0x600           # family 6
CPU_FEATURES = 0x201            # FPU, APIC
MP_IRQ_INT, MP_IRQ_NMI, MP_IRQ_SMI, MP_IRQ_EXTINT = range(4)
MPC_APIC_USABLE = 1

# I/O interrupt entry flags (table 4-10): polarity bits 1:0, trigger bits 3:2.
MP_IRQPOL_DEFAULT = 0x0
MP_IRQPOL_ACTIVE_HIGH = 0x1
MP_IRQPOL_ACTIVE_LOW = 0x3
MP_IRQTRIG_DEFAULT = 0x0
MP_IRQTRIG_EDGE = 0x4
MP_IRQTRIG_LEVEL = 0xC
LEVEL_HIGH = MP_IRQPOL_ACTIVE_HIGH | MP_IRQTRIG_LEVEL

BUS_ISA = 0

MPF = struct.Struct("<4sIBBB5s")                   # 16 bytes
MPC_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")   # 44 bytes
MPC_CPU = struct.Struct("<BBBBII8s")               # 20 bytes
MPC_BUS = struct.Struct("<BB6s")                   # 8 bytes
MPC_IOAPIC = struct.Struct("<BBBBI")               # 8 bytes
MPC_INTSRC = struct.Struct("<BBHBBBB")             # 8 bytes (also local interrupts)


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus it sum to zero modulo 256."""
    return -sum(data) & 0xFF


def mp_table_size(nr_cpus: int) -> int:
    return (MPF.size + MPC_HEADER.size + nr_cpus * MPC_CPU.size + MPC_BUS.size
            + MPC_IOAPIC.size + (IOAPIC_PINS + 2) * MPC_INTSRC.size)


def build_mp_table(addr: int, nr_cpus: int, irq_flags: dict[int, int] | None = None,
                   ioapic_addr: int = IOAPIC_DEFAULT_ADDR,
                   oem: bytes = b"KEMU", product: bytes = b"microvm") -> bytes:
    """The floating pointer at ``addr`` followed by the configuration table.

    ``irq_flags`` maps an IRQ (= I/O APIC pin) to its entry's flags; the others
    are "conforming to the bus" (ISA: edge, active high).
    """
    if not 1 <= nr_cpus <= 254:
        raise ValueError("the MP table holds 1 to 254 processors")
    flags = irq_flags or {}
    ioapic_id = nr_cpus            # the first id after the local APICs
    entries: list[bytes] = []
    for cpu in range(nr_cpus):
        cpu_flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries.append(MPC_CPU.pack(MP_PROCESSOR, cpu, APIC_VERSION, cpu_flags, CPU_SIGNATURE,
                                    CPU_FEATURES, bytes(8)))
    entries.append(MPC_BUS.pack(MP_BUS, BUS_ISA, b"ISA   "))
    entries.append(MPC_IOAPIC.pack(MP_IOAPIC, ioapic_id, IOAPIC_VERSION, MPC_APIC_USABLE,
                                   ioapic_addr))
    for irq in range(IOAPIC_PINS):
        entries.append(MPC_INTSRC.pack(MP_INTSRC, MP_IRQ_INT, flags.get(irq, 0), BUS_ISA, irq,
                                       ioapic_id, irq))
    entries.append(MPC_INTSRC.pack(MP_LINTSRC, MP_IRQ_EXTINT, 0, BUS_ISA, 0, 0, 0))
    entries.append(MPC_INTSRC.pack(MP_LINTSRC, MP_IRQ_NMI, 0, BUS_ISA, 0, 0xFF, 1))
    body = b"".join(entries)
    length = MPC_HEADER.size + len(body)
    header = MPC_HEADER.pack(MPC_SIGNATURE, length, MP_SPEC_REV, 0, oem.ljust(8)[:8],
                             product.ljust(12)[:12], 0, 0, len(entries), APIC_DEFAULT_ADDR,
                             0, 0, 0)
    table = bytearray(header + body)
    table[7] = checksum(table)
    mpf = bytearray(MPF.pack(MPF_SIGNATURE, addr + MPF.size, 1, MP_SPEC_REV, 0, bytes(5)))
    mpf[10] = checksum(mpf)
    return bytes(mpf + table)


def parse_mp_table(data: bytes) -> dict:
    """Read back what :func:`build_mp_table` wrote (for tests and diagnostics)."""
    sig, physptr, _length, _rev, _csum, _features = MPF.unpack_from(data)
    if sig != MPF_SIGNATURE or sum(data[:16]) & 0xFF:
        raise ValueError("bad MP floating pointer")
    table = data[16:]
    (sig, size, _rev, _c, _oem, _prod, _oemptr, _oemsize, count, lapic, _x, _xc, _r) = \
        MPC_HEADER.unpack_from(table)
    if sig != MPC_SIGNATURE or sum(table[:size]) & 0xFF:
        raise ValueError("bad MP configuration table")
    out: dict = {"physptr": physptr, "lapic": lapic, "cpus": [], "ioapics": [], "irqs": [],
                 "lints": []}
    off = MPC_HEADER.size
    for _ in range(count):
        kind = table[off]
        if kind == MP_PROCESSOR:
            _t, apic, _v, flags, _s, _f, _r = MPC_CPU.unpack_from(table, off)
            out["cpus"].append((apic, flags))
            off += MPC_CPU.size
        elif kind == MP_IOAPIC:
            _t, ioapic, _v, _fl, addr = MPC_IOAPIC.unpack_from(table, off)
            out["ioapics"].append((ioapic, addr))
            off += MPC_IOAPIC.size
        elif kind in (MP_INTSRC, MP_LINTSRC):
            _t, irqtype, flags, _bus, srcirq, dst, pin = MPC_INTSRC.unpack_from(table, off)
            out["irqs" if kind == MP_INTSRC else "lints"].append(
                (irqtype, flags, srcirq, dst, pin))
            off += MPC_INTSRC.size
        else:
            off += MPC_BUS.size
    return out


def level_triggered(irqs: Iterable[int]) -> dict[int, int]:
    return {irq: LEVEL_HIGH for irq in irqs}
