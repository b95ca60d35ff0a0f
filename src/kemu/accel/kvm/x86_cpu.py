"""x86-64 vCPU state a VMM sets up to enter a kernel directly, without firmware.

Two entry states are supported:

* **Linux 64-bit boot protocol** (Documentation/x86/boot.rst, "64-bit Boot
  Protocol"): long mode with paging on and an identity map covering the
  kernel, the zero page and the command line; a GDT whose ``__BOOT_CS``
  (0x10) is a flat execute/read code segment and ``__BOOT_DS`` (0x18) a flat
  read/write data segment, CS/DS/ES/SS loaded from them; interrupts
  disabled; ``%rsi`` holds the physical address of ``struct boot_params``.
  Entry is the protected-mode kernel's load address + 0x200.
* **PVH** (Xen's docs/misc/pvh.pandoc, used by Linux's PVH entry): 32-bit
  protected mode, paging off, flat 32-bit CS/DS/ES/SS, a 32-bit TSS in TR,
  CR4 zero, ``%ebx`` holding the physical address of ``hvm_start_info``.

The guest-physical layout of the boot structures follows Firecracker's
(arch/x86_64: GDT at 0x500, IDT at 0x520, stack below 0x9000, PML4 at
0x9000, zero page at 0x7000): all of them lie in the low 640 KiB the e820
map gives the kernel as RAM, which Linux reclaims once it has its own tables.

Besides registers this module builds what KVM does not choose for the VMM:
the CPUID table (KVM_GET_SUPPORTED_CPUID, plus the per-vCPU APIC ids of
leaves 1, 0xB, 0x1F and 0x8000001E and the hypervisor leaves 0x40000000
"KVMKVMKVM"), the MSRs Linux expects to find initialised, the x87/SSE
control words (fcw 0x37f and mxcsr 0x1f80 as after FNINIT/reset) and the
local APIC's LINT0 (ExtINT, virtual wire mode) and LINT1 (NMI) of the
MultiProcessor Specification 1.4 section 3.6.2.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kemu.accel.kvm.ioctls import (
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    KVM_MP_STATE_RUNNABLE,
    VcpuFd,
    kvm_cpuid_entry2,
    kvm_fpu,
    kvm_lapic_state,
    kvm_regs,
    kvm_segment,
    kvm_sregs,
)
from kemu.memory import GuestMemory

# -- guest-physical addresses KVM needs outside RAM (VMX real-mode support) -------------
#: KVM_SET_TSS_ADDR: three pages, and KVM_SET_IDENTITY_MAP_ADDR: one page, just
#: below the BIOS area at the top of the 32-bit space (as Firecracker).
KVM_TSS_ADDR = 0xFFFBD000
KVM_IDENTITY_MAP_ADDR = 0xFFFBC000

# -- guest-physical layout of the VMM-made boot structures ------------------------------
GDT_ADDR = 0x500
IDT_ADDR = 0x520
BOOT_STACK = 0x8FF0
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000            # IDENTITY_MAP_GIB consecutive page directories
IDENTITY_MAP_GIB = 4        # covers RAM below 4 GiB, the MMIO hole, IOAPIC and LAPIC

# -- control registers (Intel SDM vol. 3A, 2.5) ------------------------------------------
X86_CR0_PE = 1 << 0
X86_CR0_MP = 1 << 1
X86_CR0_ET = 1 << 4
X86_CR0_NE = 1 << 5
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

#: RFLAGS with only the always-one bit 1 set (interrupts disabled).
RFLAGS_RESERVED = 0x2

# -- page table entry bits ------------------------------------------------------------------
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_PS = 1 << 7

# -- GDT: selectors and descriptor flags (flags as in Linux's GDT_ENTRY macro) ----------
BOOT_CS = 0x10          # __BOOT_CS: 64-bit code
BOOT_DS = 0x18          # __BOOT_DS: data
BOOT_TSS = 0x20
BOOT_CS32 = 0x28        # 32-bit code, for the PVH entry
GDT_FLAGS = (
    0,                  # null
    0,                  # null
    0xA09B,             # 0x10 code: G, L, P, DPL0, S, type 0xb (execute/read, accessed)
    0xC093,             # 0x18 data: G, D/B, P, DPL0, S, type 0x3 (read/write, accessed)
    0x008B,             # 0x20 TSS: P, type 0xb (busy 32/64-bit TSS), byte granular
    0xC09B,             # 0x28 code32: G, D/B, P, DPL0, S, type 0xb
)

# -- MSRs (Intel SDM vol. 4) -------------------------------------------------------------------
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_DEF_TYPE_E = 1 << 11
MTRR_TYPE_WRBACK = 6
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102

# -- local APIC registers (Intel SDM vol. 3A, 10.4.1) --------------------------------------
APIC_ID = 0x20
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_LVT_MASKED = 1 << 16
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7

# -- CPUID ---------------------------------------------------------------------------------------
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EDX_HTT = 1 << 28


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """A segment descriptor from Linux's GDT_ENTRY(flags, base, limit) convention."""
    return (((base & 0xFF000000) << (56 - 24)) | ((flags & 0x0000F0FF) << 40)
            | ((limit & 0x000F0000) << (48 - 16)) | ((base & 0x00FFFFFF) << 16)
            | (limit & 0x0000FFFF))


