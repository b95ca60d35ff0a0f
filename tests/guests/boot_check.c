/*
 * Checks what the Linux/x86 64-bit boot protocol (Documentation/x86/boot.rst)
 * promises a kernel entered at startup_64, and reports it line by line on
 * COM1 for the test to compare with what the loader did:
 *
 *   rsi, boot_flag, magic, version, loader, loadflags, cmdline_ptr, cmdline,
 *   ramdisk_image, ramdisk_size, initrd_sum, e820_entries, e820 (one per entry),
 *   cr0, cr3, cr4, efer, rflags, cs, ds, ss, pml4e, map_ok
 *
 * and exits with 0 when its own checks passed (1 otherwise).
 */
#include "guest.h"

#define X86_CR0_PE (1ul << 0)
#define X86_CR0_PG (1ul << 31)
#define X86_CR4_PAE (1ul << 5)
#define EFER_LME (1ul << 8)
#define EFER_LMA (1ul << 10)
#define MSR_EFER 0xc0000080

int guest_main(const u8 *bp, u32 apic_id)
{
    int bad = 0;
    (void)apic_id;
    report("rsi", (u64)bp);
    report("boot_flag", rd16(bp + 0x1fe));
    report("magic", rd32(bp + 0x202));
    report("version", rd16(bp + 0x206));
    report("loader", bp[0x210]);
    report("loadflags", bp[0x211]);
    if (rd16(bp + 0x1fe) != 0xaa55 || rd32(bp + 0x202) != 0x53726448 || bp[0x210] != 0xff)
        bad = 1;

    u64 cmdline = rd32(bp + 0x228) | ((u64)rd32(bp + 0xc8) << 32);
    report("cmdline_ptr", cmdline);
    put_str("cmdline ");
    put_str((const char *)cmdline);
    put_char('\n');

    u64 initrd = rd32(bp + 0x218) | ((u64)rd32(bp + 0xc0) << 32);
    u64 initrd_size = rd32(bp + 0x21c) | ((u64)rd32(bp + 0xc4) << 32);
    report("ramdisk_image", initrd);
    report("ramdisk_size", initrd_size);
    u32 sum = 0;                       /* a Fletcher-like checksum of the initrd */
    for (u64 i = 0; i < initrd_size; i++)
        sum = sum * 31 + ((const u8 *)initrd)[i];
    report("initrd_sum", sum);
    if (initrd % 4096 || initrd + initrd_size > rd32(bp + 0x22c) + 1ul)
        bad = 1;

    u32 n = bp[0x1e8];
    report("e820_entries", n);
    for (u32 i = 0; i < n && i < 128; i++) {
        const u8 *e = bp + 0x2d0 + 20 * i;
        put_str("e820 ");
        put_hex(rd64(e));
        put_char(' ');
        put_hex(rd64(e + 8));
        put_char(' ');
        put_hex(rd32(e + 16));
        put_char('\n');
    }

    u64 cr0 = READ_CR(0), cr3 = READ_CR(3), cr4 = READ_CR(4), efer = rdmsr(MSR_EFER);
    report("cr0", cr0);
    report("cr3", cr3);
    report("cr4", cr4);
    report("efer", efer);
    report("rflags", read_rflags());
    report("cs", read_cs());
    report("ds", read_ds());
    report("ss", read_ss());
    if (!(cr0 & X86_CR0_PE) || !(cr0 & X86_CR0_PG) || !(cr4 & X86_CR4_PAE) ||
        !(efer & EFER_LME) || !(efer & EFER_LMA) || (read_rflags() & (1 << 9)))
        bad = 1;

    /* The page tables identity-map low memory: walk them for the zero page. */
    const u64 *pml4 = (const u64 *)(cr3 & ~0xffful);
    report("pml4e", pml4[0]);
    const u64 *pdpt = (const u64 *)(pml4[0] & ~0xffful);
    const u64 *pd = (const u64 *)(pdpt[0] & ~0xffful);
    u64 pde = pd[((u64)bp >> 21) & 511];
    int map_ok = (pde & 0x81) == 0x81 && (pde & ~0x1ffffful & 0xffffffffff) == ((u64)bp & ~0x1ffffful);
    report("map_ok", map_ok);
    if (!map_ok)
        bad = 1;
    put_str(bad ? "FAIL\n" : "OK\n");
    return bad;
}
