// A bare-metal AArch64 guest for the virt board, loaded as a raw binary at
// the start of RAM (0x40000000) and entered at EL1h: it installs a vector
// table, provokes the exceptions of one scenario (chosen at assembly time
// with --defsym SCENARIO=n) and prints over the PL011, one hex number a
// line:
//
//   a scenario tag (0x5ce0000 + n), the load address, and marks along the
//   way (0x11110000 + k),
//   for every synchronous exception: ESR_EL1, FAR_EL1, ELR_EL1,
//   for software step: the number of step exceptions at the end,
//
// then powers off with PSCI SYSTEM_OFF (HVC).  FAR_EL1 is zeroed before each
// exception so that an exception that leaves it UNKNOWN (and QEMU alone)
// shows 0.  The same binary runs under kemu and qemu-system-aarch64.
//
// Register use: x28 = where the handler resumes after an exception that is
// not a software step; x26 = end of the stepped code; x27 = step count;
// x0-x5, x9-x12, x30 are clobbered by the handler: scenarios keep their
// addresses in x6 and up.

    .equ UART, 0x09000000
    .equ HOLE, 0x09100000          // no device on QEMU's virt nor on kemu's
    .equ ABOVE_RAM, 0x50000000     // -m 128: RAM ends at 0x48000000
    .equ MARK, 0x11110000

    .macro print_imm val
    ldr x0, =\val
    bl hex
    .endm

    .macro resume_at label
    adr x28, \label
    .endm

    .macro alias reg, label, base   // \label in the RAM alias at \base
    adr \reg, \label
    and \reg, \reg, #0x3fffffff
    orr \reg, \reg, #\base
    .endm

    .macro call_bp                  // bp_fn; the handler or its ret resumes here
    adr x28, 9f
    bl bp_fn
9:
    .endm

    .text
    .global _start
_start:
load_base:                          // (adr to a global symbol needs a linker)
    adr x1, vectors
    msr vbar_el1, x1
    msr far_el1, xzr
    mov x27, #0
    isb
    print_imm (0x5ce0000 + SCENARIO)
    adr x0, load_base               // where the guest was loaded
    bl hex
    bl scenario
    ldr x0, =0x84000008             // PSCI SYSTEM_OFF
    hvc #0
    b .

    .include "pl011_hex.S"

// Synchronous exception from the current EL with SP_EL1
sync:
    mrs x9, esr_el1
    mrs x10, far_el1
    mrs x11, elr_el1
    mov x0, x9
    bl hex
    mov x0, x10
    bl hex
    mov x0, x11
    bl hex
    msr far_el1, xzr
    lsr x12, x9, #26
    cmp x12, #0x33                  // software step, same EL
    b.eq step
    msr elr_el1, x28
    isb
    eret
step:
    add x27, x27, #1
    cmp x27, #64                    // a runaway: stop stepping
    b.hs 2f
    cmp x11, x26
    b.hs 2f
    mrs x12, spsr_el1               // step the next instruction too
    orr x12, x12, #(1 << 21)
    msr spsr_el1, x12
    eret
2:  mrs x12, mdscr_el1              // done: MDSCR_EL1.SS off
    bic x12, x12, #1
    msr mdscr_el1, x12
    isb
    eret

unexpected:                         // any other vector: say which, power off
    mov x0, x30
    bl hex
    mrs x0, esr_el1
    bl hex
    ldr x0, =0x84000008
    hvc #0
    b .

    .ltorg

// Debug exceptions on at EL1: OS lock clear, MDSCR_EL1.MDE and KDE, PSTATE.D clear.
debug_on:
    msr oslar_el1, xzr
    mov x1, #((1 << 15) | (1 << 13))
    msr mdscr_el1, x1
    msr daifclr, #8
    isb
    ret

