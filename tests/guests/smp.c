/*
 * Every vCPU enters startup_64 and reports its identity three ways: CPUID
 * leaf 1 EBX[31:24], CPUID leaf 0xB EDX (x2APIC id) and the local APIC ID
 * register (xAPIC MMIO at 0xfee00020, bits 31:24), as one 32-bit write to
 * port 0x520: lapic << 16 | x2apic << 8 | cpuid1.  Leaf 1 EBX[23:16] (the
 * logical processor count) goes to port 0x524.
 */
#include "guest.h"

int guest_main(const u8 *bp, u32 apic_id)
{
    u32 a, b, c, d;
    (void)bp;
    cpuid(0xb, 0, &a, &b, &c, &d);
    u32 x2apic = d;
    cpuid(1, 0, &a, &b, &c, &d);
    u32 lapic = MMIO(u32, 0xfee00020ul) >> 24;
    outl(0x524, (b >> 16) & 0xff);
    outl(0x520, (lapic & 0xff) << 16 | (x2apic & 0xff) << 8 | (apic_id & 0xff));
    return 0;
}