def gdt_entries() -> list[int]:
    """The boot GDT: flat 4 GiB segments (the TSS is 0x67 bytes at 0)."""
    return [gdt_entry(f, 0, 0x67 if i == BOOT_TSS >> 3 else 0xFFFFF) if f else 0
            for i, f in enumerate(GDT_FLAGS)]


def segment_from_gdt(entry: int, selector: int) -> kvm_segment:
    """The hidden (cached) part of a segment register loaded from ``entry``."""
    base = ((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24)
    limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)
    g = (entry >> 55) & 1
    if g:
        limit = (limit << 12) | 0xFFF
    present = (entry >> 47) & 1
    return kvm_segment(base=base, limit=limit, selector=selector, type=(entry >> 40) & 0xF,
                       present=present, dpl=(entry >> 45) & 3, db=(entry >> 54) & 1,
                       s=(entry >> 44) & 1, l=(entry >> 53) & 1, g=g, avl=(entry >> 52) & 1,
                       unusable=0 if present else 1)


def write_gdt(memory: GuestMemory, addr: int = GDT_ADDR) -> list[int]:
    table = gdt_entries()
    memory.write(addr, struct.pack(f"<{len(table)}Q", *table))
    memory.write_int(IDT_ADDR, 8, 0)        # an empty IDT (limit 0 below)
    return table


def write_identity_map(memory: GuestMemory, gib: int = IDENTITY_MAP_GIB,
                       pml4: int = PML4_ADDR, pdpt: int = PDPT_ADDR,
                       pd: int = PD_ADDR) -> int:
    """Identity-map the first ``gib`` GiB with 2 MiB pages; returns CR3.

    Four-level paging (Intel SDM vol. 3A, 4.5): PML4[0] -> PDPT, PDPT[i] -> the
    i-th page directory, each PDE a 2 MiB page (PS) that is present and writable.
    """
    if not 1 <= gib <= 512:
        raise ValueError("identity map size must be 1..512 GiB")
    memory.write(pml4, struct.pack("<Q", pdpt | PTE_P | PTE_RW) + bytes(4096 - 8))
    memory.write(pdpt, struct.pack(f"<{gib}Q", *(pd + i * 4096 | PTE_P | PTE_RW
                                                 for i in range(gib)))
                 + bytes(4096 - 8 * gib))
    for i in range(gib):
        memory.write(pd + i * 4096, struct.pack(
            "<512Q", *(((i << 30) | (j << 21)) | PTE_P | PTE_RW | PTE_PS for j in range(512))))
    return pml4