// An identity map of the first 4 GiB in 1 GiB blocks plus aliases of RAM,
// then the MMU on (x20 = return address).
//   VA 0x0_0000_0000  device        VA 0x0_4000_0000  RAM, normal
//   VA 0x0_8000_0000  RAM read-only VA 0x0_c000_0000  RAM, PXN
//   VA 0x1_0000_0000  invalid       VA 0x1_4000_0000  RAM, AF clear
//   VA 0x1_8000_0000  RAM as device VA 0x1_c000_0000  PA 0xc000_0000 (nothing)
    .equ BLOCK, 0x1 | (1 << 10)               // block, AF
    .equ NORMAL, BLOCK | (1 << 2) | (3 << 8)  // AttrIndx 1, inner shareable
    .equ DEVICE, BLOCK | (1 << 53) | (1 << 54)
mmu_on:
    mov x20, x30
    adr x1, tables
    ldr x2, =(0x00000000 | DEVICE)
    str x2, [x1, #0]
    ldr x2, =(0x40000000 | NORMAL)
    str x2, [x1, #8]
    ldr x2, =(0x40000000 | NORMAL | (2 << 6))
    str x2, [x1, #16]
    ldr x2, =(0x40000000 | NORMAL | (1 << 53))
    str x2, [x1, #24]
    str xzr, [x1, #32]
    ldr x2, =(0x40000000 | (NORMAL & ~(1 << 10)))
    str x2, [x1, #40]
    ldr x2, =(0x40000000 | DEVICE)
    str x2, [x1, #48]
    ldr x2, =(0xc0000000 | NORMAL)
    str x2, [x1, #56]
    dsb sy
    ldr x2, =0xff00                 // Attr0 Device-nGnRnE, Attr1 Normal WB
    msr mair_el1, x2
    // T0SZ 25 (start at level 1), WBWA inner/outer, inner shareable, 4K,
    // EPD1, IPS 36 bits
    ldr x2, =(25 | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 23) | (1 << 32))
    msr tcr_el1, x2
    msr ttbr0_el1, x1
    isb
    tlbi vmalle1
    dsb sy
    mrs x2, sctlr_el1
    orr x2, x2, #1                  // M
    orr x2, x2, #(1 << 2)           // C
    orr x2, x2, #(1 << 12)          // I
    msr sctlr_el1, x2
    isb
    ret x20

    .ltorg

scenario:
    mov x21, x30

.if SCENARIO == 1       // data and instruction accesses with nothing behind them
    ldr x6, =HOLE
    resume_at 1f
    ldr x2, [x6]                    // read, 64-bit
1:  resume_at 1f
    ldrb w2, [x6, #3]               // read, 8-bit
1:  resume_at 1f
    str w2, [x6, #8]                // write
1:  ldr x6, =ABOVE_RAM
    resume_at 1f
    ldr w2, [x6, #0x10]             // outside every MMIO window and RAM
1:  resume_at 1f
    stp x2, x3, [x6, #0x20]
1:  resume_at 1f
    ldr x6, =HOLE + 0x40
    br x6                           // instruction fetch, MMIO window hole
1:  resume_at 1f
    ldr x6, =ABOVE_RAM + 0x80
    blr x6                          // instruction fetch, nothing mapped
1:  print_imm MARK
.endif

.if SCENARIO == 2       // device registers QEMU's devices leave unassigned
    ldr x6, =UART
    ldr w0, [x6, #0x100]            // PL011: no register there
    bl hex
    str w0, [x6, #0x100]
    ldr w0, [x6, #0xfe0]            // PL011 PeriphID0
    bl hex
    ldr w0, [x6, #0xff0]            // PL011 PCellID0
    bl hex
    ldr x6, =0x09010000             // PL031 RTC
    ldr w0, [x6, #0x40]
    bl hex
    ldr w0, [x6, #0xfe0]
    bl hex
    ldr x6, =0x08000000             // GIC distributor
    resume_at 1f
    ldr w0, [x6, #0x1000]           // past QEMU's 4 KiB distributor
    bl hex
1:  ldr x6, =0x08010000             // GIC CPU interface
    resume_at 1f
    ldr w0, [x6, #0x2000]           // past its 8 KiB
    bl hex
1:  print_imm MARK
.endif

.if SCENARIO == 3       // alignment: SCTLR_EL1.A, exclusives, Device memory (MMU off)
    adr x6, data
    resume_at 1f
s3_device:
    ldr w0, [x6, #1]                // MMU off: Device-nGnRnE, unaligned
    bl hex
1:  mrs x1, sctlr_el1
    orr x1, x1, #2                  // A
    msr sctlr_el1, x1
    isb
    resume_at 1f
    ldr x0, [x6, #4]                // A set: alignment fault
    bl hex
1:  resume_at 1f
    strh w0, [x6, #3]
1:  mrs x1, sctlr_el1
    bic x1, x1, #2
    msr sctlr_el1, x1
    isb
    resume_at 1f
    add x7, x6, #4
    ldxr x0, [x7]                   // exclusive, unaligned: always a fault
1:  resume_at 1f
    add x7, x6, #2
    ldaxr w0, [x7]
1:  print_imm MARK
.endif

.if SCENARIO == 4       // MMU on: permission, translation, access flag, alignment
    bl mmu_on
    print_imm MARK
    alias x6, data, 0x80000000      // data through the read-only alias
    ldr x0, [x6]                    // reading is allowed
    bl hex
    resume_at 1f
    str x0, [x6]                    // permission fault, write
1:  alias x6, pxn_code, 0xc0000000
    resume_at 1f
    blr x6                          // PXN: instruction permission fault
1:  mov x6, #0
    resume_at 1f
    blr x6                          // PXN at address 0 (a null pointer call)
1:  ldr x6, =0x100000000
    resume_at 1f
    ldr x0, [x6, #0x18]             // translation fault, level 1
1:  resume_at 1f
    blr x6
1:  ldr x6, =0x140000000
    resume_at 1f
    ldr x0, [x6, #0x28]             // access flag fault, level 1
1:  adr x6, data
    ldr w0, [x6, #1]                // normal memory, unaligned, A clear: fine
    bl hex
    ldr x6, =0x1c0000000
    resume_at 1f
    ldr x0, [x6, #0x38]             // external abort with the MMU on: FAR is the VA
1:  resume_at 1f
    blr x6
1:  alias x6, data, 0x180000000
    resume_at 1f
s4_device:
    ldr w0, [x6, #1]                // Device memory, unaligned
    bl hex
1:  mrs x1, sctlr_el1               // MMU off again
    bic x1, x1, #1
    msr sctlr_el1, x1
    isb
    print_imm MARK
.endif

.if SCENARIO == 5       // BRK and hardware breakpoints
    resume_at 1f
s5_brk1:
    brk #0x1234                     // debug exceptions disabled: BRK still
1:  bl debug_on
    resume_at 1f
s5_brk2:
    brk #0
1:  adr x1, bp_fn
    msr dbgbvr0_el1, x1
    mov x1, #((0xf << 5) | (3 << 1) | 1)  // BAS, PMC EL1+EL0, E
    msr dbgbcr0_el1, x1
    isb
    call_bp                         // fires
    print_imm MARK + 1
    mrs x1, mdscr_el1               // KDE clear: no debug exception at EL1
    bic x1, x1, #(1 << 13)
    msr mdscr_el1, x1
    isb
    call_bp
    print_imm MARK + 2
    bl debug_on                     // PSTATE.D set: none either
    msr daifset, #8
    isb
    call_bp
    print_imm MARK + 3
    bl debug_on                     // MDSCR_EL1.MDE clear: none
    mov x1, #(1 << 13)
    msr mdscr_el1, x1
    isb
    call_bp
    print_imm MARK + 4
    bl debug_on                     // the OS lock set
    mov x1, #1
    msr oslar_el1, x1
    isb
    mrs x0, oslsr_el1
    bl hex
    call_bp
    print_imm MARK + 5
    bl debug_on                     // everything on again: it fires
    call_bp
    print_imm MARK + 6
    msr dbgbcr0_el1, xzr
    isb
    call_bp                         // disabled
    print_imm MARK + 7
.endif

.if SCENARIO == 6       // watchpoints (MMU on: RAM is Normal memory)
    bl mmu_on
    bl debug_on
    adr x6, data
    msr dbgwvr0_el1, x6
    ldr x1, =((0xff << 5) | (3 << 3) | (3 << 1) | 1)  // 8 bytes, load+store, EL1+EL0, E
    msr dbgwcr0_el1, x1
    isb
    resume_at 1f
    ldr w0, [x6, #4]                // load: WnR 0
1:  resume_at 1f
    strb w0, [x6, #7]               // store: WnR 1
1:  resume_at 1f
    ldr x0, [x6, #-4]               // straddles the start
1:  resume_at 1f
    ldp x0, x1, [x6, #-8]
1:  ldr x0, [x6, #8]                // outside: nothing
    print_imm MARK + 1
    ldr x1, =((0xf0 << 5) | (2 << 3) | (3 << 1) | 1)  // bytes 4-7, store only
    msr dbgwcr0_el1, x1
    isb
    ldr w0, [x6, #4]                // a load: nothing
    str w0, [x6]                    // bytes 0-3: nothing
    resume_at 1f
    str x0, [x6]                    // bytes 0-7 cover 4-7
1:  print_imm MARK + 2
    msr daifset, #8                 // PSTATE.D: nothing
    isb
    str x0, [x6]
    msr daifclr, #8
    print_imm MARK + 3
    msr dbgwcr0_el1, xzr
    isb
    str x0, [x6]
    print_imm MARK + 4
.endif

.if SCENARIO == 7       // software step
    bl debug_on
    msr daifset, #8                 // not stepping until the ERET
    mrs x1, mdscr_el1
    orr x1, x1, #1                  // SS
    msr mdscr_el1, x1
    adr x26, step_end
    adr x1, step_start
    msr elr_el1, x1
    ldr x1, =(0x5 | (0x7 << 6) | (1 << 21))   // EL1h, A/I/F masked, D clear, SS
    msr spsr_el1, x1
    adr x15, data
    isb
    eret
step_start:
    mov x13, #1
    add x13, x13, #1
    ldxr x14, [x15]                   // a load exclusive: EX set
    stxr w7, x14, [x15]
    b 1f
    nop
1:  ldr w14, [x15]
step_end:
    mov x0, x27
    bl hex
    print_imm MARK + 1
    // SPSR.SS clear: the step exception comes before any instruction runs
    msr daifset, #8
    mrs x1, mdscr_el1
    orr x1, x1, #1
    msr mdscr_el1, x1
    mov x27, #0
    adr x26, step_end2
    adr x1, step_start2
    msr elr_el1, x1
    ldr x1, =(0x5 | (0x7 << 6))
    msr spsr_el1, x1
    isb
    eret
step_start2:
    nop
    nop
step_end2:
    mov x0, x27
    bl hex
    print_imm MARK + 2
.endif

    ret x21

bp_fn:                              // DBGBVR0_EL1 points here
    ret

pxn_code:
    ret

    .ltorg
    .balign 16
    .quad 0x1111111111111111
data:
    .quad 0x8877665544332211
    .quad 0x2222222222222222

    .balign 2048
vectors:
    .irp n, 0, 1, 2, 3
    .balign 0x80
    bl unexpected
    .endr
    .balign 0x80
    b sync                          // current EL with SP_ELx: synchronous
    .irp n, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
    .balign 0x80
    bl unexpected
    .endr

    .balign 4096
tables:
    .skip 4096
