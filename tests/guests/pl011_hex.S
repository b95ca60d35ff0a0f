// hex: x0 as 16 hex digits and a newline on the virt board's PL011 at
// 0x09000000 (clobbers x1-x5).  Included by the bare-metal AArch64 guests.
hex:
    ldr x1, =0x09000000
    mov x2, #60
1:  lsr x3, x0, x2
    and x3, x3, #15
    cmp x3, #10
    add x4, x3, #'0'
    add x5, x3, #('a' - 10)
    csel x3, x4, x5, lt
    str w3, [x1]
    subs x2, x2, #4
    b.ge 1b
    mov x3, #10
    str w3, [x1]
    ret