def _load_segments(sregs: kvm_sregs, table: list[int], code: int, data: int) -> None:
    sregs.cs = segment_from_gdt(table[code >> 3], code)
    ds = segment_from_gdt(table[data >> 3], data)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = ds
    sregs.tr = segment_from_gdt(table[BOOT_TSS >> 3], BOOT_TSS)
    sregs.gdt.base = GDT_ADDR
    sregs.gdt.limit = len(table) * 8 - 1
    sregs.idt.base = IDT_ADDR
    sregs.idt.limit = 0


def long_mode_sregs(sregs: kvm_sregs, table: list[int], cr3: int) -> kvm_sregs:
    """Segments and control registers for the 64-bit boot protocol (boot.rst)."""
    _load_segments(sregs, table, BOOT_CS, BOOT_DS)
    sregs.cr3 = cr3
    sregs.cr4 = X86_CR4_PAE
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG
    sregs.efer = EFER_LME | EFER_LMA
    return sregs


def pvh_sregs(sregs: kvm_sregs, table: list[int]) -> kvm_sregs:
    """32-bit flat protected mode, paging off, for the PVH entry (pvh.pandoc)."""
    _load_segments(sregs, table, BOOT_CS32, BOOT_DS)
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET
    sregs.cr3 = 0
    sregs.cr4 = 0
    sregs.efer = 0
    return sregs


def boot_regs(entry: int, rsi: int = 0, rbx: int = 0, rsp: int = BOOT_STACK) -> kvm_regs:
    return kvm_regs(rip=entry, rsi=rsi, rbx=rbx, rsp=rsp, rbp=rsp, rflags=RFLAGS_RESERVED)


def boot_fpu() -> kvm_fpu:
    """x87 and SSE control state after FNINIT / reset (Intel SDM vol. 1, 8.1.5, 10.2.3)."""
    return kvm_fpu(fcw=0x37F, mxcsr=0x1F80)


def boot_msrs(supported: set[int] | None = None) -> dict[int, int]:
    """The MSRs a VMM initialises for Linux (as Firecracker's ``create_boot_msr_entries``).

    ``supported`` (KVM_GET_MSR_INDEX_LIST) filters out MSRs this KVM does not save;
    MTRRdefType is always emulated by KVM and kept.
    """
    msrs = {
        MSR_IA32_SYSENTER_CS: 0,
        MSR_IA32_SYSENTER_ESP: 0,
        MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0,
        MSR_CSTAR: 0,
        MSR_KERNEL_GS_BASE: 0,
        MSR_SYSCALL_MASK: 0,
        MSR_LSTAR: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MSR_IA32_MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_DEF_TYPE_E | MTRR_TYPE_WRBACK,
    }
    if supported is not None:
        msrs = {k: v for k, v in msrs.items() if k in supported or k == MSR_MTRR_DEF_TYPE}
    return msrs


def _entry(function: int, index: int = 0, flags: int = 0, eax: int = 0, ebx: int = 0,
           ecx: int = 0, edx: int = 0) -> kvm_cpuid_entry2:
    return kvm_cpuid_entry2(function=function, index=index, flags=flags, eax=eax, ebx=ebx,
                            ecx=ecx, edx=edx)


def _topology_leaf(function: int, apic_id: int, nr_vcpus: int) -> list[kvm_cpuid_entry2]:
    """Leaf 0xB / 0x1F (Intel SDM vol. 2A, CPUID): one thread per core, all cores in
    one package; EDX of every sub-leaf is the x2APIC id."""
    shift = max(0, (nr_vcpus - 1).bit_length())
    f = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return [
        _entry(function, 0, f, eax=0, ebx=1, ecx=(1 << 8) | 0, edx=apic_id),        # SMT
        _entry(function, 1, f, eax=shift, ebx=nr_vcpus, ecx=(2 << 8) | 1, edx=apic_id),  # core
        _entry(function, 2, f, eax=0, ebx=0, ecx=2, edx=apic_id),                    # invalid
    ]


