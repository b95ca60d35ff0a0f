"""The KVM ioctl layer: the only code in kemu that talks to ``/dev/kvm``.

Structures and ioctl numbers follow ``<linux/kvm.h>`` and
``<asm/kvm.h>`` (x86) as documented in the kernel's
Documentation/virt/kvm/api.rst; their layouts are checked against the C
headers by ``tests/unit/test_kvm_structs.py``.  The three file descriptors of
api.rst section 3 ("system", "vm", "vcpu") are the classes :class:`Kvm`,
:class:`VmFd` and :class:`VcpuFd`, in the spirit of rust-vmm's kvm-ioctls.

:meth:`VcpuFd.run` returns an exit from :mod:`kemu.accel.base` as data
(api.rst 5. "The kvm_run structure").  An :class:`~kemu.accel.base.IoIn` or
:class:`~kemu.accel.base.MmioRead` is answered with
:meth:`VcpuFd.complete`, which writes the value into ``kvm_run`` where KVM
picks it up on the next ``KVM_RUN``.  String port I/O (``rep ins/outs``,
``count > 1``) is split into one exit per element, so callers only ever see
single accesses.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Iterable
from typing import Self

from kemu.accel.base import (
    Exit,
    Halted,
    InternalError,
    IoIn,
    IoOut,
    Kicked,
    MmioRead,
    MmioWrite,
    SystemEvent,
)
from kemu.errors import AccelError

# --------------------------------------------------------------------------------------
# ioctl number encoding (<asm-generic/ioctl.h>)
# --------------------------------------------------------------------------------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | \
        (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, ctype) -> int:
    return _IOC(_IOC_READ, type_, nr, ctypes.sizeof(ctype))


def _IOW(type_: int, nr: int, ctype) -> int:
    return _IOC(_IOC_WRITE, type_, nr, ctypes.sizeof(ctype))


def _IOWR(type_: int, nr: int, ctype) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(ctype))


KVMIO = 0xAE

# --------------------------------------------------------------------------------------
# Structures
# --------------------------------------------------------------------------------------
u8, u16, u32, u64, s32 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64, \
    ctypes.c_int32


class _Struct(ctypes.Structure):
    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name, *_ in self._fields_
                           if not name.startswith("pad"))
        return f"{type(self).__name__}({fields})"


class kvm_regs(_Struct):
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(_Struct):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8),
                ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(_Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(_Struct):
    _fields_ = [(n, kvm_segment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")] + \
        [("gdt", kvm_dtable), ("idt", kvm_dtable)] + \
        [(n, u64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")] + \
        [("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))]


class kvm_fpu(_Struct):
    _fields_ = [("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8),
                ("pad1", u8), ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
                ("xmm", (u8 * 16) * 16), ("mxcsr", u32), ("pad2", u32)]


class kvm_msr_entry(_Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(_Struct):
    """Header of ``struct kvm_msrs``; :func:`kvm_msrs_with` adds the entries."""
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_msr_list(_Struct):
    _fields_ = [("nmsrs", u32)]


class kvm_cpuid_entry2(_Struct):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0


class kvm_cpuid2(_Struct):
    """Header of ``struct kvm_cpuid2``; :func:`kvm_cpuid2_with` adds the entries."""
    _fields_ = [("nent", u32), ("padding", u32)]


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(_Struct):
    _fields_ = [("regs", ctypes.c_char * KVM_APIC_REG_SIZE)]


class kvm_userspace_memory_region(_Struct):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class kvm_irq_level(_Struct):
    # The first member is a union { __u32 irq; __s32 status; }.
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_msi(_Struct):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("flags", u32),
                ("devid", u32), ("pad", u8 * 12)]


class kvm_irqfd(_Struct):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32),
                ("pad", u8 * 16)]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class kvm_ioeventfd(_Struct):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32), ("flags", u32),
                ("pad", u8 * 36)]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class kvm_pit_config(_Struct):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class kvm_mp_state(_Struct):
    _fields_ = [("mp_state", u32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4


class kvm_sregs2(_Struct):
    """``struct kvm_sregs2`` (KVM_CAP_SREGS2): kvm_sregs without the interrupt bitmap,
    with the PAE PDPTRs."""
    _fields_ = [(n, kvm_segment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")] + \
        [("gdt", kvm_dtable), ("idt", kvm_dtable)] + \
        [(n, u64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base", "flags")] + \
        [("pdptrs", u64 * 4)]


KVM_SREGS2_FLAGS_PDPTRS_VALID = 1


class kvm_xsave(_Struct):
    """``struct kvm_xsave``: the XSAVE area as the host's CPUID leaf 0xD lays it out
    (4096 bytes; KVM_GET_XSAVE2 may need more, see KVM_CAP_XSAVE2)."""
    _fields_ = [("region", u32 * 1024)]


KVM_MAX_XCRS = 16


class kvm_xcr(_Struct):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(_Struct):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS),
                ("padding", u64 * 16)]


class kvm_vcpu_events_exception(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                ("error_code", u32)]


class kvm_vcpu_events_interrupt(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class kvm_vcpu_events_nmi(_Struct):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class kvm_vcpu_events_smi(_Struct):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events(_Struct):
    _fields_ = [("exception", kvm_vcpu_events_exception),
                ("interrupt", kvm_vcpu_events_interrupt), ("nmi", kvm_vcpu_events_nmi),
                ("sipi_vector", u32), ("flags", u32), ("smi", kvm_vcpu_events_smi),
                ("triple_fault", u8), ("reserved", u8 * 26), ("exception_has_payload", u8),
                ("exception_payload", u64)]


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4
KVM_VCPUEVENT_VALID_SMM = 0x8
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20


class kvm_debugregs(_Struct):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64),
                ("reserved", u64 * 9)]


class kvm_irqchip(_Struct):
    """``struct kvm_irqchip``: ``chip`` is the union of kvm_pic_state and
    kvm_ioapic_state (512 bytes), kept as bytes: kemu saves it whole."""
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", ctypes.c_char * 512)]


KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_NR_IRQCHIPS = 3


class kvm_pit_channel_state(_Struct):
    _fields_ = [("count", u32), ("latched_count", u16), ("count_latched", u8),
                ("status_latched", u8), ("status", u8), ("read_state", u8),
                ("write_state", u8), ("write_latch", u8), ("rw_mode", u8), ("mode", u8),
                ("bcd", u8), ("gate", u8), ("count_load_time", ctypes.c_int64)]


class kvm_pit_state2(_Struct):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32),
                ("reserved", u32 * 9)]


class kvm_clock_data(_Struct):
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64),
                ("host_tsc", u64), ("pad", u32 * 4)]


KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3


class kvm_dirty_log(_Struct):
    # slot, padding, then union { void *dirty_bitmap; __u64 padding2; }
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


# -- struct kvm_run and its exit union (api.rst 5.) ----------------------------------
class kvm_run_io(_Struct):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class kvm_run_mmio(_Struct):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_fail_entry(_Struct):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_hw(_Struct):
    _fields_ = [("hardware_exit_reason", u64)]


class kvm_run_ex(_Struct):
    _fields_ = [("exception", u32), ("error_code", u32)]


class kvm_run_internal(_Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_system_event(_Struct):
    # type, ndata, then union { __u64 flags; __u64 data[16]; }
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [("hw", kvm_run_hw), ("fail_entry", kvm_run_fail_entry), ("ex", kvm_run_ex),
                ("io", kvm_run_io), ("mmio", kvm_run_mmio), ("internal", kvm_run_internal),
                ("system_event", kvm_run_system_event), ("padding", ctypes.c_char * 256)]


SYNC_REGS_SIZE_BYTES = 2048


class kvm_run(_Struct):
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64), ("exit", kvm_run_exit),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64),
                ("s", ctypes.c_char * SYNC_REGS_SIZE_BYTES)]


def _flex(header, entry, name: str):
    cache: dict[int, type] = {}

    def make(n: int):
        cls = cache.get(n)
        if cls is None:
            cls = type(f"{header.__name__}_{n}", (_Struct,),
                       {"_fields_": list(header._fields_) + [(name, entry * n)]})
            cache[n] = cls
        return cls
    return make


#: ``kvm_msrs_with(n)`` is ``struct kvm_msrs`` with room for ``n`` entries.
kvm_msrs_with = _flex(kvm_msrs, kvm_msr_entry, "entries")
kvm_cpuid2_with = _flex(kvm_cpuid2, kvm_cpuid_entry2, "entries")
kvm_msr_list_with = _flex(kvm_msr_list, u32, "indices")
kvm_xsave_with = _flex(kvm_xsave, u32, "extra")

# --------------------------------------------------------------------------------------
# ioctl numbers (<linux/kvm.h>)
# --------------------------------------------------------------------------------------
# system ioctls
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
# vm ioctls
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, u64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, kvm_irq_level)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, kvm_irqchip)
KVM_IRQFD = _IOW(KVMIO, 0x76, kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, kvm_pit_config)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, kvm_ioeventfd)
KVM_SET_CLOCK = _IOW(KVMIO, 0x7b, kvm_clock_data)
KVM_GET_CLOCK = _IOR(KVMIO, 0x7c, kvm_clock_data)
KVM_GET_PIT2 = _IOR(KVMIO, 0x9f, kvm_pit_state2)
KVM_SET_PIT2 = _IOW(KVMIO, 0xa0, kvm_pit_state2)
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xA5, kvm_msi)
# vcpu ioctls
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_GET_FPU = _IOR(KVMIO, 0x8c, kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8d, kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8e, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8f, kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)
KVM_NMI = _IO(KVMIO, 0x9a)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9f, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xa0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xa1, kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xa2, kvm_debugregs)
KVM_GET_XSAVE = _IOR(KVMIO, 0xa4, kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xa5, kvm_xsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xa6, kvm_xcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xa7, kvm_xcrs)
KVM_KVMCLOCK_CTRL = _IO(KVMIO, 0xad)
KVM_GET_SREGS2 = _IOR(KVMIO, 0xcc, kvm_sregs2)
KVM_SET_SREGS2 = _IOW(KVMIO, 0xcd, kvm_sregs2)
KVM_GET_XSAVE2 = _IOR(KVMIO, 0xcf, kvm_xsave)

# capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_SREGS2 = 200
KVM_CAP_XSAVE2 = 208

# exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
_SUBERRORS = {1: "emulation failure", 2: "exception while delivering an exception",
              3: "event delivery failure", 4: "unexpected exit reason"}

#: Present when /dev/kvm is the PVM module (guest CPL0 code emulated).
PVM_MODULE = "/sys/module/kvm_pvm"

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

# --------------------------------------------------------------------------------------
# the syscall
# --------------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc_ioctl.restype = ctypes.c_int

#: ioctl number -> name, for error messages.
_NAMES = {v: k for k, v in list(globals().items())
          if k.startswith("KVM_") and isinstance(v, int) and (v >> 8) & 0xFF == KVMIO}


def ioctl(fd: int, request: int, arg: int | ctypes.Structure | None = None) -> int:
    """``ioctl(fd, request, arg)``; ``arg`` is a plain integer or a structure passed by
    address.  Failures raise :class:`OSError` (the caller words the message)."""
    if isinstance(arg, (ctypes.Structure, ctypes.Union, ctypes.Array, ctypes.c_uint64)):
        ptr = ctypes.addressof(arg)
    else:
        ptr = arg or 0
    ret = _libc_ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{_NAMES.get(request, hex(request))}: {os.strerror(err)}")
    return ret


def _accel_error(what: str, e: OSError) -> AccelError:
    return AccelError(f"KVM: {what} failed: {os.strerror(e.errno) if e.errno else e}")


# --------------------------------------------------------------------------------------
# /dev/kvm
# --------------------------------------------------------------------------------------
KVM_API_VERSION = 12
DEV_KVM = "/dev/kvm"


class Kvm:
    """The system file descriptor (``open("/dev/kvm")``, api.rst 4.1-4.4, 4.46)."""

    def __init__(self, path: str = DEV_KVM) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise AccelError(f"{path} does not exist: this host has no KVM (load the kvm "
                             "module, enable virtualization, or use --accel tcg)") from None
        except PermissionError:
            raise AccelError(f"no permission to open {path}: add yourself to the kvm group "
                             "(sudo usermod -aG kvm $USER, then log in again) "
                             "or use --accel tcg") from None
        except OSError as e:
            raise AccelError(f"cannot open {path}: {e.strerror} (use --accel tcg)") from None
        try:
            version = ioctl(self.fd, KVM_GET_API_VERSION)
        except OSError as e:
            os.close(self.fd)
            raise AccelError(f"{path} is not a KVM device ({os.strerror(e.errno)}): "
                             "use --accel tcg") from None
        if version != KVM_API_VERSION:
            os.close(self.fd)
            raise AccelError(f"{path} speaks KVM API version {version}, kemu needs "
                             f"{KVM_API_VERSION} (use --accel tcg)")
        self.api_version = version
        self._mmap_size: int | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 when unsupported, else a capability-specific value."""
        return ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    @property
    def vcpu_mmap_size(self) -> int:
        if self._mmap_size is None:
            self._mmap_size = ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)
        return self._mmap_size

    def get_supported_cpuid(self, max_entries: int = 256) -> list[kvm_cpuid_entry2]:
        """``KVM_GET_SUPPORTED_CPUID`` (api.rst 4.46), growing the buffer on E2BIG."""
        n = max_entries
        while True:
            buf = kvm_cpuid2_with(n)()
            buf.nent = n
            try:
                ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, buf)
            except OSError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise _accel_error("KVM_GET_SUPPORTED_CPUID", e) from None
            return [_copy(buf.entries[i]) for i in range(buf.nent)]

    def get_msr_index_list(self) -> list[int]:
        """``KVM_GET_MSR_INDEX_LIST``: the MSRs KVM saves and restores for a guest."""
        n = 512
        while True:
            buf = kvm_msr_list_with(n)()
            buf.nmsrs = n
            try:
                ioctl(self.fd, KVM_GET_MSR_INDEX_LIST, buf)
            except OSError as e:
                if e.errno == errno.E2BIG and n < 65536:
                    n = max(n * 2, buf.nmsrs)
                    continue
                raise _accel_error("KVM_GET_MSR_INDEX_LIST", e) from None
            return list(buf.indices[:buf.nmsrs])

    def create_vm(self) -> VmFd:
        try:
            fd = ioctl(self.fd, KVM_CREATE_VM, 0)
        except OSError as e:
            raise _accel_error("KVM_CREATE_VM", e) from None
        return VmFd(self, fd)


