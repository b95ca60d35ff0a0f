"""-M virt,gic-version=3 with a purpose-built bare-metal guest, compared with QEMU.

The guest (a raw binary, assembled at test time) reads ID_AA64PFR0_EL1.GIC,
enables the ICC system-register interface, sets up the distributor (ARE,
Group 1) and its redistributor (wakes it through GICR_WAKER, SGI/PPI groups,
priorities, enables), takes its virtual-timer PPI through ICC_IAR1_EL1 /
ICC_EOIR1_EL1, starts CPU 1 with PSCI CPU_ON and sends it SGIs through
ICC_SGI1R_EL1 (a target list, then IRM), printing each step as a hex line on
the PL011.  The same command line runs under kemu and qemu-system-aarch64;
the two outputs must be equal.
"""

import subprocess
import sys

import pytest

from bare_metal import HEX
from test_tcg_aarch64 import assemble

# S3_<op1>_C<n>_C<m>_<op2> spellings, so no assembler needs to know the GIC.
ICC_PMR = "S3_0_C4_C6_0"
ICC_IAR1 = "S3_0_C12_C12_0"
ICC_EOIR1 = "S3_0_C12_C12_1"
ICC_HPPIR1 = "S3_0_C12_C12_2"
ICC_BPR1 = "S3_0_C12_C12_3"
ICC_CTLR = "S3_0_C12_C12_4"
ICC_SRE = "S3_0_C12_C12_5"
ICC_IGRPEN1 = "S3_0_C12_C12_7"
ICC_RPR = "S3_0_C12_C11_3"
ICC_SGI1R = "S3_0_C12_C11_5"

GICD = 0x08000000
GICR0 = 0x080A0000
GICR1 = GICR0 + 0x20000
DATA = 0x40200000

