/*
 * A PVH guest (Xen docs/misc/pvh.pandoc): an ELF64 file whose
 * XEN_ELFNOTE_PHYS32_ENTRY note (owner "Xen", type 18) names the 32-bit
 * entry point.  Entered in flat 32-bit protected mode with paging off and
 * %ebx = address of struct hvm_start_info, it reports on port 0x540 (32-bit
 * writes): %ebx, magic, version, nr_modules, modlist_paddr, cmdline_paddr,
 * memmap_paddr, memmap_entries, first module paddr and size, %cr0; then
 * prints the command line on COM1 and writes 0 to the exit port 0x501.
 */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                     /* namesz: "Xen\0" */
    .long 4                     /* descsz */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start

    .text
    .code32
    .globl pvh_start
pvh_start:
    mov $0x540, %dx
    mov %ebx, %eax
    outl %eax, %dx
    mov 0(%ebx), %eax           /* magic */
    outl %eax, %dx
    mov 4(%ebx), %eax           /* version */
    outl %eax, %dx
    mov 12(%ebx), %eax          /* nr_modules */
    outl %eax, %dx
    mov 16(%ebx), %eax          /* modlist_paddr */
    outl %eax, %dx
    mov 24(%ebx), %eax          /* cmdline_paddr */
    outl %eax, %dx
    mov 40(%ebx), %eax          /* memmap_paddr */
    outl %eax, %dx
    mov 48(%ebx), %eax          /* memmap_entries */
    outl %eax, %dx
    mov 16(%ebx), %esi
    mov 0(%esi), %eax           /* modlist[0].paddr */
    outl %eax, %dx
    mov 8(%esi), %eax           /* modlist[0].size */
    outl %eax, %dx
    mov %cr0, %eax
    outl %eax, %dx

    mov 24(%ebx), %esi
    mov $0x3f8, %dx
1:  movb (%esi), %al
    test %al, %al
    jz 2f
    outb %al, %dx
    inc %esi
    jmp 1b
2:  mov $0x501, %dx
    xor %eax, %eax
    outb %al, %dx
3:  cli
    hlt
    jmp 3b