def _copy(s):
    return type(s).from_buffer_copy(s)


class VmFd:
    """A VM file descriptor (api.rst 4.x "vm ioctl")."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self._slots: dict[int, kvm_userspace_memory_region] = {}
        self._irq_level = kvm_irq_level()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def _call(self, name: str, request: int, arg=None) -> int:
        try:
            return ioctl(self.fd, request, arg)
        except OSError as e:
            raise _accel_error(name, e) from None

    # -- memory ---------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` (api.rst 4.35); size 0 deletes the slot."""
        region = kvm_userspace_memory_region(slot, flags, guest_phys_addr, memory_size,
                                             userspace_addr)
        self._call("KVM_SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION, region)
        if memory_size:
            self._slots[slot] = region
        else:
            self._slots.pop(slot, None)

    def map_memory(self, memory, first_slot: int = 0) -> list[int]:
        """Give every RAM region of a :class:`~kemu.memory.GuestMemory` its own slot.

        Returns the slot numbers used.  The regions must outlive the VM.
        """
        slots = []
        for i, region in enumerate(memory.regions):
            slot = first_slot + i
            self.set_user_memory_region(slot, region.base, region.size, region.host_address)
            slots.append(slot)
        return slots

    @property
    def slots(self) -> dict[int, kvm_userspace_memory_region]:
        return dict(self._slots)

    # -- x86 VM setup -------------------------------------------------------------------
    def set_tss_addr(self, addr: int) -> None:
        """``KVM_SET_TSS_ADDR`` (api.rst 4.43): three pages below 4 GiB outside RAM,
        needed by Intel VMX for real mode emulation."""
        self._call("KVM_SET_TSS_ADDR", KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """``KVM_SET_IDENTITY_MAP_ADDR`` (api.rst 4.47): one page outside RAM (VMX)."""
        self._call("KVM_SET_IDENTITY_MAP_ADDR", KVM_SET_IDENTITY_MAP_ADDR, u64(addr))

    # -- interrupts -----------------------------------------------------------------------
    def create_irqchip(self) -> None:
        """``KVM_CREATE_IRQCHIP`` (api.rst 4.24): in-kernel PIC pair, IOAPIC and
        per-vCPU local APICs; GSIs 0-15 go to PIC and IOAPIC, 16-23 to the IOAPIC."""
        self._call("KVM_CREATE_IRQCHIP", KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = KVM_PIT_SPEAKER_DUMMY) -> None:
        """``KVM_CREATE_PIT2`` (api.rst 4.56): in-kernel i8254 on GSI 0 (after the irqchip)."""
        self._call("KVM_CREATE_PIT2", KVM_CREATE_PIT2, kvm_pit_config(flags))

    def irq_line(self, gsi: int, level: bool) -> None:
        """``KVM_IRQ_LINE`` (api.rst 4.25): set the level of an in-kernel irqchip input."""
        s = self._irq_level
        s.irq = gsi
        s.level = 1 if level else 0
        try:
            ioctl(self.fd, KVM_IRQ_LINE, s)
        except OSError as e:
            raise _accel_error(f"KVM_IRQ_LINE (gsi {gsi})", e) from None

    def signal_msi(self, address: int, data: int) -> None:
        """``KVM_SIGNAL_MSI`` (api.rst 4.71): deliver a message-signalled interrupt
        (an x86 MSI: the local APIC address and data a device wrote)."""
        try:
            ioctl(self.fd, KVM_SIGNAL_MSI, kvm_msi(address & 0xFFFFFFFF, address >> 32, data))
        except OSError as e:
            raise _accel_error(f"KVM_SIGNAL_MSI ({address:#x} <- {data:#x})", e) from None

    def irq_sink(self, gsi: int):
        """A callable for :meth:`kemu.devices.base.IrqLine.connect` driving ``gsi``."""
        return lambda level: self.irq_line(gsi, level)

    def irqfd(self, fd: int, gsi: int, resamplefd: int | None = None,
              deassign: bool = False) -> None:
        """``KVM_IRQFD`` (api.rst 4.75): writing to eventfd ``fd`` raises ``gsi``."""
        flags = KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        if resamplefd is not None:
            flags |= KVM_IRQFD_FLAG_RESAMPLE
        req = kvm_irqfd(fd, gsi, flags, resamplefd or 0)
        self._call("KVM_IRQFD", KVM_IRQFD, req)

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        """``KVM_IOEVENTFD`` (api.rst 4.59): guest writes to ``addr`` signal eventfd ``fd``
        in the kernel instead of exiting (``length`` 0 matches any size)."""
        flags = (KVM_IOEVENTFD_FLAG_PIO if pio else 0) | \
            (KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        req = kvm_ioeventfd(datamatch or 0, addr, length, fd, flags)
        self._call("KVM_IOEVENTFD", KVM_IOEVENTFD, req)

    # -- VM-wide state (snapshots) --------------------------------------------------------
    def get_irqchip(self, chip_id: int) -> kvm_irqchip:
        """``KVM_GET_IRQCHIP`` (api.rst 4.26): a PIC (0, 1) or the I/O APIC (2)."""
        chip = kvm_irqchip(chip_id=chip_id)
        self._call("KVM_GET_IRQCHIP", KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: kvm_irqchip) -> None:
        self._call("KVM_SET_IRQCHIP", KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> kvm_pit_state2:
        """``KVM_GET_PIT2`` (api.rst 4.62): the in-kernel i8254's three channels."""
        s = kvm_pit_state2()
        self._call("KVM_GET_PIT2", KVM_GET_PIT2, s)
        return s

    def set_pit2(self, state: kvm_pit_state2) -> None:
        self._call("KVM_SET_PIT2", KVM_SET_PIT2, state)

    def get_clock(self) -> kvm_clock_data:
        """``KVM_GET_CLOCK`` (api.rst 4.53): the kvmclock value (ns) all vCPUs see."""
        s = kvm_clock_data()
        self._call("KVM_GET_CLOCK", KVM_GET_CLOCK, s)
        return s

    def set_clock(self, clock: int) -> None:
        """``KVM_SET_CLOCK`` (api.rst 4.52): kvmclock reads ``clock`` ns from now on."""
        self._call("KVM_SET_CLOCK", KVM_SET_CLOCK, kvm_clock_data(clock=clock))

    def set_dirty_logging(self, slot: int, enabled: bool) -> None:
        """Re-register ``slot`` with or without ``KVM_MEM_LOG_DIRTY_PAGES`` (api.rst 4.35)."""
        r = self._slots[slot]
        flags = (r.flags | KVM_MEM_LOG_DIRTY_PAGES) if enabled else \
            (r.flags & ~KVM_MEM_LOG_DIRTY_PAGES)
        self.set_user_memory_region(slot, r.guest_phys_addr, r.memory_size, r.userspace_addr,
                                    flags)

    def get_dirty_log(self, slot: int) -> bytes:
        """``KVM_GET_DIRTY_LOG`` (api.rst 4.8): one bit per 4 KiB page of ``slot``
        written since the last call (the log is cleared), as little-endian bytes."""
        pages = self._slots[slot].memory_size // 4096
        words = (pages + 63) // 64
        bitmap = (u64 * words)()
        log = kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        self._call("KVM_GET_DIRTY_LOG", KVM_GET_DIRTY_LOG, log)
        return bytes(bitmap)

    # -- vCPUs ----------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        """``KVM_CREATE_VCPU`` (api.rst 4.7); on x86 the id is the initial APIC id."""
        fd = self._call(f"KVM_CREATE_VCPU {vcpu_id}", KVM_CREATE_VCPU, vcpu_id)
        return VcpuFd(self, fd, vcpu_id)


# Offsets inside kvm_run, taken from the ctypes layout (checked against C).
_OFF_IMMEDIATE_EXIT = kvm_run.immediate_exit.offset
_OFF_EXIT_REASON = kvm_run.exit_reason.offset
_OFF_EXIT = kvm_run.exit.offset
_U32 = struct.Struct("<I")
_IO_EXIT = struct.Struct("<BBHIQ")                 # kvm_run.io
_MMIO_EXIT = struct.Struct("<Q8sIB")               # kvm_run.mmio
_UINT = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"),
         8: struct.Struct("<Q")}


class VcpuFd:
    """A vCPU file descriptor with its mmapped ``struct kvm_run`` (api.rst 4.x, 5.)."""

    def __init__(self, vm: VmFd, fd: int, vcpu_id: int) -> None:
        self.vm = vm
        self.fd = fd
        self.id = vcpu_id
        size = vm.kvm.vcpu_mmap_size
        try:
            self._run_map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise _accel_error("mmap of kvm_run", e) from None
        #: ``struct kvm_run`` as a ctypes view of the shared page.
        self.kvm_run = kvm_run.from_buffer(self._run_map)
        # The exit currently being split (string I/O): kind, port, size, count,
        # data_offset, index of the element handed out last.
        self._io: list | None = None
        self._pending: tuple[int, int] | None = None   # (offset in kvm_run, size) to complete
        # Exits are frozen dataclasses: reads of a port are the same object every time.
        self._io_in: dict[tuple[int, int], IoIn] = {}

    def close(self) -> None:
        if self.fd >= 0:
            del self.kvm_run
            try:
                self._run_map.close()
            except BufferError:
                pass
            os.close(self.fd)
            self.fd = -1

    def _call(self, name: str, request: int, arg=None) -> int:
        try:
            return ioctl(self.fd, request, arg)
        except OSError as e:
            raise _accel_error(f"{name} (vcpu {self.id})", e) from None

    # -- registers -----------------------------------------------------------------------
    def get_regs(self) -> kvm_regs:
        r = kvm_regs()
        self._call("KVM_GET_REGS", KVM_GET_REGS, r)
        return r

    def set_regs(self, regs: kvm_regs) -> None:
        self._call("KVM_SET_REGS", KVM_SET_REGS, regs)

    def get_sregs(self) -> kvm_sregs:
        s = kvm_sregs()
        self._call("KVM_GET_SREGS", KVM_GET_SREGS, s)
        return s

    def set_sregs(self, sregs: kvm_sregs) -> None:
        self._call("KVM_SET_SREGS", KVM_SET_SREGS, sregs)

    def get_fpu(self) -> kvm_fpu:
        f = kvm_fpu()
        self._call("KVM_GET_FPU", KVM_GET_FPU, f)
        return f

    def set_fpu(self, fpu: kvm_fpu) -> None:
        self._call("KVM_SET_FPU", KVM_SET_FPU, fpu)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """``KVM_GET_MSRS`` (api.rst 4.18); raises naming the first MSR KVM refused."""
        indices = list(indices)
        buf = kvm_msrs_with(len(indices))()
        buf.nmsrs = len(indices)
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        n = self._call("KVM_GET_MSRS", KVM_GET_MSRS, buf)
        if n != len(indices):
            raise AccelError(f"KVM: KVM_GET_MSRS refused MSR {indices[n]:#x} (vcpu {self.id})")
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_msrs(self, msrs: dict[int, int] | Iterable[tuple[int, int]]) -> None:
        """``KVM_SET_MSRS`` (api.rst 4.19); raises naming the first MSR KVM refused."""
        items = list(msrs.items() if isinstance(msrs, dict) else msrs)
        buf = kvm_msrs_with(len(items))()
        buf.nmsrs = len(items)
        for i, (index, value) in enumerate(items):
            buf.entries[i].index = index
            buf.entries[i].data = value
        n = self._call("KVM_SET_MSRS", KVM_SET_MSRS, buf)
        if n != len(items):
            raise AccelError(f"KVM: KVM_SET_MSRS refused MSR {items[n][0]:#x} "
                             f"= {items[n][1]:#x} (vcpu {self.id})")

    def set_cpuid2(self, entries: list[kvm_cpuid_entry2]) -> None:
        """``KVM_SET_CPUID2`` (api.rst 4.39)."""
        buf = kvm_cpuid2_with(len(entries))()
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        self._call("KVM_SET_CPUID2", KVM_SET_CPUID2, buf)

    def get_cpuid2(self) -> list[kvm_cpuid_entry2]:
        """``KVM_GET_CPUID2``: the CPUID table this vCPU was given.

        Kernels differ in how they say how many entries they filled: newer ones
        write ``nent`` back on success, older ones (5.x and before) only with
        E2BIG.  So the buffer grows on E2BIG, its entries start as a sentinel
        (leaf 0xffffffff, which KVM never has), and the table ends at ``nent`` or
        at the first sentinel left, whichever comes first."""
        n = 64
        while True:
            buf = kvm_cpuid2_with(n)()
            buf.nent = n
            ctypes.memset(ctypes.addressof(buf.entries), 0xFF, ctypes.sizeof(buf.entries))
            try:
                ioctl(self.fd, KVM_GET_CPUID2, buf)
            except OSError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise _accel_error(f"KVM_GET_CPUID2 (vcpu {self.id})", e) from None
            out = []
            for i in range(min(buf.nent, n)):
                if buf.entries[i].function == 0xFFFFFFFF:
                    break
                out.append(_copy(buf.entries[i]))
            return out

    def get_lapic(self) -> kvm_lapic_state:
        s = kvm_lapic_state()
        self._call("KVM_GET_LAPIC", KVM_GET_LAPIC, s)
        return s

    def set_lapic(self, state: kvm_lapic_state) -> None:
        self._call("KVM_SET_LAPIC", KVM_SET_LAPIC, state)

    def get_mp_state(self) -> int:
        s = kvm_mp_state()
        self._call("KVM_GET_MP_STATE", KVM_GET_MP_STATE, s)
        return s.mp_state

    def set_mp_state(self, state: int) -> None:
        self._call("KVM_SET_MP_STATE", KVM_SET_MP_STATE, kvm_mp_state(state))

    def get_sregs2(self) -> kvm_sregs2:
        s = kvm_sregs2()
        self._call("KVM_GET_SREGS2", KVM_GET_SREGS2, s)
        return s

    def set_sregs2(self, sregs: kvm_sregs2) -> None:
        self._call("KVM_SET_SREGS2", KVM_SET_SREGS2, sregs)

    def get_xsave(self, size: int = 4096) -> ctypes.Structure:
        """``KVM_GET_XSAVE`` (api.rst 4.42), or ``KVM_GET_XSAVE2`` for an area larger
        than 4096 bytes (``size`` from KVM_CAP_XSAVE2)."""
        if size <= ctypes.sizeof(kvm_xsave):
            s = kvm_xsave()
            self._call("KVM_GET_XSAVE", KVM_GET_XSAVE, s)
            return s
        s = kvm_xsave_with((size - ctypes.sizeof(kvm_xsave) + 3) // 4)()
        self._call("KVM_GET_XSAVE2", KVM_GET_XSAVE2, s)
        return s

    def set_xsave(self, state: ctypes.Structure) -> None:
        self._call("KVM_SET_XSAVE", KVM_SET_XSAVE, state)

    def get_xcrs(self) -> kvm_xcrs:
        s = kvm_xcrs()
        self._call("KVM_GET_XCRS", KVM_GET_XCRS, s)
        return s

    def set_xcrs(self, state: kvm_xcrs) -> None:
        self._call("KVM_SET_XCRS", KVM_SET_XCRS, state)

    def get_vcpu_events(self) -> kvm_vcpu_events:
        """``KVM_GET_VCPU_EVENTS`` (api.rst 4.31): pending and injected exceptions,
        interrupts, NMIs, SIPI, SMM."""
        s = kvm_vcpu_events()
        self._call("KVM_GET_VCPU_EVENTS", KVM_GET_VCPU_EVENTS, s)
        return s

    def set_vcpu_events(self, events: kvm_vcpu_events) -> None:
        self._call("KVM_SET_VCPU_EVENTS", KVM_SET_VCPU_EVENTS, events)

    def get_debugregs(self) -> kvm_debugregs:
        s = kvm_debugregs()
        self._call("KVM_GET_DEBUGREGS", KVM_GET_DEBUGREGS, s)
        return s

    def set_debugregs(self, state: kvm_debugregs) -> None:
        self._call("KVM_SET_DEBUGREGS", KVM_SET_DEBUGREGS, state)

    def kvmclock_ctrl(self) -> None:
        """``KVM_KVMCLOCK_CTRL`` (api.rst 4.71): tell the guest it was paused (no
        soft-lockup warning for the time it did not run)."""
        self._call("KVM_KVMCLOCK_CTRL", KVM_KVMCLOCK_CTRL)

    def nmi(self) -> None:
        """``KVM_NMI``: inject an NMI through the local APIC's LINT1."""
        self._call("KVM_NMI", KVM_NMI)

    # -- running ----------------------------------------------------------------------------
    @property
    def immediate_exit(self) -> bool:
        return bool(self._run_map[_OFF_IMMEDIATE_EXIT])

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        """``kvm_run.immediate_exit`` (KVM_CAP_IMMEDIATE_EXIT): the next KVM_RUN returns
        EINTR at once; used with a signal to kick a vCPU without races."""
        self._run_map[_OFF_IMMEDIATE_EXIT] = 1 if value else 0

    def complete(self, value: int) -> None:
        """Answer the last :class:`IoIn` / :class:`MmioRead` that :meth:`run` returned;
        KVM copies the value into the guest register on the next ``KVM_RUN``."""
        pending = self._pending
        if pending is None:
            raise AccelError(f"KVM: vcpu {self.id}: no port or MMIO read to complete")
        off, size = pending
        _UINT[size].pack_into(self._run_map, off, value & ((1 << (8 * size)) - 1))
        self._pending = None

    def run(self) -> Exit:
        """``KVM_RUN`` until the guest needs the VMM; the exit as data.

        EINTR (a signal, or ``immediate_exit``) is :class:`Kicked`.  The elements
        of a string I/O exit are returned one by one before KVM is entered again.
        """
        io = self._io
        if io is not None:
            io[5] += 1
            if io[5] < io[3]:
                return self._io_element(io)
            self._io = None
        self._pending = None
        try:
            fcntl.ioctl(self.fd, KVM_RUN, 0)
        except InterruptedError:
            return Kicked()
        except OSError as e:
            if e.errno == errno.EAGAIN:
                return Kicked()
            raise _accel_error(f"KVM_RUN (vcpu {self.id})", e) from None
        m = self._run_map
        reason = _U32.unpack_from(m, _OFF_EXIT_REASON)[0]
        if reason == KVM_EXIT_IO:
            direction, size, port, count, data_offset = _IO_EXIT.unpack_from(m, _OFF_EXIT)
            io = [direction, port, size, count, data_offset, 0]
            if count > 1:
                self._io = io
            return self._io_element(io)
        if reason == KVM_EXIT_MMIO:
            addr, data, length, is_write = _MMIO_EXIT.unpack_from(m, _OFF_EXIT)
            if length not in _UINT:
                return InternalError(f"MMIO access of {length} bytes at {addr:#x}")
            if is_write:
                return MmioWrite(addr, length, int.from_bytes(data[:length], "little"))
            self._pending = (_OFF_EXIT + 8, length)
            return MmioRead(addr, length)
        return self._other_exit(reason)

    def complete_pending_io(self) -> None:
        """``KVM_RUN`` with ``immediate_exit`` set: KVM finishes an I/O or MMIO access
        the VMM has answered and returns without entering the guest (api.rst 5.,
        immediate_exit), so the registers read next hold its result.  Called on a
        stopped vCPU before its state is saved."""
        if self._io is not None:
            raise AccelError(f"KVM: vcpu {self.id}: stopped inside a string I/O exit")
        self._pending = None
        self.immediate_exit = True
        try:
            fcntl.ioctl(self.fd, KVM_RUN, 0)
        except (InterruptedError, BlockingIOError):
            pass
        except OSError as e:
            if e.errno not in (errno.EINTR, errno.EAGAIN):
                raise _accel_error(f"KVM_RUN (vcpu {self.id})", e) from None
        finally:
            self.immediate_exit = False

    def _io_element(self, io: list) -> Exit:
        direction, port, size, count, data_offset, index = io
        if size not in _UINT or data_offset + count * size > len(self._run_map):
            return InternalError(f"bad port I/O exit: port {port:#x} size {size} "
                                 f"count {count}")
        off = data_offset + index * size
        if direction == KVM_EXIT_IO_OUT:
            return IoOut(port, size, _UINT[size].unpack_from(self._run_map, off)[0])
        self._pending = (off, size)
        exit = self._io_in.get((port, size))
        if exit is None:
            exit = self._io_in[(port, size)] = IoIn(port, size)
        return exit

    def _rip(self) -> str:
        try:
            return f" at rip {self.get_regs().rip:#x}"
        except AccelError:
            return ""

    def _other_exit(self, reason: int) -> Exit:
        run = self.kvm_run
        if reason == KVM_EXIT_HLT:
            return Halted()
        if reason in (KVM_EXIT_INTR, KVM_EXIT_IRQ_WINDOW_OPEN):
            return Kicked()
        if reason == KVM_EXIT_SHUTDOWN:
            # A triple fault; the PC's response is a reset (api.rst: KVM_EXIT_SHUTDOWN).
            return SystemEvent("reset")
        if reason == KVM_EXIT_SYSTEM_EVENT:
            kind = run.exit.system_event.type
            if kind == KVM_SYSTEM_EVENT_SHUTDOWN:
                return SystemEvent("poweroff")
            if kind == KVM_SYSTEM_EVENT_RESET:
                return SystemEvent("reset")
            if kind == KVM_SYSTEM_EVENT_CRASH:
                return InternalError(f"vcpu {self.id}: guest crashed{self._rip()}")
            return InternalError(f"vcpu {self.id}: unhandled KVM system event {kind}")
        if reason == KVM_EXIT_INTERNAL_ERROR:
            internal = run.exit.internal
            sub = internal.suberror
            what = _SUBERRORS.get(sub, f"suberror {sub}")
            detail = ""
            if sub == KVM_INTERNAL_ERROR_EMULATION and internal.ndata >= 2 \
                    and internal.data[0] & 1:
                # struct emulation_failure: flags at +8, insn_size at +16, bytes after.
                raw = self._run_map[_OFF_EXIT + 16:_OFF_EXIT + 32]
                n = min(raw[0], 15)
                detail = f", instruction bytes {raw[1:1 + n].hex(' ')}"
            elif internal.ndata:
                detail = ", data " + " ".join(f"{internal.data[i]:#x}"
                                              for i in range(min(internal.ndata, 16)))
            if os.path.isdir(PVM_MODULE):
                detail += (" (this /dev/kvm is PVM, which emulates guest kernel code: "
                           "unmodified Linux does not run on it; use --accel tcg)")
            return InternalError(f"vcpu {self.id}: KVM internal error: {what}"
                                 f"{self._rip()}{detail}")
        if reason == KVM_EXIT_FAIL_ENTRY:
            fe = run.exit.fail_entry
            return InternalError(f"vcpu {self.id}: KVM entry failed, hardware reason "
                                 f"{fe.hardware_entry_failure_reason:#x} on cpu {fe.cpu}")
        if reason == KVM_EXIT_EXCEPTION:
            ex = run.exit.ex
            return InternalError(f"vcpu {self.id}: guest exception {ex.exception} "
                                 f"(error code {ex.error_code:#x}){self._rip()}")
        if reason == KVM_EXIT_UNKNOWN:
            return InternalError(f"vcpu {self.id}: unknown KVM exit, hardware reason "
                                 f"{run.exit.hw.hardware_exit_reason:#x}{self._rip()}")
        return InternalError(f"vcpu {self.id}: unhandled KVM exit reason {reason}{self._rip()}")
