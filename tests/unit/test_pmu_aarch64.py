"""The PMU (PMUv3) as QEMU's TCG runs it, compared with qemu-system-aarch64.

One bare-metal guest, assembled at test time, runs at EL1 under kemu and
under QEMU (the same file, the same command line) and prints over the
PL011 what is deterministic: PMCR_EL0.N, whether PMCCNTR_EL0 only ever went
up, the set/clear register pairs read back, SW_INCR counts, and which
interrupt (INTID) was taken with which overflow flags when an event counter
(SW_INCR) and the cycle counter (its 32-bit overflow, while the guest spins
and while it waits in WFI) overflow.  The two outputs must be equal.
"""

import pytest

from bare_metal import HEX, run_kemu, run_qemu
from test_tcg_aarch64 import assemble

GUEST = r"""
    .text
    .global _start
_start:
    adr x0, vectors
    msr vbar_el1, x0
    isb
    mov x26, #0                 // interrupts taken
    mov x25, #0                 // last INTID
    mov x27, #0                 // PMOVSCLR_EL0 seen by the handler

    // 1. PMCR_EL0.N
    mrs x0, pmcr_el0
    ubfx x0, x0, #11, #5
    bl hex

    // 2. PMCCNTR_EL0 only goes up (reads, loads, an exception in between)
    mov x0, #(1 | 4 | 64)       // E, C (reset), LC
    msr pmcr_el0, x0
    mov x0, #(1 << 31)
    msr pmcntenset_el0, x0
    isb
    mrs x20, pmccntr_el0
    mov x21, x20                // first
    mov x22, #0                 // went backwards
    mov x23, #3000
1:  mrs x1, pmccntr_el0
    cmp x1, x20
    cinc x22, x22, lo
    mov x20, x1
    adr x2, scratch
    ldr x3, [x2]
    add x3, x3, #1
    str x3, [x2]
    tst x23, #255
    b.ne 2f
    svc #0                      // an exception entry and return
2:  subs x23, x23, #1
    b.ne 1b
    mov x0, x22
    bl hex
    cmp x20, x21
    cset x0, hi                 // it did go up
    bl hex

    // 3. the set/clear pairs read back through their mask (1 << 31 | N bits)
    mov x0, #0xffffffff
    msr pmcntenset_el0, x0
    mrs x0, pmcntenset_el0
    bl hex
    mov x0, #0xffffffff
    msr pmcntenclr_el0, x0
    mrs x0, pmcntenclr_el0
    bl hex
    mov x0, #0xffffffff
    msr pmintenset_el1, x0
    mrs x0, pmintenset_el1
    bl hex
    mov x0, #0xffffffff
    msr pmintenclr_el1, x0
    mrs x0, pmintenclr_el1
    bl hex
    mov x0, #0xff
    msr pmuserenr_el0, x0
    mrs x0, pmuserenr_el0
    bl hex
    msr pmuserenr_el0, xzr

    // 4. SW_INCR: counter 0 and counter 5 count, counter 1 (disabled) does not
    msr pmevtyper0_el0, xzr
    msr pmevtyper1_el0, xzr
    msr pmevtyper5_el0, xzr
    msr pmevcntr0_el0, xzr
    msr pmevcntr1_el0, xzr
    msr pmevcntr5_el0, xzr
    mov x0, #(1 | 1 << 5)
    msr pmcntenset_el0, x0
    mov x1, #5
3:  mov x0, #(1 | 2 | 1 << 5)
    msr pmswinc_el0, x0
    subs x1, x1, #1
    b.ne 3b
    mrs x0, pmevcntr0_el0
    bl hex
    mrs x0, pmevcntr1_el0
    bl hex
    mrs x0, pmevcntr5_el0
    bl hex

    // 5. GICv2: distributor and CPU interface on, PPI 7 (INTID 23) enabled
    ldr x1, =0x08000000
    mov w0, #1
    str w0, [x1]                // GICD_CTLR
    mov w0, #(1 << 23)
    str w0, [x1, #0x100]        // GICD_ISENABLER0
    ldr x1, =0x08010000
    mov w0, #0xf0
    str w0, [x1, #4]            // GICC_PMR
    mov w0, #1
    str w0, [x1]                // GICC_CTLR
    msr daifclr, #2

    // 6. SW_INCR overflow raises the PMU interrupt
    mov x0, #0xffffffff
    msr pmevcntr0_el0, x0
    mov x0, #1
    msr pmintenset_el1, x0
    msr pmswinc_el0, x0
    ldr x1, =10000000
4:  cbnz x26, 5f
    subs x1, x1, #1
    b.ne 4b
5:  mov x0, x26
    bl hex
    mov x0, x25
    bl hex
    mov x0, x27
    bl hex
    mrs x0, pmevcntr0_el0
    and x0, x0, #0xffffffff     // -cpu max on QEMU has PMUv3p5: 64-bit, bit 32 set
    bl hex

    // 7. the 32-bit cycle counter overflows (in 2 ms) while the guest spins
    mov x0, #1
    msr pmintenclr_el1, x0
    mov x0, #(1 << 31)
    msr pmintenset_el1, x0
    msr pmcntenset_el0, x0
    mov x0, #1                  // E, LC = 0: overflow at 2^32
    msr pmcr_el0, x0
    mov x26, #0
    mov x27, #0
    ldr x0, =(0xffffffff - 2000000)
    msr pmccntr_el0, x0
    isb
    mrs x2, cntvct_el0
    mrs x3, cntfrq_el0          // give up after one second of counter time
    add x3, x2, x3
6:  cbnz x26, 7f
    mrs x2, cntvct_el0
    cmp x2, x3
    b.lo 6b
7:  mov x0, x26
    bl hex
    mov x0, x25
    bl hex
    mov x0, x27
    bl hex

    // 8. and while it waits in WFI
    mov x26, #0
    mov x27, #0
    ldr x0, =(0xffffffff - 2000000)
    msr pmccntr_el0, x0
    isb
    mov x1, #100
8:  wfi
    cbnz x26, 9f
    subs x1, x1, #1
    b.ne 8b
9:  mov x0, x26
    bl hex
    mov x0, x27
    bl hex

    ldr x0, =0x84000008         // PSCI SYSTEM_OFF
    hvc #0
    b .

irq:                            // acknowledge, note INTID and overflows, clear, EOI
    ldr x14, =0x08010000
    ldr w15, [x14, #0x0c]       // GICC_IAR
    and x25, x15, #0x3ff
    mrs x27, pmovsclr_el0
    msr pmovsclr_el0, x27
    isb
    str w15, [x14, #0x10]       // GICC_EOIR
    add x26, x26, #1
    eret

sync:                           // the SVC of part 2: return past it
    eret

""" + HEX + r"""
    .ltorg
    .balign 8
scratch:
    .quad 0

    .balign 2048
vectors:
    .skip 0x200
    b sync                      // current EL, SPx: synchronous
    .balign 0x80
    b irq                       // current EL, SPx: IRQ
    .balign 0x80
"""

