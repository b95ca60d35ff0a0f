"""The KVM structures and what kemu builds in them, without /dev/kvm.

* The ctypes structures and ioctl numbers of kemu.accel.kvm.ioctls match
  <linux/kvm.h>: a C probe generated from the Python definitions is compiled
  with gcc against the installed kernel headers (linux-libc-dev) and prints
  ``sizeof`` / ``offsetof`` of every structure and field and the value of
  every constant, which the tests compare with ctypes.
* ``kvm_run`` exits decode into kemu.accel.base exits (a fake KVM_RUN fills
  the shared page), string I/O is split, reads are completed in place.
* The x86 boot state: GDT descriptors, identity map, CPUID, MSRs, LAPIC.
* /dev/kvm errors are one-line AccelErrors that say what to do.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kemu.accel.base import (
    Halted,
    InternalError,
    IoIn,
    IoOut,
    Kicked,
    MmioRead,
    MmioWrite,
    SystemEvent,
)
from kemu.accel.kvm import ioctls as k
from kemu.accel.kvm import x86_cpu as x
from kemu.errors import AccelError
from kemu.memory import GuestMemory, RamRegion

HEADER = Path("/usr/include/linux/kvm.h")
needs_probe = pytest.mark.skipif(
    shutil.which("gcc") is None or not HEADER.exists(),
    reason="needs gcc and <linux/kvm.h> (linux-libc-dev) for the layout probe")

#: C type name -> ctypes class.  Flexible-array structs are compared on their header.
STRUCTS = {
    "struct kvm_regs": k.kvm_regs,
    "struct kvm_sregs": k.kvm_sregs,
    "struct kvm_segment": k.kvm_segment,
    "struct kvm_dtable": k.kvm_dtable,
    "struct kvm_fpu": k.kvm_fpu,
    "struct kvm_msr_entry": k.kvm_msr_entry,
    "struct kvm_msrs": k.kvm_msrs,
    "struct kvm_msr_list": k.kvm_msr_list,
    "struct kvm_cpuid_entry2": k.kvm_cpuid_entry2,
    "struct kvm_cpuid2": k.kvm_cpuid2,
    "struct kvm_lapic_state": k.kvm_lapic_state,
    "struct kvm_userspace_memory_region": k.kvm_userspace_memory_region,
    "struct kvm_irq_level": k.kvm_irq_level,
    "struct kvm_irqfd": k.kvm_irqfd,
    "struct kvm_msi": k.kvm_msi,
    "struct kvm_ioeventfd": k.kvm_ioeventfd,
    "struct kvm_pit_config": k.kvm_pit_config,
    "struct kvm_mp_state": k.kvm_mp_state,
    "struct kvm_run": k.kvm_run,
    "struct kvm_sregs2": k.kvm_sregs2,
    "struct kvm_xsave": k.kvm_xsave,
    "struct kvm_xcr": k.kvm_xcr,
    "struct kvm_xcrs": k.kvm_xcrs,
    "struct kvm_vcpu_events": k.kvm_vcpu_events,
    "struct kvm_debugregs": k.kvm_debugregs,
    "struct kvm_irqchip": k.kvm_irqchip,
    "struct kvm_pit_channel_state": k.kvm_pit_channel_state,
    "struct kvm_pit_state2": k.kvm_pit_state2,
    "struct kvm_clock_data": k.kvm_clock_data,
    "struct kvm_dirty_log": k.kvm_dirty_log,
}

#: The anonymous sub-structures of kvm_vcpu_events: member -> the ctypes structure.
EVENTS_MEMBERS = {
    "exception": k.kvm_vcpu_events_exception,
    "interrupt": k.kvm_vcpu_events_interrupt,
    "nmi": k.kvm_vcpu_events_nmi,
    "smi": k.kvm_vcpu_events_smi,
}

#: Members of the kvm_run exit union -> the ctypes structure modelling each.
RUN_UNION = {
    "io": k.kvm_run_io,
    "mmio": k.kvm_run_mmio,
    "fail_entry": k.kvm_run_fail_entry,
    "hw": k.kvm_run_hw,
    "ex": k.kvm_run_ex,
    "internal": k.kvm_run_internal,
    "system_event": k.kvm_run_system_event,
}

#: Every integer constant of the module named like a <linux/kvm.h> macro.
CONSTANTS = sorted(name for name in dir(k)
                   if name.startswith("KVM_") and isinstance(getattr(k, name), int))


def _probe_source() -> tuple[str, list[tuple[str, int]]]:
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <linux/kvm.h>",
             "int main(void) {"]
    expected: list[tuple[str, int]] = []

    def emit(label: str, expr: str, value: int) -> None:
        lines.append(f'  printf("%s %llu\\n", "{label}", (unsigned long long)({expr}));')
        expected.append((label, value))

    for cname, cls in STRUCTS.items():
        emit(f"sizeof({cname})", f"sizeof({cname})", ctypes.sizeof(cls))
        for field, *_ in cls._fields_:
            if cname == "struct kvm_run" and field == "exit":
                continue            # the anonymous union: its members are checked below
            emit(f"offsetof({cname}, {field})", f"offsetof({cname}, {field})",
                 getattr(cls, field).offset)
    emit("offsetof(struct kvm_run, io)", "offsetof(struct kvm_run, io)", k.kvm_run.exit.offset)
    for member, cls in RUN_UNION.items():
        emit(f"sizeof(kvm_run.{member})", f"sizeof(((struct kvm_run *)0)->{member})",
             ctypes.sizeof(cls))
        for field, *_ in cls._fields_:
            emit(f"offsetof(kvm_run.{member}.{field})",
                 f"offsetof(struct kvm_run, {member}.{field}) - offsetof(struct kvm_run, {member})",
                 getattr(cls, field).offset)
    for member, cls in EVENTS_MEMBERS.items():
        emit(f"sizeof(kvm_vcpu_events.{member})",
             f"sizeof(((struct kvm_vcpu_events *)0)->{member})", ctypes.sizeof(cls))
        for field, *_ in cls._fields_:
            emit(f"offsetof(kvm_vcpu_events.{member}.{field})",
                 f"offsetof(struct kvm_vcpu_events, {member}.{field}) - "
                 f"offsetof(struct kvm_vcpu_events, {member})", getattr(cls, field).offset)
    # struct kvm_irqchip's union, kept as bytes: its size and both members fit in it
    emit("sizeof(kvm_irqchip.chip)", "sizeof(((struct kvm_irqchip *)0)->chip)",
         k.kvm_irqchip.chip.size)
    for name in CONSTANTS:
        emit(name, name, getattr(k, name))
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n", expected


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict[str, int]:
    src, _expected = _probe_source()
    d = tmp_path_factory.mktemp("kvmprobe")
    (d / "probe.c").write_text(src)
    build = subprocess.run(["gcc", "-Wall", "-o", str(d / "probe"), str(d / "probe.c")],
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(d / "probe")], capture_output=True, text=True, check=True).stdout
    result = {}
    for line in out.splitlines():
        label, _, value = line.rpartition(" ")
        result[label] = int(value)
    return result


@needs_probe
def test_struct_sizes_and_offsets_match_the_header(probe):
    _src, expected = _probe_source()
    mismatches = [(label, value, probe[label]) for label, value in expected
                  if not label.startswith("KVM_") and probe[label] != value]
    assert mismatches == []


@needs_probe
def test_ioctl_numbers_and_constants_match_the_header(probe):
    _src, expected = _probe_source()
    checked = [label for label, _v in expected if label.startswith("KVM_")]
    assert "KVM_RUN" in checked and "KVM_SET_USER_MEMORY_REGION" in checked
    mismatches = [(label, hex(value), hex(probe[label])) for label, value in expected
                  if label.startswith("KVM_") and probe[label] != value]
    assert mismatches == []


def test_flexible_array_structs_grow_by_whole_entries():
    assert ctypes.sizeof(k.kvm_msrs_with(3)) == ctypes.sizeof(k.kvm_msrs) + \
        3 * ctypes.sizeof(k.kvm_msr_entry)
    assert ctypes.sizeof(k.kvm_cpuid2_with(2)) == ctypes.sizeof(k.kvm_cpuid2) + \
        2 * ctypes.sizeof(k.kvm_cpuid_entry2)
    assert k.kvm_msrs_with(3) is k.kvm_msrs_with(3)


def test_ioc_encoding():
    # _IOW(0xAE, 0x46, 32 bytes) as computed by hand from <asm-generic/ioctl.h>.
    assert k._IOW(0xAE, 0x46, k.kvm_userspace_memory_region) == (1 << 30) | (32 << 16) | \
        (0xAE << 8) | 0x46
    assert k._IO(0xAE, 0x80) == 0xAE80


# -- exits as data: a fake KVM_RUN ----------------------------------------------------------
class FakeRun:
    """Stands in for fcntl.ioctl(KVM_RUN): each call writes the next scripted exit."""

    def __init__(self, vcpu: k.VcpuFd, script):
        self.vcpu = vcpu
        self.script = list(script)
        self.calls = 0

    def __call__(self, fd, request, arg):
        assert request == k.KVM_RUN
        self.calls += 1
        step = self.script.pop(0)
        if isinstance(step, OSError):
            raise step
        step(self.vcpu.kvm_run, self.vcpu._run_map)
        return 0


def fake_vcpu(monkeypatch, script) -> tuple[k.VcpuFd, FakeRun]:
    vcpu = object.__new__(k.VcpuFd)
    vcpu.fd, vcpu.id = -1, 0
    vcpu._run_map = mmap.mmap(-1, 3 * 4096)
    vcpu.kvm_run = k.kvm_run.from_buffer(vcpu._run_map)
    vcpu._io, vcpu._pending, vcpu._io_in = None, None, {}
    vcpu.get_regs = lambda: k.kvm_regs(rip=0x1234)
    fake = FakeRun(vcpu, script)
    monkeypatch.setattr(k.fcntl, "ioctl", fake)
    return vcpu, fake


def io_exit(direction, port, size, data: bytes, count=1):
    def fill(run, m):
        run.exit_reason = k.KVM_EXIT_IO
        run.exit.io.direction, run.exit.io.port, run.exit.io.size = direction, port, size
        run.exit.io.count, run.exit.io.data_offset = count, 4096
        m[4096:4096 + len(data)] = data
    return fill


def mmio_exit(addr, length, is_write, data=b""):
    def fill(run, m):
        run.exit_reason = k.KVM_EXIT_MMIO
        run.exit.mmio.phys_addr, run.exit.mmio.len, run.exit.mmio.is_write = addr, length, is_write
        for i, b in enumerate(data.ljust(8, b"\0")):
            run.exit.mmio.data[i] = b
    return fill


def simple_exit(reason, **fields):
    def fill(run, m):
        run.exit_reason = reason
        for path, value in fields.items():
            obj = run.exit
            *parents, last = path.split(".")
            for p in parents:
                obj = getattr(obj, p)
            setattr(obj, last, value)
    return fill


def test_port_io_exits(monkeypatch):
    vcpu, _fake = fake_vcpu(monkeypatch, [
        io_exit(k.KVM_EXIT_IO_OUT, 0x3F8, 1, b"A"),
        io_exit(k.KVM_EXIT_IO_IN, 0x60, 2, b"\0\0"),
        io_exit(k.KVM_EXIT_IO_OUT, 0xCF8, 4, struct.pack("<I", 0x80000010)),
    ])
    assert vcpu.run() == IoOut(0x3F8, 1, 0x41)
    assert vcpu.run() == IoIn(0x60, 2)
    vcpu.complete(0xBEEF)
    assert vcpu._run_map[4096:4098] == b"\xef\xbe"
    assert vcpu.run() == IoOut(0xCF8, 4, 0x80000010)
    with pytest.raises(AccelError, match="no port or MMIO read"):
        vcpu.complete(1)


def test_string_io_is_split_into_single_accesses(monkeypatch):
    vcpu, fake = fake_vcpu(monkeypatch, [
        io_exit(k.KVM_EXIT_IO_OUT, 0x518, 1, b"kemu", count=4),
        io_exit(k.KVM_EXIT_IO_IN, 0x519, 2, bytes(6), count=3),
    ])
    assert [vcpu.run() for _ in range(4)] == [IoOut(0x518, 1, c) for c in b"kemu"]
    assert fake.calls == 1                       # one KVM_RUN for the whole rep outsb
    for value in (0x1111, 0x2222, 0x3333):
        assert vcpu.run() == IoIn(0x519, 2)
        vcpu.complete(value)
    assert fake.calls == 2
    assert vcpu._run_map[4096:4102] == struct.pack("<3H", 0x1111, 0x2222, 0x3333)


def test_mmio_exits(monkeypatch):
    vcpu, _ = fake_vcpu(monkeypatch, [
        mmio_exit(0xD0000000, 8, 1, struct.pack("<Q", 0x0123456789ABCDEF)),
        mmio_exit(0xFEB00004, 4, 0),
        mmio_exit(0xD0000000, 3, 0),
    ])
    assert vcpu.run() == MmioWrite(0xD0000000, 8, 0x0123456789ABCDEF)
    assert vcpu.run() == MmioRead(0xFEB00004, 4)
    vcpu.complete(0xCAFEF00D)
    assert bytes(vcpu.kvm_run.exit.mmio.data[:4]) == struct.pack("<I", 0xCAFEF00D)
    assert isinstance(vcpu.run(), InternalError)


def test_other_exits(monkeypatch):
    vcpu, _ = fake_vcpu(monkeypatch, [
        simple_exit(k.KVM_EXIT_HLT),
        simple_exit(k.KVM_EXIT_SHUTDOWN),
        simple_exit(k.KVM_EXIT_SYSTEM_EVENT, **{"system_event.type": k.KVM_SYSTEM_EVENT_SHUTDOWN}),
        simple_exit(k.KVM_EXIT_SYSTEM_EVENT, **{"system_event.type": k.KVM_SYSTEM_EVENT_RESET}),
        simple_exit(k.KVM_EXIT_INTR),
        OSError(errno.EINTR, "interrupted"),
        simple_exit(k.KVM_EXIT_FAIL_ENTRY, **{"fail_entry.hardware_entry_failure_reason": 0x21}),
        simple_exit(k.KVM_EXIT_INTERNAL_ERROR, **{"internal.suberror": 3, "internal.ndata": 1,
                                                  "internal.data": (k.u64 * 16)(0x80000b0e)}),
        simple_exit(99),
    ])
    assert vcpu.run() == Halted()
    assert vcpu.run() == SystemEvent("reset")          # triple fault
    assert vcpu.run() == SystemEvent("poweroff")
    assert vcpu.run() == SystemEvent("reset")
    assert vcpu.run() == Kicked()
    assert vcpu.run() == Kicked()
    assert "entry failed, hardware reason 0x21" in vcpu.run().message
    err = vcpu.run().message
    assert "event delivery failure" in err and "rip 0x1234" in err and "0x80000b0e" in err
    assert "unhandled KVM exit reason 99" in vcpu.run().message


def test_emulation_failure_shows_the_instruction(monkeypatch):
    def fill(run, m):
        run.exit_reason = k.KVM_EXIT_INTERNAL_ERROR
        off = k.kvm_run.exit.offset
        struct.pack_into("<IIQB15s", m, off, k.KVM_INTERNAL_ERROR_EMULATION, 4, 1, 2,
                         b"\xcc\x90" + bytes(13))
    vcpu, _ = fake_vcpu(monkeypatch, [fill])
    message = vcpu.run().message
    assert "emulation failure" in message and "instruction bytes cc 90" in message


def test_kvm_run_errors_are_accel_errors(monkeypatch):
    vcpu, _ = fake_vcpu(monkeypatch, [OSError(errno.EFAULT, "bad address")])
    with pytest.raises(AccelError, match="KVM_RUN"):
        vcpu.run()


# -- /dev/kvm errors ---------------------------------------------------------------------------
def test_missing_dev_kvm(tmp_path):
    with pytest.raises(AccelError) as e:
        k.Kvm(str(tmp_path / "kvm"))
    assert "does not exist" in str(e.value) and "--accel tcg" in str(e.value)
    assert "\n" not in str(e.value)


def test_dev_kvm_without_permission(monkeypatch):
    def refuse(path, flags):
        raise PermissionError(errno.EACCES, "Permission denied", path)
    monkeypatch.setattr(k.os, "open", refuse)
    with pytest.raises(AccelError, match="add yourself to the kvm group.*--accel tcg"):
        k.Kvm()


def test_not_a_kvm_device():
    with pytest.raises(AccelError, match="not a KVM device"):
        k.Kvm("/dev/null")


# -- x86 boot state ------------------------------------------------------------------------------
def test_gdt_entries_match_linux():
    # GDT_ENTRY_INIT(0xa09b, 0, 0xfffff) and (0xc093, 0, 0xfffff) from arch/x86.
    assert x.gdt_entry(0xA09B, 0, 0xFFFFF) == 0x00AF9B000000FFFF
    assert x.gdt_entry(0xC093, 0, 0xFFFFF) == 0x00CF93000000FFFF
    table = x.gdt_entries()
    cs = x.segment_from_gdt(table[x.BOOT_CS >> 3], x.BOOT_CS)
    assert (cs.selector, cs.type, cs.l, cs.db, cs.g, cs.s, cs.present, cs.limit) == \
        (0x10, 0xB, 1, 0, 1, 1, 1, 0xFFFFFFFF)
    ds = x.segment_from_gdt(table[x.BOOT_DS >> 3], x.BOOT_DS)
    assert (ds.selector, ds.type, ds.l, ds.db, ds.limit) == (0x18, 3, 0, 1, 0xFFFFFFFF)
    tr = x.segment_from_gdt(table[x.BOOT_TSS >> 3], x.BOOT_TSS)
    assert (tr.type, tr.s, tr.limit, tr.g) == (0xB, 0, 0x67, 0)
    null = x.segment_from_gdt(0, 0)
    assert null.unusable == 1


def _translate(mem: GuestMemory, cr3: int, va: int) -> int:
    pml4e = mem.read_int(cr3 + 8 * ((va >> 39) & 511), 8)
    pdpte = mem.read_int((pml4e & ~0xFFF) + 8 * ((va >> 30) & 511), 8)
    pde = mem.read_int((pdpte & 0xFFFFFFFFFF000) + 8 * ((va >> 21) & 511), 8)
    assert pml4e & 1 and pdpte & 1 and pde & 1 and pde & x.PTE_PS
    return (pde & ~0x1FFFFF & 0xFFFFFFFFFFFFF) | (va & 0x1FFFFF)


def test_identity_map_covers_4gib():
    mem = GuestMemory([RamRegion(0, 1 << 20)])
    cr3 = x.write_identity_map(mem)
    for va in (0, 0x7000, 0x100200, 0x3FFFFFFF, 0x40000000, 0xD0000000, 0xFEE00020,
               0xFFFFFFFF):
        assert _translate(mem, cr3, va) == va


def test_long_mode_and_pvh_sregs():
    table = x.gdt_entries()
    s = x.long_mode_sregs(k.kvm_sregs(), table, 0x9000)
    assert s.cr0 & x.X86_CR0_PE and s.cr0 & x.X86_CR0_PG
    assert s.cr4 & x.X86_CR4_PAE and s.cr3 == 0x9000
    assert s.efer == x.EFER_LME | x.EFER_LMA
    assert (s.cs.selector, s.ds.selector, s.ss.selector) == (0x10, 0x18, 0x18)
    assert (s.gdt.base, s.gdt.limit) == (x.GDT_ADDR, 8 * len(table) - 1)
    p = x.pvh_sregs(k.kvm_sregs(), table)
    assert p.cr0 & x.X86_CR0_PE and not p.cr0 & x.X86_CR0_PG
    assert (p.cr4, p.efer) == (0, 0)
    assert (p.cs.selector, p.cs.db, p.cs.l) == (x.BOOT_CS32, 1, 0)
    regs = x.boot_regs(0x100200, rsi=0x7000)
    assert (regs.rip, regs.rsi, regs.rflags) == (0x100200, 0x7000, 2)


def _e(fn, index=0, **regs):
    return k.kvm_cpuid_entry2(function=fn, index=index, **regs)


def test_vcpu_cpuid_topology_and_signature():
    supported = [_e(0, eax=0xD), _e(1, ebx=0x00010800, ecx=0, edx=0),
                 _e(0xB, flags=1, edx=0), _e(0x80000008, ecx=0)]
    table = x.vcpu_cpuid(supported, apic_id=2, nr_vcpus=4)
    by = {(e.function, e.index): e for e in table}
    leaf1 = by[(1, 0)]
    assert leaf1.ebx >> 24 == 2 and (leaf1.ebx >> 16) & 0xFF == 4
    assert leaf1.ebx & 0xFFFF == 0x0800               # CLFLUSH size etc. kept
    assert leaf1.ecx & x.CPUID_1_ECX_HYPERVISOR and leaf1.edx & x.CPUID_1_EDX_HTT
    assert [by[(0xB, i)].edx for i in range(3)] == [2, 2, 2]
    assert by[(0xB, 1)].ebx == 4 and by[(0xB, 1)].eax == 2 and (by[(0xB, 1)].ecx >> 8) == 2
    assert by[(0xB, 2)].ecx >> 8 == 0                  # invalid level ends the list
    assert by[(0x80000008, 0)].ecx & 0xFF == 3
    sig = by[(0x40000000, 0)]
    assert struct.pack("<III", sig.ebx, sig.ecx, sig.edx) == b"KVMKVMKVM\0\0\0"
    assert sig.eax >= 0x40000001 and (0x40000001, 0) in by
    # The supported table is not modified.
    assert supported[1].ebx == 0x00010800


def test_boot_msrs_and_fpu():
    msrs = x.boot_msrs()
    assert msrs[x.MSR_IA32_MISC_ENABLE] & x.MSR_IA32_MISC_ENABLE_FAST_STRING
    assert {x.MSR_STAR, x.MSR_LSTAR, x.MSR_CSTAR, x.MSR_SYSCALL_MASK, x.MSR_KERNEL_GS_BASE,
            x.MSR_IA32_SYSENTER_CS, x.MSR_IA32_TSC} <= set(msrs)
    only = x.boot_msrs({x.MSR_STAR})
    assert set(only) == {x.MSR_STAR, x.MSR_MTRR_DEF_TYPE}
    fpu = x.boot_fpu()
    assert (fpu.fcw, fpu.mxcsr) == (0x37F, 0x1F80)


def test_lapic_register_helpers():
    state = k.kvm_lapic_state()
    x.set_lapic_reg(state, x.APIC_LVT0, 0x10000)
    assert x.lapic_reg(state, x.APIC_LVT0) == 0x10000
    assert x._delivery_mode(0x10000, x.APIC_MODE_EXTINT) == 0x10700
    assert x._delivery_mode(0x10700, x.APIC_MODE_NMI) == 0x10400