GUEST = f"""
    .text
    .global _start
_start:
    ldr x0, =0x40100000
    mov sp, x0
    adr x0, vectors
    msr vbar_el1, x0
    isb
    mrs x0, id_aa64pfr0_el1
    ubfx x0, x0, #24, #4
    bl hex                          // GIC system registers implemented
    bl sre_on
    mrs x0, {ICC_SRE}
    bl hex
    ldr x19, ={GICD:#x}
    mov w0, #0x12                   // ARE, EnableGrp1
    str w0, [x19]
    ldr w0, [x19]
    bl hex
    ldr w0, [x19, #4]
    and x0, x0, #0x1f               // GICD_TYPER.ITLinesNumber
    bl hex
    ldr x20, ={GICR0:#x}
    ldr x22, =0xffffffff00ffff10    // GICR_TYPER less the LPI fields (kemu has no ITS)
    ldr x0, [x20, #8]               // GICR_TYPER of CPU 0, then CPU 1
    and x0, x0, x22
    bl hex
    ldr x0, ={GICR1 + 8:#x}
    ldr x0, [x0]
    and x0, x0, x22
    bl hex
    ldr w0, [x20, #0x14]            // GICR_WAKER at reset
    bl hex
    mov x0, x20
    bl wake
    ldr w0, [x20, #0x14]
    bl hex
    add x0, x20, #0x10000
    ldr w1, =((1 << 27) | (1 << 1))
    bl sgi_frame
    bl cpuif_on
    mrs x0, {ICC_CTLR}
    bl hex
    mrs x0, {ICC_PMR}
    bl hex
    mrs x0, {ICC_BPR1}
    bl hex
    ldr x21, ={DATA:#x}
    str xzr, [x21]
    mov x0, #6250                   // 100 us
    msr cntv_tval_el0, x0
    mov x0, #1
    msr cntv_ctl_el0, x0
1:  ldr x0, [x21]                   // IRQs masked: WFI wakes on a pending one
    cbnz x0, 2f
    wfi
    msr daifclr, #2                 // take it
    isb
    msr daifset, #2
    b 1b
2:  msr daifclr, #2
    bl hex                          // the INTID taken: the virtual timer's PPI
    ldr x0, [x21, #8]
    bl hex                          // ICC_RPR_EL1 in the handler
    ldr x0, [x21, #16]
    bl hex                          // ICC_HPPIR1_EL1 in the handler
    mov x1, #1
    adr x2, secondary
    ldr x0, =0xC4000003             // PSCI CPU_ON
    mov x3, #0
    hvc #0
    bl hex
2:  ldr x0, [x21, #0x100]           // CPU 1 ready
    cbz x0, 2b
    ldr x0, =((1 << 24) | 2)        // SGI 1 to Aff0 = 1 (target list bit 1)
    msr {ICC_SGI1R}, x0
    isb
3:  ldr x0, [x21, #0x108]
    cbz x0, 3b
    bl hex
    str xzr, [x21, #0x108]
    ldr x0, =((1 << 40) | (2 << 24)) // SGI 2 to all but self (IRM)
    msr {ICC_SGI1R}, x0
    isb
4:  ldr x0, [x21, #0x108]
    cbz x0, 4b
    bl hex
    ldr x0, [x21]                   // CPU 0 took nothing more
    bl hex
    ldr x0, [x21, #0x110]
    and x0, x0, #0xffffff           // CPU 1's MPIDR affinity
    bl hex
poweroff:
    ldr x0, =0x84000008             // PSCI SYSTEM_OFF
    hvc #0
    b .

secondary:
    ldr x0, =0x40110000
    mov sp, x0
    adr x0, vectors
    msr vbar_el1, x0
    bl sre_on
    ldr x0, ={GICR1:#x}
    bl wake
    ldr x0, ={GICR1 + 0x10000:#x}
    ldr w1, =((1 << 1) | (1 << 2))
    bl sgi_frame
    bl cpuif_on
    ldr x21, ={DATA:#x}
    mrs x0, mpidr_el1
    str x0, [x21, #0x110]
    msr daifclr, #2
    mov x0, #1
    str x0, [x21, #0x100]
5:  wfi
    b 5b

sre_on:
    mrs x0, {ICC_SRE}
    orr x0, x0, #1
    msr {ICC_SRE}, x0
    isb
    ret

wake:                               // x0: RD_base; clear ProcessorSleep, wait
    ldr w1, [x0, #0x14]
    bic w1, w1, #2
    str w1, [x0, #0x14]
1:  ldr w1, [x0, #0x14]
    tbnz w1, #2, 1b
    ret

sgi_frame:                          // x0: SGI_base, w1: ISENABLER0
    mov w2, #-1
    str w2, [x0, #0x80]             // IGROUPR0: all Group 1
    ldr w2, =0x80808080
    add x4, x0, #0x400
    mov x3, #0
1:  str w2, [x4, x3]
    add x3, x3, #4
    cmp x3, #32
    b.lt 1b
    str w1, [x0, #0x100]
    ret

cpuif_on:
    mov x0, #0xf0
    msr {ICC_PMR}, x0
    msr {ICC_BPR1}, xzr
    msr {ICC_CTLR}, xzr
    mov x0, #1
    msr {ICC_IGRPEN1}, x0
    isb
    ret

irq:
    stp x0, x1, [sp, #-16]!
    stp x2, x3, [sp, #-16]!
    ldr x1, ={DATA:#x}
    mrs x0, {ICC_IAR1}
    mrs x2, mpidr_el1
    and x2, x2, #0xff
    cbnz x2, 6f
    mrs x3, {ICC_RPR}
    str x3, [x1, #8]
    mrs x3, {ICC_HPPIR1}
    str x3, [x1, #16]
    mov x3, #2                      // IMASK: the timer's line drops
    msr cntv_ctl_el0, x3
    str x0, [x1]
    b 7f
6:  str x0, [x1, #0x108]
7:  msr {ICC_EOIR1}, x0
    ldp x2, x3, [sp], #16
    ldp x0, x1, [sp], #16
    eret

sync:
    mrs x0, esr_el1
    bl hex
    b poweroff

{HEX}
    .ltorg

    .balign 2048
vectors:
    . = vectors + 0x200
    b sync
    . = vectors + 0x280
    b irq
    . = vectors + 0x800
"""

ARGV = ["-M", "virt,gic-version=3", "-cpu", "cortex-a57", "-smp", "2", "-m", "128",
        "-nographic", "-nodefaults", "-serial", "stdio", "-kernel"]


def run(argv: list[str]) -> list[int]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [int(line, 16) for line in r.stdout.split()]


def test_gicv3_guest_as_under_qemu(tmp_path, need):
    kernel = tmp_path / "gicv3.bin"
    kernel.write_bytes(assemble(tmp_path, GUEST))
    ours = run([sys.executable, "-m", "kemu", *ARGV, str(kernel)])
    # What the architecture says, whoever runs it.
    assert ours[0] == 1                 # ID_AA64PFR0_EL1.GIC: system registers
    assert ours[11] == 27               # the virtual timer's PPI
    assert ours[15:17] == [1, 2]        # CPU 1 took SGI 1, then SGI 2 (IRM)
    theirs = run([need("qemu-system-aarch64"), *ARGV, str(kernel)])
    assert ours == theirs


def test_gicv2_board_has_no_icc_registers(tmp_path, need):
    """With the default GICv2 an ICC register is UNDEFINED, and ID_AA64PFR0_EL1.GIC 0."""
    kernel = tmp_path / "gicv2.bin"
    kernel.write_bytes(assemble(tmp_path, GUEST))
    argv = ["-M", "virt", *ARGV[2:], str(kernel)]
    argv[argv.index("-smp") + 1] = "1"
    ours = run([sys.executable, "-m", "kemu", *argv])
    assert ours[0] == 0
    assert ours[1] >> 26 == 0           # ESR_EL1.EC: unknown reason (UNDEFINED)
    assert ours == run([need("qemu-system-aarch64"), *argv])