# What both must print (QEMU 7.2, -cpu cortex-a57 and max; the lines in order).
EXPECTED = [
    6,                  # PMCR_EL0.N
    0, 1,               # PMCCNTR_EL0 never went back, and went up
    0x8000003F, 0,      # PMCNTENSET after setting all, PMCNTENCLR after clearing all
    0x8000003F, 0,      # PMINTENSET, PMINTENCLR
    0xF,                # PMUSERENR_EL0 (EN, SW, CR, ER)
    5, 0, 5,            # SW_INCR: counter 0, counter 1 (disabled), counter 5
    1, 23, 1, 0,        # SW_INCR overflow: one IRQ, INTID 23, PMOVS bit 0, counter wrapped
    1, 23, 1 << 31,     # cycle counter overflow while spinning: INTID 23, PMOVS bit 31
    1, 1 << 31,         # and while in WFI
]


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pmu")
    kernel = tmp / "pmu.bin"
    kernel.write_bytes(assemble(tmp, GUEST))
    return kernel


@pytest.mark.parametrize("cpu", ["cortex-a57", "max"])
def test_pmu_as_under_qemu(guest, need, cpu):
    qemu = need("qemu-system-aarch64")
    theirs = run_qemu(qemu, guest, cpu=cpu)
    ours = run_kemu(guest, cpu=cpu)
    assert theirs == EXPECTED, f"QEMU printed {[hex(v) for v in theirs]}"
    assert ours == theirs, f"kemu printed {[hex(v) for v in ours]}"
