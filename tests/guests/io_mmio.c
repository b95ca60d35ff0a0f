/*
 * Port I/O and MMIO round trips with the data checked on both sides: the
 * guest writes values, the host's test device checks them and answers reads
 * with a function of what was written last (the bitwise complement), which
 * the guest checks in turn.  Also string port I/O (rep outsb / rep insb) and
 * a write to a port bound to an ioeventfd (handled in the kernel, no exit).
 *
 *   0x510 (1/2/4 bytes): write v;  0x514: read ~v (same size)
 *   0x518: rep outsb "kemu";       0x519: rep insb 4 bytes (host sends 1 2 3 4)
 *   0x51c: ioeventfd
 *   MMIO 0xd0000000 (1/2/4/8 bytes): write v; 0xd0000008: read ~v
 */
#include "guest.h"

#define PIO_W 0x510
#define PIO_R 0x514
#define PIO_SOUT 0x518
#define PIO_SIN 0x519
#define PIO_EVENT 0x51c
#define MMIO_W 0xd0000000ul
#define MMIO_R 0xd0000008ul

int guest_main(const u8 *bp, u32 apic_id)
{
    int bad = 0;
    (void)bp; (void)apic_id;
    u32 v = 0x12345678;
    for (int i = 0; i < 8; i++, v = v * 1103515245u + 12345u) {
        outb(PIO_W, (u8)v);
        if (inb(PIO_R) != (u8)~v) bad |= 1;
        outw(PIO_W, (u16)v);
        if (inw(PIO_R) != (u16)~v) bad |= 2;
        outl(PIO_W, v);
        if (inl(PIO_R) != (u32)~v) bad |= 4;
    }
    static const char msg[4] = "kemu";
    const char *src = msg;
    u64 cnt = 4;
    __asm__ volatile("rep outsb" : "+S"(src), "+c"(cnt) : "d"((u16)PIO_SOUT) : "memory");
    u8 in[4] = {0, 0, 0, 0};
    u8 *dst = in;
    cnt = 4;
    __asm__ volatile("rep insb" : "+D"(dst), "+c"(cnt) : "d"((u16)PIO_SIN) : "memory");
    if (in[0] != 1 || in[1] != 2 || in[2] != 3 || in[3] != 4) bad |= 8;
    outl(PIO_EVENT, 0xfeed);

    u64 w = 0x0123456789abcdeful;
    for (int i = 0; i < 4; i++, w = w * 6364136223846793005ul + 1442695040888963407ul) {
        MMIO(u8, MMIO_W) = (u8)w;
        if (MMIO(u8, MMIO_R) != (u8)~w) bad |= 16;
        MMIO(u16, MMIO_W) = (u16)w;
        if (MMIO(u16, MMIO_R) != (u16)~w) bad |= 32;
        MMIO(u32, MMIO_W) = (u32)w;
        if (MMIO(u32, MMIO_R) != (u32)~w) bad |= 64;
        MMIO(u64, MMIO_W) = w;
        if (MMIO(u64, MMIO_R) != ~w) bad |= 128;
    }
    report("bad", bad);
    return bad;
}
