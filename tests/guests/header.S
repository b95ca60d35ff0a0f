/*
 * Setup header and entry points of the test guests' bzImage container.
 *
 * The header fields follow Documentation/x86/boot.rst ("The real-mode kernel
 * header"): boot protocol 2.15, LOADED_HIGH, XLF_KERNEL_64, not relocatable,
 * pref_address 1 MiB.  startup_64, the 64-bit entry, is at load address +
 * 0x200 ("64-bit Boot Protocol"): it gives each CPU its own stack (indexed by
 * the initial APIC id of CPUID leaf 1) and calls guest_main(boot_params,
 * apic_id) with the %rsi the loader passed; the value returned is written to
 * the exit port 0x501 (as QEMU's isa-debug-exit) and the CPU halts.
 */
#define EXIT_PORT 0x501

    .section .setup, "a"
    .org 0x1f1
setup_sects:        .byte 1
root_flags:         .word 0
syssize:            .long _syssize
ram_size:           .word 0
vid_mode:           .word 0
root_dev:           .word 0
boot_flag:          .word 0xAA55
jump:               .byte 0xeb, hdr_end - header
header:             .ascii "HdrS"
version:            .word 0x020f
realmode_swtch:     .long 0
start_sys_seg:      .word 0x1000
kernel_version:     .word 0
type_of_loader:     .byte 0
loadflags:          .byte 0x01          /* LOADED_HIGH */
setup_move_size:    .word 0x8000
code32_start:       .long 0x100000
ramdisk_image:      .long 0
ramdisk_size:       .long 0
bootsect_kludge:    .long 0
heap_end_ptr:       .word 0
ext_loader_ver:     .byte 0
ext_loader_type:    .byte 0
cmd_line_ptr:       .long 0
initrd_addr_max:    .long 0x7fffffff
kernel_alignment:   .long 0x200000
relocatable_kernel: .byte 0
min_alignment:      .byte 21
xloadflags:         .word 0x0001        /* XLF_KERNEL_64 */
cmdline_size:       .long 255
hardware_subarch:   .long 0
hardware_subarch_data: .quad 0
payload_offset:     .long 0
payload_length:     .long 0
setup_data:         .quad 0
pref_address:       .quad 0x100000
init_size:          .long _init_size
handover_offset:    .long 0
kernel_info_offset: .long 0
hdr_end:
    .org 0x400

    .section .text.head, "ax"
    .code32
    .globl startup_32
startup_32:                     /* the 32-bit entry: not used by these guests */
    cli
1:  hlt
    jmp 1b

    .org 0x200
    .code64
    .globl startup_64
startup_64:
    cli
    mov %rsi, %r12
    mov $1, %eax
    xor %ecx, %ecx
    cpuid
    shr $24, %ebx
    and $7, %ebx
    mov %ebx, %eax
    inc %eax
    shl $12, %eax
    lea stacks(%rax), %rsp
    mov %r12, %rdi
    mov %ebx, %esi
    call guest_main
    mov $EXIT_PORT, %dx
    outb %al, %dx
2:  cli
    hlt
    jmp 2b
