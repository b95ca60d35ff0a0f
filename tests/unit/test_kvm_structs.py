"""The ctypes structures and ioctl numbers of kemu.accel.kvm.ioctls match <linux/kvm.h>.

A C probe is generated from the Python definitions, compiled with gcc
against the installed kernel headers (linux-libc-dev) and run: it prints
``sizeof`` and ``offsetof`` of every structure and field, and the value of
every ioctl and constant, and the test compares them with ctypes.  No
/dev/kvm is needed.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from kemu.accel.kvm import ioctls as k

HEADER = Path("/usr/include/linux/kvm.h")
pytestmark = pytest.mark.skipif(
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
    "struct kvm_ioeventfd": k.kvm_ioeventfd,
    "struct kvm_pit_config": k.kvm_pit_config,
    "struct kvm_mp_state": k.kvm_mp_state,
    "struct kvm_run": k.kvm_run,
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
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(d / "probe")], capture_output=True, text=True, check=True).stdout
    result = {}
    for line in out.splitlines():
        label, _, value = line.rpartition(" ")
        result[label] = int(value)
    return result


def test_struct_sizes_and_offsets_match_the_header(probe):
    _src, expected = _probe_source()
    mismatches = [(label, value, probe[label]) for label, value in expected
                  if not label.startswith("KVM_") and probe[label] != value]
    assert mismatches == []


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