def vcpu_cpuid(supported: list[kvm_cpuid_entry2], apic_id: int,
               nr_vcpus: int) -> list[kvm_cpuid_entry2]:
    """The CPUID table of one vCPU, from KVM_GET_SUPPORTED_CPUID (api.rst 4.46).

    KVM leaves the topology to the VMM: leaf 1 EBX[31:24] (initial APIC id) and
    EBX[23:16] (logical processors per package), leaves 0xB/0x1F, AMD's
    0x8000001E and 0x80000008 ECX.  The hypervisor bit (leaf 1 ECX[31]) and
    the KVM signature leaf 0x40000000 are set so Linux finds kvmclock.
    """
    out: list[kvm_cpuid_entry2] = []
    seen_sig = False
    for src in supported:
        e = kvm_cpuid_entry2.from_buffer_copy(src)
        fn = e.function
        if fn == 1:
            e.ebx = (e.ebx & 0x0000FFFF) | ((apic_id & 0xFF) << 24) | ((nr_vcpus & 0xFF) << 16)
            e.ecx |= CPUID_1_ECX_HYPERVISOR
            if nr_vcpus > 1:
                e.edx |= CPUID_1_EDX_HTT
        elif fn == 4:
            if e.eax & 0x1F:            # a cache is described: cores per package - 1
                e.eax = (e.eax & 0x03FFFFFF) | (((nr_vcpus - 1) & 0x3F) << 26)
        elif fn in (0xB, 0x1F):
            if e.index == 0:
                out.extend(_topology_leaf(fn, apic_id, nr_vcpus))
            continue
        elif fn == 0x80000008:
            e.ecx = (e.ecx & ~0xF0FF) | (((nr_vcpus - 1).bit_length() & 0xF) << 12) | \
                ((nr_vcpus - 1) & 0xFF)
        elif fn == 0x8000001E:
            e.eax = apic_id                     # extended APIC id
            e.ebx = apic_id & 0xFF              # compute unit id, 1 thread per unit
            e.ecx = 0                           # node 0
        elif fn == KVM_CPUID_SIGNATURE:
            seen_sig = True
            e.eax = max(e.eax, KVM_CPUID_FEATURES)
            e.ebx, e.ecx, e.edx = struct.unpack("<III", KVM_SIGNATURE)
        out.append(e)
    if not seen_sig:
        out.append(_entry(KVM_CPUID_SIGNATURE, eax=KVM_CPUID_FEATURES,
                          **dict(zip(("ebx", "ecx", "edx"), struct.unpack("<III", KVM_SIGNATURE)))))
        out.append(_entry(KVM_CPUID_FEATURES))
    return out


def lapic_reg(state: kvm_lapic_state, offset: int) -> int:
    """A 32-bit register of a ``kvm_lapic_state`` (the APIC page's layout)."""
    return struct.unpack_from("<I", state, offset)[0]


def set_lapic_reg(state: kvm_lapic_state, offset: int, value: int) -> None:
    struct.pack_into("<I", state, offset, value)


def _delivery_mode(lvt: int, mode: int) -> int:
    return (lvt & ~0x700) | (mode << 8)


def setup_lint(vcpu: VcpuFd, bsp: bool) -> None:
    """LINT0 ExtINT (the 8259's INTR, unmasked on the BSP only: virtual wire mode,
    MP spec 3.6.2.2) and LINT1 NMI, on an in-kernel local APIC."""
    state = vcpu.get_lapic()
    lvt0 = _delivery_mode(lapic_reg(state, APIC_LVT0), APIC_MODE_EXTINT)
    lvt0 = lvt0 & ~APIC_LVT_MASKED if bsp else lvt0 | APIC_LVT_MASKED
    set_lapic_reg(state, APIC_LVT0, lvt0)
    lvt1 = _delivery_mode(lapic_reg(state, APIC_LVT1), APIC_MODE_NMI) & ~APIC_LVT_MASKED
    set_lapic_reg(state, APIC_LVT1, lvt1)
    vcpu.set_lapic(state)


