/*
 * The exit-cost benchmark guest: a flat real-mode binary loaded at 0x1000 and
 * started with %ecx = N.  Each round trip is one `out` to port 0x520 and one
 * `in` from port 0x521 (two exits to the VMM); then it writes %al to port
 * 0x501 (the exit port) and halts.
 */
    .code16
    .text
    .globl _start
_start:
    xor %eax, %eax
1:  mov $0x520, %dx
    outb %al, %dx
    inc %dx
    inb %dx, %al
    dec %ecx
    jnz 1b
    mov $0x501, %dx
    outb %al, %dx
2:  hlt
    jmp 2b
