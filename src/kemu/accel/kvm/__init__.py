"""The KVM accelerator: the only package in kemu that touches ``/dev/kvm``.

* :mod:`.ioctls` -- structures, ioctl numbers and the system / VM / vCPU file
  descriptors of the KVM API (Documentation/virt/kvm/api.rst).
* :mod:`.x86_cpu` -- the vCPU state for entering a 64-bit Linux kernel (boot
  protocol) or a PVH kernel directly, CPUID, MSRs, FPU and LAPIC set-up.
* :mod:`.vcpu` -- :class:`KvmVcpu`, the run loop behind the
  :class:`kemu.accel.base.Vcpu` protocol.
"""

from __future__ import annotations

import os

from kemu.accel.kvm.ioctls import DEV_KVM, PVM_MODULE, Kvm, VcpuFd, VmFd
from kemu.accel.kvm.vcpu import KvmVcpu, install_kick_signal
from kemu.errors import AccelError


def kvm_unavailable_reason(path: str = DEV_KVM) -> str | None:
    """None when ``path`` opens as KVM API 12, else the one-line reason it does not."""
    try:
        Kvm(path).close()
    except AccelError as e:
        return str(e)
    return None


def is_pvm() -> bool:
    """True when /dev/kvm is the PVM module (kvm_pvm): guest CPL0 code is emulated
    there, so it runs about a thousand times slower than on VMX/SVM."""
    return os.path.isdir(PVM_MODULE)


def kvm_is_hardware_backed(path: str = DEV_KVM) -> bool:
    """True when ``path`` is a usable KVM on VMX/SVM: real Linux boots on it.

    False without /dev/kvm (or without access to it) and on PVM hosts
    (``/sys/module/kvm_pvm``), where guest kernel code is emulated: there
    ``kemu run`` picks aarch64 on TCG and Linux-on-KVM tests use the nested
    harness (kemu.testing.nested).
    """
    return not is_pvm() and kvm_unavailable_reason(path) is None


__all__ = [
    "Kvm",
    "KvmVcpu",
    "VcpuFd",
    "VmFd",
    "install_kick_signal",
    "is_pvm",
    "kvm_is_hardware_backed",
    "kvm_unavailable_reason",
]
