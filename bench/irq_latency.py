#!/usr/bin/env python3
"""Timer interrupt latency of a guest that spins: kemu vs qemu-system-aarch64.

A purpose-built bare-metal guest (an arm64 Image, assembled here with
binutils-aarch64-linux-gnu) arms the EL1 virtual timer 1-2 ms ahead, then
spins in a loop with no exception, no system-register access and no MMIO,
interrupts unmasked.  Its IRQ handler reads the counter: the latency is the
counter at handler entry minus the deadline (CNTV_CVAL).  After N samples it
prints them in hex on the PL011 and powers off through PSCI.  Both machines
run the same image with ``-M virt -cpu cortex-a57``; the report is the
distribution (median, 90th and 99th percentile, maximum) in microseconds,
and the host's load average.

    .venv/bin/python bench/irq_latency.py [--samples N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from boot_aarch64 import ensure_qemu  # noqa: E402

NS_PER_TICK = 16

GUEST = r"""
    .equ UART, 0x09000000
    .equ GICD, 0x08000000
    .equ GICC, 0x08010000
    .text
_head:
    b start
    .long 0
    .quad 0                     // text_offset
    .quad _end - _head          // image_size
    .quad 0                     // flags
    .quad 0, 0, 0
    .ascii "ARM\x64"
    .long 0
start:
    adr x1, vectors
    msr vbar_el1, x1
    ldr x1, =GICD
    mov w2, #1
    str w2, [x1]                // GICD_CTLR: enable
    mov w2, #(1 << 27)
    str w2, [x1, #0x100]        // GICD_ISENABLER0: PPI 11 (virtual timer, INTID 27)
    ldr x1, =GICC
    mov w2, #0xff
    str w2, [x1, #4]            // GICC_PMR
    mov w2, #1
    str w2, [x1]                // GICC_CTLR: enable
    ldr x20, =SAMPLES
    mov x21, #0
    adr x22, samples
    ldr x23, =62500             // 1 ms
next:
    mrs x1, cntvct_el0
    and x2, x1, #0xffff         // + up to 1 ms, so deadlines do not align with anything
    add x2, x2, x23
    add x3, x1, x2
    msr cntv_cval_el0, x3
    mov x4, #1
    msr cntv_ctl_el0, x4        // enable, unmasked
    msr daifclr, #2
spin:
    add x5, x5, #1
    eor x6, x6, x5
    b spin

irq:
    mrs x6, cntvct_el0
    mrs x7, cntv_cval_el0
    sub x6, x6, x7
    and x9, x21, #(BUFFER - 1)
    str x6, [x22, x9, lsl #3]
    msr cntv_ctl_el0, xzr       // disable: the line drops
    ldr x1, =GICC
    ldr w2, [x1, #0x0c]         // GICC_IAR
    str w2, [x1, #0x10]         // GICC_EOIR
    add x21, x21, #1
    cmp x21, x20
    b.lt next

    mov x21, #0                 // print the samples in hex, one a line
print:
    ldr x6, [x22, x21, lsl #3]
    mov x8, #60
digit:
    lsr x9, x6, x8
    and x9, x9, #0xf
    cmp x9, #10
    add x10, x9, #'0'
    add x11, x9, #('a' - 10)
    csel x10, x10, x11, lt
    bl putc
    subs x8, x8, #4
    b.ge digit
    mov x10, #'\n'
    bl putc
    add x21, x21, #1
    cmp x21, x20
    b.lt print
    ldr x0, =0x84000008         // PSCI SYSTEM_OFF
    hvc #0
1:  b 1b

putc:
    ldr x1, =UART
1:  ldr w2, [x1, #0x18]         // UARTFR: wait while TXFF
    tbnz w2, #5, 1b
    str w10, [x1]
    ret

    .ltorg
    .balign 2048
vectors:
    .skip 0x280                 // current EL with SP_ELx, IRQ
    b irq
    .balign 8
samples:
    .skip 8 * BUFFER
_end:
"""


def build_guest(tmp: Path, samples: int) -> Path:
    """The guest image; it keeps the last 2**k >= ``samples`` samples (all of
    them unless ``samples`` is huge: bench/stop_latency.py's endless guest)."""
    gas = shutil.which("aarch64-linux-gnu-as")
    objcopy = shutil.which("aarch64-linux-gnu-objcopy")
    if not gas or not objcopy:
        raise SystemExit("needs binutils-aarch64-linux-gnu (scripts/bootstrap.sh --test)")
    buffer = 1 << min(16, max(0, samples - 1).bit_length())
    (tmp / "g.s").write_text(GUEST.replace("SAMPLES", str(samples))
                             .replace("BUFFER", str(buffer)))
    subprocess.run([gas, "-o", str(tmp / "g.o"), str(tmp / "g.s")], check=True)
    image = tmp / "Image"
    subprocess.run([objcopy, "-O", "binary", str(tmp / "g.o"), str(image)], check=True)
    return image


def latencies(cmd: list[str], samples: int) -> list[float]:
    out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    values = [int(line, 16) for line in out.stdout.decode(errors="replace").split()
              if len(line) == 16]
    if len(values) != samples:
        raise SystemExit(f"{cmd[0]}: expected {samples} samples, got {len(values)}:\n"
                         f"{(out.stdout + out.stderr).decode(errors='replace')[-2000:]}")
    return [v * NS_PER_TICK / 1000 for v in values]


def summary(values: list[float]) -> str:
    s = sorted(values)
    pct = lambda p: s[min(len(s) - 1, int(p * len(s)))]  # noqa: E731
    return (f"median {statistics.median(s):7.1f} us, p90 {pct(0.9):7.1f}, "
            f"p99 {pct(0.99):7.1f}, max {s[-1]:7.1f}, min {s[0]:6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200)
    args = ap.parse_args()
    qemu = ensure_qemu()
    with tempfile.TemporaryDirectory() as tmp:
        image = build_guest(Path(tmp), args.samples)
        common = ["-M", "virt", "-cpu", "cortex-a57", "-m", "128", "-nographic",
                  "-kernel", str(image)]
        load = os.getloadavg()[0]
        results = {"kemu": latencies([sys.executable, "-m", "kemu.cli", *common], args.samples),
                   "qemu": latencies([qemu, *common], args.samples)}
    print(f"virtual-timer IRQ latency of a spinning guest, deadline to handler entry, "
          f"{args.samples} samples each; host load average {load:.2f}, {os.cpu_count()} CPUs")
    for name, values in results.items():
        print(f"{name:5s} {summary(values)}")


if __name__ == "__main__":
    main()