def setup_x86_vm(vm, memory: GuestMemory, irqchip: bool = True, pit: bool = True) -> None:
    """The VM-wide set-up of a PC-like microVM (api.rst 4.24, 4.35, 4.43, 4.47, 4.56):
    TSS and identity-map pages, in-kernel PIC/IOAPIC/LAPICs and i8254, and one
    memory slot per RAM region.  Call before creating vCPUs."""
    vm.set_tss_addr(KVM_TSS_ADDR)
    vm.set_identity_map_addr(KVM_IDENTITY_MAP_ADDR)
    if irqchip:
        vm.create_irqchip()
        if pit:
            vm.create_pit2()
    vm.map_memory(memory)


@dataclass
class X86BootSetup:
    """What :func:`setup_vcpu` needs besides the vCPU: the shared tables."""

    supported_cpuid: list[kvm_cpuid_entry2]
    supported_msrs: set[int] | None
    nr_vcpus: int
    gdt: list[int]
    cr3: int
    irqchip: bool = True

    @classmethod
    def prepare(cls, kvm, memory: GuestMemory | None, nr_vcpus: int,
                irqchip: bool = True) -> X86BootSetup:
        """Write the GDT and identity map into guest RAM (unless ``memory`` is None:
        a machine restored or migrated in, whose RAM is the guest's) and query KVM once."""
        gdt = write_gdt(memory) if memory is not None else gdt_entries()
        cr3 = write_identity_map(memory) if memory is not None else PML4_ADDR
        return cls(kvm.get_supported_cpuid(), set(kvm.get_msr_index_list()), nr_vcpus,
                   gdt, cr3, irqchip)


def setup_vcpu(vcpu: VcpuFd, boot: X86BootSetup, entry: int | None, boot_params: int = 0,
               pvh_start_info: int | None = None) -> None:
    """Put ``vcpu`` in the state a 64-bit Linux (or, with ``pvh_start_info``, a PVH)
    entry expects, starting at ``entry``.

    With ``entry`` None only CPUID, MSRs, FPU and LAPIC are set up and the vCPU
    keeps its reset state: how a Linux board leaves the APs, which the BSP
    starts with INIT/SIPI.  Test guests instead start every vCPU at ``entry``.

    Order matters: CPUID before MSRs and LAPIC (KVM derives the valid MSRs and
    the x2APIC capability from it).
    """
    vcpu.set_cpuid2(vcpu_cpuid(boot.supported_cpuid, vcpu.id, boot.nr_vcpus))
    vcpu.set_msrs(boot_msrs(boot.supported_msrs))
    vcpu.set_fpu(boot_fpu())
    if boot.irqchip:
        setup_lint(vcpu, bsp=vcpu.id == 0)
    if entry is None:
        return
    sregs = vcpu.get_sregs()
    if pvh_start_info is None:
        long_mode_sregs(sregs, boot.gdt, boot.cr3)
        regs = boot_regs(entry, rsi=boot_params)
    else:
        pvh_sregs(sregs, boot.gdt)
        regs = boot_regs(entry, rbx=pvh_start_info, rsp=0)
    vcpu.set_sregs(sregs)
    vcpu.set_regs(regs)
    if boot.irqchip and vcpu.id != 0:
        # APs of an in-kernel irqchip start UNINITIALIZED, waiting for INIT/SIPI
        # (api.rst 4.38 KVM_SET_MP_STATE): make this one run from ``entry`` now.
        vcpu.set_mp_state(KVM_MP_STATE_RUNNABLE)
