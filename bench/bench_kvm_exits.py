#!/usr/bin/env python3
"""Cost of a KVM exit through kemu's Python run loop, against a minimal C VMM.

The guest (tests/guests/io_loop.S, a flat real-mode binary at 0x1000) does N
port-I/O round trips: ``out`` to port 0x520 then ``in`` from port 0x521, two
exits each, then writes the exit port 0x501.  It runs three ways on this
host's /dev/kvm, each in a fresh VM:

* ``kemu``: :class:`kemu.accel.kvm.KvmVcpu` with a port-I/O :class:`~kemu.bus.Bus`
  and a device -- the path a board uses (exit decoding, ``dispatch``, bus
  lookup, device call, ``kvm_run`` write-back);
* ``kemu-ioctl``: the bare :meth:`VcpuFd.run` loop (the ioctl layer only);
* ``C``: a minimal C program doing the same KVM_RUN loop, compiled with gcc
  into a temporary directory at run time.

It prints round trips per second for each and the ratios C / kemu.  On PVM
hosts (kvm_pvm) the guest's instructions are emulated, so every number
includes that emulation; the ratio is what compares.

    .venv/bin/python bench/bench_kvm_exits.py [-n 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "guests"))
sys.path.insert(0, str(ROOT / "src"))

import guestbuild

from kemu.accel.base import IoIn, IoOut, SystemEvent
from kemu.accel.kvm import Kvm, KvmVcpu, is_pvm, kvm_unavailable_reason
from kemu.bus import Bus
from kemu.memory import GuestMemory, RamRegion

GUEST_BASE = 0x1000
TSS_ADDR = 0xFFFBD000
PORT_OUT, PORT_IN, EXIT_PORT = 0x520, 0x521, 0x501

C_VMM = r"""
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM (1 << 20)

static void die(const char *what) { perror(what); exit(1); }

