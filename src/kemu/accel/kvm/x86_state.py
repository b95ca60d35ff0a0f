"""An x86 KVM vCPU's and VM's whole state as plain, versioned data (snapshots, migration).

What is saved follows what KVM keeps and what QEMU's target/i386/kvm
saves (Documentation/virt/kvm/api.rst):

* per vCPU: CPUID (KVM_GET_CPUID2: the guest sees the same CPU after a
  restore, and the XSAVE layout stays valid), general registers
  (KVM_GET_REGS), special registers (KVM_GET_SREGS2 where KVM has it, with
  the PAE PDPTRs, else KVM_GET_SREGS), the FPU/SSE/AVX state
  (KVM_GET_XSAVE or KVM_GET_XSAVE2) and XCR0 (KVM_GET_XCRS), every MSR of
  KVM_GET_MSR_INDEX_LIST that this vCPU reads (TSC, SYSCALL/SYSENTER,
  kvmclock's, TSC deadline, MTRRs, ...; the APIC base is in the special
  registers), the local APIC page (KVM_GET_LAPIC), pending and injected
  events (KVM_GET_VCPU_EVENTS), the MP state (running, halted, waiting for
  SIPI) and the debug registers (KVM_GET_DEBUGREGS);
* per VM: the in-kernel PICs and I/O APIC (KVM_GET_IRQCHIP), the i8254
  (KVM_GET_PIT2) and kvmclock (KVM_GET_CLOCK).

The kernel structures are kept as their bytes: their layouts are the C
headers' (checked by ``tests/unit/test_kvm_structs.py``) and KVM validates
their contents on the way back in, refusing (one :class:`AccelError` line)
what it cannot take.  A blob of the wrong size is refused here.

Restore order matters (as QEMU's ``kvm_arch_put_registers``): CPUID first
(KVM derives valid MSRs and XSAVE features from it), special registers
before general ones and MSRs (EFER, the APIC base), the LAPIC after the
APIC base, the TSC deadline MSR after the LAPIC (setting the LAPIC
re-arms its timer), events and debug registers last.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from kemu.accel.kvm import ioctls as k
from kemu.accel.kvm.ioctls import VcpuFd, VmFd
from kemu.errors import AccelError
from kemu.state import StateError, check_version

VERSION = 1

MSR_IA32_TSC_DEADLINE = 0x6E0
#: KVM_SET_CPUID2 takes at most this many entries (arch/x86/include/asm/kvm_host.h).
KVM_MAX_CPUID_ENTRIES = 256
#: Hyper-V's synthetic MSRs: kemu announces no Hyper-V interface, so they are left out.
HYPERV_MSRS = range(0x40000000, 0x40000100)


@dataclass
class X86VcpuState:
    """One vCPU; the ``bytes`` fields are the kernel structures named after them."""

    version: int
    cpuid: list[bytes]
    regs: bytes
    sregs: bytes
    sregs2: bool                 # sregs is a kvm_sregs2 (else a kvm_sregs)
    xsave: bytes
    xcrs: bytes | None
    msrs: list[tuple[int, int]]
    lapic: bytes
    mp_state: int
    events: bytes
    debugregs: bytes


@dataclass
class X86VmState:
    version: int
    irqchips: list[bytes]        # PIC master, PIC slave, I/O APIC
    pit: bytes | None
    clock: int


@dataclass
class Capabilities:
    """What this KVM offers for saving state, asked once per VM."""

    sregs2: bool
    xsave_size: int
    xcrs: bool
    msrs: list[int]

    @classmethod
    def probe(cls, vm: VmFd, vcpu: VcpuFd) -> Capabilities:
        for cap, name in ((k.KVM_CAP_VCPU_EVENTS, "KVM_CAP_VCPU_EVENTS"),
                          (k.KVM_CAP_DEBUGREGS, "KVM_CAP_DEBUGREGS"),
                          (k.KVM_CAP_XSAVE, "KVM_CAP_XSAVE"),
                          (k.KVM_CAP_ADJUST_CLOCK, "KVM_CAP_ADJUST_CLOCK")):
            if not vm.check_extension(cap):
                raise AccelError(f"KVM: this kernel lacks {name}, needed to save a vCPU")
        xsave2 = vm.check_extension(k.KVM_CAP_XSAVE2)
        return cls(sregs2=bool(vm.check_extension(k.KVM_CAP_SREGS2)),
                   xsave_size=max(xsave2, ctypes.sizeof(k.kvm_xsave)),
                   xcrs=bool(vm.check_extension(k.KVM_CAP_XCRS)),
                   msrs=readable_msrs(vcpu, vm.kvm.get_msr_index_list()))


def readable_msrs(vcpu: VcpuFd, indices: list[int]) -> list[int]:
    """The MSRs of ``indices`` that KVM_GET_MSRS reads on ``vcpu`` (KVM stops at the
    first one it refuses: that one is dropped and the rest asked again)."""
    todo = [i for i in indices if i not in HYPERV_MSRS]
    while todo:
        buf = k.kvm_msrs_with(len(todo))()
        buf.nmsrs = len(todo)
        for n, index in enumerate(todo):
            buf.entries[n].index = index
        try:
            got = k.ioctl(vcpu.fd, k.KVM_GET_MSRS, buf)
        except OSError as e:
            raise AccelError(f"KVM: KVM_GET_MSRS failed: {e.strerror}") from None
        if got == len(todo):
            return todo
        del todo[got]
    return todo


def _blob(cls, data: bytes, what: str):
    if len(data) != ctypes.sizeof(cls):
        raise StateError(f"{what}: {len(data)} bytes, this kemu's {cls.__name__} has "
                         f"{ctypes.sizeof(cls)}")
    return cls.from_buffer_copy(data)


def save_vcpu(vcpu: VcpuFd, caps: Capabilities) -> X86VcpuState:
    """The state of a stopped vCPU (no KVM_RUN in progress)."""
    msrs = vcpu.get_msrs(caps.msrs) if caps.msrs else {}
    return X86VcpuState(
        version=VERSION,
        cpuid=[bytes(e) for e in vcpu.get_cpuid2()],
        regs=bytes(vcpu.get_regs()),
        sregs=bytes(vcpu.get_sregs2() if caps.sregs2 else vcpu.get_sregs()),
        sregs2=caps.sregs2,
        xsave=bytes(vcpu.get_xsave(caps.xsave_size)),
        xcrs=bytes(vcpu.get_xcrs()) if caps.xcrs else None,
        msrs=sorted(msrs.items()),
        lapic=bytes(vcpu.get_lapic()),
        mp_state=vcpu.get_mp_state(),
        events=bytes(vcpu.get_vcpu_events()),
        debugregs=bytes(vcpu.get_debugregs()))


def restore_vcpu(vcpu: VcpuFd, state: X86VcpuState, caps: Capabilities) -> None:
    """Load ``state`` into a new vCPU (before its first KVM_RUN)."""
    what = f"vcpu {vcpu.id}"
    check_version(what, state.version, VERSION)
    if state.sregs2 and not caps.sregs2:
        raise StateError(f"{what}: saved with KVM_GET_SREGS2, which this KVM lacks")
    if state.xcrs is not None and not caps.xcrs:
        raise StateError(f"{what}: saved with XCRs, which this KVM cannot set")
    if len(state.xsave) > caps.xsave_size or len(state.xsave) < ctypes.sizeof(k.kvm_xsave) \
            or len(state.xsave) % 4:
        raise StateError(f"{what}: XSAVE area of {len(state.xsave)} bytes does not fit this "
                         f"KVM's ({caps.xsave_size})")
    if not 0 < len(state.cpuid) <= KVM_MAX_CPUID_ENTRIES:
        raise StateError(f"{what}: bad CPUID table ({len(state.cpuid)} entries)")
    vcpu.set_cpuid2([_blob(k.kvm_cpuid_entry2, e, f"{what} CPUID") for e in state.cpuid])
    sregs_type = k.kvm_sregs2 if state.sregs2 else k.kvm_sregs
    sregs = _blob(sregs_type, state.sregs, f"{what} special registers")
    (vcpu.set_sregs2 if state.sregs2 else vcpu.set_sregs)(sregs)
    vcpu.set_regs(_blob(k.kvm_regs, state.regs, f"{what} registers"))
    extra = (len(state.xsave) - ctypes.sizeof(k.kvm_xsave)) // 4
    xsave_type = k.kvm_xsave_with(extra) if extra else k.kvm_xsave
    vcpu.set_xsave(xsave_type.from_buffer_copy(state.xsave))
    if state.xcrs is not None:
        vcpu.set_xcrs(_blob(k.kvm_xcrs, state.xcrs, f"{what} XCRs"))
    msrs = [(int(i), int(v)) for i, v in state.msrs]
    deadline = [(i, v) for i, v in msrs if i == MSR_IA32_TSC_DEADLINE]
    vcpu.set_msrs([(i, v) for i, v in msrs if i != MSR_IA32_TSC_DEADLINE])
    vcpu.set_mp_state(int(state.mp_state))
    vcpu.set_lapic(_blob(k.kvm_lapic_state, state.lapic, f"{what} LAPIC"))
    if deadline:
        vcpu.set_msrs(deadline)
    events = _blob(k.kvm_vcpu_events, state.events, f"{what} events")
    # What KVM_GET_VCPU_EVENTS filled in is what KVM_SET_VCPU_EVENTS is to take.
    events.flags |= (k.KVM_VCPUEVENT_VALID_NMI_PENDING | k.KVM_VCPUEVENT_VALID_SIPI_VECTOR
                     | k.KVM_VCPUEVENT_VALID_SHADOW)
    vcpu.set_vcpu_events(events)
    vcpu.set_debugregs(_blob(k.kvm_debugregs, state.debugregs, f"{what} debug registers"))


def save_vm(vm: VmFd, pit: bool) -> X86VmState:
    """The in-kernel irqchip, PIT and kvmclock of a VM whose vCPUs are stopped."""
    return X86VmState(
        version=VERSION,
        irqchips=[bytes(vm.get_irqchip(i)) for i in range(k.KVM_NR_IRQCHIPS)],
        pit=bytes(vm.get_pit2()) if pit else None,
        clock=vm.get_clock().clock)


def restore_vm(vm: VmFd, state: X86VmState) -> None:
    """Load ``state`` into a new VM (after its vCPUs were restored: kvmclock last)."""
    check_version("KVM VM", state.version, VERSION)
    if len(state.irqchips) != k.KVM_NR_IRQCHIPS:
        raise StateError(f"KVM VM: {len(state.irqchips)} irqchips saved, expected "
                         f"{k.KVM_NR_IRQCHIPS}")
    for i, data in enumerate(state.irqchips):
        chip = _blob(k.kvm_irqchip, data, "KVM irqchip")
        if chip.chip_id != i:
            raise StateError(f"KVM irqchip: chip {chip.chip_id} saved in place of {i}")
        vm.set_irqchip(chip)
    if state.pit is not None:
        vm.set_pit2(_blob(k.kvm_pit_state2, state.pit, "KVM PIT"))
    vm.set_clock(int(state.clock))
