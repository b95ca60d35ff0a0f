/*
 * perf_probe: a static aarch64 Linux program (no libc) that counts two
 * hardware events of its own run through perf_event_open(2) and prints
 *     cycles <16 hex digits>
 *     instructions <16 hex digits>
 * each the count read back, or the negative errno perf_event_open gave
 * (as a 64-bit two's complement), then exits 0.  Built with binutils only.
 */
    .text
    .global _start
_start:
    mov x0, #0                  // PERF_COUNT_HW_CPU_CYCLES
    bl measure
    mov x21, x0
    mov x0, #1                  // PERF_COUNT_HW_INSTRUCTIONS
    bl measure
    mov x22, x0
    adr x0, cycles
    mov x1, #6
    mov x2, x21
    bl line
    adr x0, instructions
    mov x1, #12
    mov x2, x22
    bl line
    mov x0, #0
    mov x8, #93                 // exit
    svc #0

// x0 = config: a counter of this process's event, opened, 20M loop
// iterations, read; returns the count or -errno.
measure:
    adr x9, attr
    str x0, [x9, #8]            // perf_event_attr.config
    mov x0, x9
    mov x1, #0                  // pid: this process
    mov x2, #-1                 // any CPU
    mov x3, #-1                 // no group
    mov x4, #0
    mov x8, #241                // perf_event_open
    svc #0
    cmp x0, #0
    b.lt 9f
    mov x10, x0
    ldr x11, =20000000
1:  subs x11, x11, #1
    b.ne 1b
    mov x0, x10
    adr x1, value
    mov x2, #8
    mov x8, #63                 // read
    svc #0
    cmp x0, #8
    b.ne 9f                     // a short read: report what read returned
    adr x1, value
    ldr x0, [x1]
9:  ret

// x0 = label, x1 = its length, x2 = value: "label <hex>\n" on stdout
line:
    mov x12, x2
    mov x13, x30
    mov x2, x1
    mov x1, x0
    mov x0, #1
    mov x8, #64                 // write
    svc #0
    adr x1, buf
    mov w3, #' '
    strb w3, [x1]
    mov x4, #60
    mov x5, #1
2:  lsr x3, x12, x4
    and x3, x3, #15
    cmp x3, #10
    add x6, x3, #'0'
    add x7, x3, #('a' - 10)
    csel x3, x6, x7, lt
    strb w3, [x1, x5]
    add x5, x5, #1
    subs x4, x4, #4
    b.ge 2b
    mov w3, #10
    strb w3, [x1, x5]
    mov x0, #1
    mov x2, #18
    mov x8, #64
    svc #0
    mov x30, x13
    ret

cycles:       .ascii "cycles"
instructions: .ascii "instructions"
    .ltorg
    .data
    .balign 8
attr:                           // struct perf_event_attr, PERF_ATTR_SIZE_VER5
    .word 0                     // type: PERF_TYPE_HARDWARE
    .word 112                   // size
    .quad 0                     // config
    .fill 96, 1, 0              // period, sample_type, read_format, flags (all 0), ...
value: .quad 0
buf:   .fill 32, 1, 0