int main(int argc, char **argv)
{
    if (argc != 3) { fprintf(stderr, "usage: vmm guest.bin N\n"); return 2; }
    long n = atol(argv[2]);
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000ul) < 0) die("KVM_SET_TSS_ADDR");
    uint8_t *mem = mmap(NULL, MEM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) die("mmap");
    FILE *f = fopen(argv[1], "rb");
    if (!f) die(argv[1]);
    size_t len = fread(mem + 0x1000, 1, MEM - 0x1000, f);
    fclose(f);
    if (!len) die("empty guest");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM, .userspace_addr = (uint64_t)mem };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    struct kvm_regs regs;
    memset(&regs, 0, sizeof regs);
    regs.rip = 0x1000;
    regs.rflags = 2;
    regs.rcx = n;
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

    struct timespec t0, t1;
    long reads = 0, writes = 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        if (run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
            return 1;
        }
        uint8_t *data = (uint8_t *)run + run->io.data_offset;
        if (run->io.port == 0x501)
            break;
        if (run->io.direction == KVM_EXIT_IO_IN)
            *data = (uint8_t)reads++;
        else
            writes++;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%ld %ld %.9f\n", reads, writes,
           (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
"""


class LoopDevice:
    """Port 0x520 counts writes, 0x521 answers reads with a counter."""

    name = "bench-io"

    def __init__(self) -> None:
        self.reads = 0
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        return self.reads & 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1


class ExitDevice:
    name = "exit"

    def __init__(self) -> None:
        self.cpu: KvmVcpu | None = None

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.cpu.request_system_event("poweroff")


def _new_vcpu(guest: bytes, n: int, pio: Bus | None):
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.set_tss_addr(TSS_ADDR)
    memory = GuestMemory([RamRegion(0, 1 << 20)])
    memory.write(GUEST_BASE, guest)
    vm.map_memory(memory)
    cpu = KvmVcpu(vm, 0, Bus("mmio") if pio is not None else None, pio)
    sregs = cpu.fd.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0, 0
    cpu.fd.set_sregs(sregs)
    regs = cpu.fd.get_regs()
    regs.rip, regs.rflags, regs.rcx = GUEST_BASE, 2, n
    cpu.fd.set_regs(regs)
    return kvm, vm, memory, cpu


def _close(kvm, vm, memory, cpu) -> None:
    cpu.close()
    vm.close()
    kvm.close()


def run_kemu(guest: bytes, n: int) -> float:
    """Round trips per second through KvmVcpu + Bus + device."""
    pio = Bus("pio", 1 << 16)
    dev, exit_dev = LoopDevice(), ExitDevice()
    pio.map(PORT_OUT, 2, dev)
    pio.map(EXIT_PORT, 1, exit_dev)
    kvm, vm, memory, cpu = _new_vcpu(guest, n, pio)
    exit_dev.cpu = cpu
    t0 = time.perf_counter()
    exit = cpu.run()
    dt = time.perf_counter() - t0
    _close(kvm, vm, memory, cpu)
    if not isinstance(exit, SystemEvent) or dev.reads != n or dev.writes != n:
        raise SystemExit(f"kemu run ended with {exit!r} after {dev.reads} reads")
    return n / dt


def run_ioctl_layer(guest: bytes, n: int) -> float:
    """Round trips per second through the bare VcpuFd.run() loop."""
    kvm, vm, memory, cpu = _new_vcpu(guest, n, None)
    fd = cpu.fd
    reads = 0
    t0 = time.perf_counter()
    while True:
        exit = fd.run()
        if type(exit) is IoIn:
            reads += 1
            fd.complete(reads & 0xFF)
        elif type(exit) is IoOut:
            if exit.port == EXIT_PORT:
                break
        else:
            raise SystemExit(f"unexpected exit {exit!r}")
    dt = time.perf_counter() - t0
    _close(kvm, vm, memory, cpu)
    if reads != n:
        raise SystemExit(f"ioctl loop saw {reads} reads, expected {n}")
    return n / dt


def run_c(vmm: Path, guest_path: Path, n: int) -> float:
    out = subprocess.run([str(vmm), str(guest_path), str(n)], capture_output=True, text=True,
                         check=False)
    if out.returncode:
        raise SystemExit(f"C VMM failed: {out.stderr.strip()}")
    reads, writes, seconds = out.stdout.split()
    if int(reads) != n or int(writes) != n:
        raise SystemExit(f"C VMM saw {reads} reads and {writes} writes, expected {n}")
    return n / float(seconds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=100_000, help="round trips per run")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each; the best is kept")
    args = ap.parse_args()
    reason = kvm_unavailable_reason() or guestbuild.toolchain_missing()
    if reason:
        print(f"skipped: {reason}")
        return 0
    with tempfile.TemporaryDirectory(prefix="kemu-bench-") as tmp:
        tmpdir = Path(tmp)
        guest = guestbuild.build_flat("io_loop", tmpdir, GUEST_BASE)
        guest_path = tmpdir / "io_loop.bin"
        (tmpdir / "vmm.c").write_text(C_VMM)
        vmm = tmpdir / "vmm"
        subprocess.run(["gcc", "-O2", "-o", str(vmm), str(tmpdir / "vmm.c")], check=True)
        results: dict[str, float] = {}
        for name, fn in (("C", lambda: run_c(vmm, guest_path, args.n)),
                         ("kemu-ioctl", lambda: run_ioctl_layer(guest, args.n)),
                         ("kemu", lambda: run_kemu(guest, args.n))):
            results[name] = max(fn() for _ in range(args.repeat))
    host = "PVM (kvm_pvm: guest code emulated)" if is_pvm() else "hardware KVM"
    print(f"KVM port-I/O round trips (out + in = 2 exits), N={args.n}, best of "
          f"{args.repeat}, on {host}:")
    for name in ("C", "kemu-ioctl", "kemu"):
        r = results[name]
        print(f"  {name:<11} {r:>12,.0f} round trips/s  {1e6 / r:8.2f} us each")
    print(f"  ratio C / kemu (KvmVcpu + Bus + device): {results['C'] / results['kemu']:.2f}x")
    print(f"  ratio C / kemu-ioctl (VcpuFd.run loop):  {results['C'] / results['kemu-ioctl']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
