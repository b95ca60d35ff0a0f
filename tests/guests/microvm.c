/*
 * A test guest for kemu's x86-64 microvm board (kemu.machines.x86_microvm),
 * booted through the board as a bzImage.  It looks at the machine the way
 * Linux does and reports "key value" lines on COM1:
 *
 *   cmdline   the kernel command line (with the virtio_mmio.device= slots)
 *   lsr/iir   the 16550's line status, and IIR after enabling the FIFOs
 *   scr       the scratch register written and read back
 *   rtc_*     the CMOS clock (BCD): seconds, minutes, hours, day, month, year
 *   mp_cpus   processors in the MP table (found as Linux's mpparse finds it),
 *   mp_apic   their local APIC ids, mp_ioapic the I/O APIC address
 *   thre_iir  IIR in the handler of the UART's THRE interrupt, which reached
 *             the CPU through KVM's I/O APIC (pin 4 -> vector 0x30, the PIC masked)
 *   rx        a line the host typed, read by the UART's receive interrupt
 *             (with "kemu.dirty" the guest keeps writing 1 MiB at 4 MiB while
 *             it waits, and reports dirty_writes, the number of stores)
 *
 * With "kemu.smp" on the command line it then starts the other processors of
 * the MP table with INIT/SIPI/SIPI (a real-mode trampoline at 0x8000 that
 * switches to long mode with the VMM's GDT and page tables), and each
 * reports "cpu lapic<<16|x2apic<<8|cpuid1".  Finally it resets the machine
 * through the i8042 (command 0xFE on port 0x64).
 */
#include "guest.h"

#define LAPIC 0xfee00000ul
#define LAPIC_ID 0x20
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define IOAPIC 0xfec00000ul
#define VECTOR_COM1 0x30
#define TRAMPOLINE 0x8000ul

static struct idt_gate idt[64] __attribute__((aligned(16)));
static volatile u32 irq_count, thre_iir, rx_len, rx_done;
static volatile char rx_buf[64];
static volatile u32 arrived;
static volatile u32 ap_report[8];

static void lapic_write(u32 reg, u32 v) { MMIO(u32, LAPIC + reg) = v; }
static u32 lapic_read(u32 reg) { return MMIO(u32, LAPIC + reg); }

static void ioapic_write(u32 reg, u32 v)
{
    MMIO(u32, IOAPIC) = reg;
    MMIO(u32, IOAPIC + 0x10) = v;
}

__attribute__((interrupt)) static void com1_handler(struct interrupt_frame *f)
{
    (void)f;
    u8 iir;
    while (!((iir = inb(COM1 + 2)) & 1)) {
        if ((iir & 0x0e) == 0x02) {             /* THRE: note it, stop asking */
            thre_iir = iir;
            outb(COM1 + 1, inb(COM1 + 1) & ~0x02);
        } else if ((iir & 0x0e) == 0x04 || (iir & 0x0e) == 0x0c) {
            while (inb(COM1 + 5) & 1) {         /* LSR.DR */
                char c = (char)inb(COM1);
                if (c == '\n' || c == '\r') {
                    rx_done = 1;
                } else if (rx_len < sizeof(rx_buf) - 1) {
                    rx_buf[rx_len++] = c;
                }
            }
        } else {
            inb(COM1 + 5);
            inb(COM1 + 6);
        }
    }
    irq_count++;
    lapic_write(LAPIC_EOI, 0);
}

__attribute__((interrupt)) static void unexpected(struct interrupt_frame *f)
{
    (void)f;
    put_str("unexpected interrupt\n");
    for (;;) __asm__ volatile("cli; hlt");
}

static void set_gate(int vec, void (*handler)(struct interrupt_frame *))
{
    u64 a = (u64)handler;
    idt[vec] = (struct idt_gate){(u16)a, read_cs(), 0, 0x8e, (u16)(a >> 16), (u32)(a >> 32), 0};
}

static int contains(const char *s, const char *w)
{
    for (; *s; s++) {
        const char *p = s, *q = w;
        while (*q && *p == *q) { p++; q++; }
        if (!*q)
            return 1;
    }
    return 0;
}

static u8 cmos(u8 reg)
{
    outb(0x70, reg);
    return inb(0x71);
}

static const u8 *find_mpf(void)
{
    for (u64 a = 0xf0000; a < 0x100000; a += 16) {
        const u8 *p = (const u8 *)a;
        if (p[0] == '_' && p[1] == 'M' && p[2] == 'P' && p[3] == '_') {
            u8 sum = 0;
            for (int i = 0; i < 16; i++)
                sum += p[i];
            if (!sum)
                return p;
        }
    }
    return 0;
}

/* The AP start-up code, copied to TRAMPOLINE: real mode -> protected mode -> long mode. */
extern char tramp_start[], tramp_end[];
__asm__(
    ".pushsection .data\n"
    ".code16\n"
    "tramp_start:\n"
    "  cli\n"
    "  xor %ax, %ax\n"
    "  mov %ax, %ds\n"
    "  lgdtl 0x8000 + (tramp_gdtr - tramp_start)\n"
    "  mov %cr0, %eax\n"
    "  or $1, %eax\n"
    "  mov %eax, %cr0\n"
    "  ljmpl $0x28, $(0x8000 + tramp_32 - tramp_start)\n"
    ".code32\n"
    "tramp_32:\n"
    "  mov $0x18, %ax\n"
    "  mov %ax, %ds\n"
    "  mov %ax, %es\n"
    "  mov %ax, %ss\n"
    "  mov $0x9000, %eax\n"
    "  mov %eax, %cr3\n"
    "  mov %cr4, %eax\n"
    "  or $0x20, %eax\n"
    "  mov %eax, %cr4\n"
    "  mov $0xc0000080, %ecx\n"
    "  rdmsr\n"
    "  or $0x100, %eax\n"
    "  wrmsr\n"
    "  mov %cr0, %eax\n"
    "  or $0x80000000, %eax\n"
    "  mov %eax, %cr0\n"
    "  ljmp $0x10, $(0x8000 + tramp_64 - tramp_start)\n"
    ".code64\n"
    "tramp_64:\n"
    "  movabs $startup_64, %rax\n"
    "  jmp *%rax\n"
    ".balign 8\n"
    "tramp_gdtr: .word 0x2f\n"
    "  .long 0x500\n"
    "tramp_end:\n"
    ".popsection\n");

static u32 ids(u32 apic_id)
{
    u32 a, b, c, d;
    cpuid(0xb, 0, &a, &b, &c, &d);
    u32 x2apic = d;
    u32 lapic = lapic_read(LAPIC_ID) >> 24;
    return (lapic & 0xff) << 16 | (x2apic & 0xff) << 8 | (apic_id & 0xff);
}

static void reset_machine(void)
{
    while (inb(0x64) & 0x02)
        ;
    outb(0x64, 0xfe);
    for (;;) __asm__ volatile("cli; hlt");
}

int guest_main(const u8 *bp, u32 apic_id)
{
    if (apic_id != 0) {                         /* an AP, out of the trampoline */
        ap_report[apic_id & 7] = ids(apic_id);
        __atomic_fetch_add(&arrived, 1, __ATOMIC_SEQ_CST);
        for (;;) __asm__ volatile("cli; hlt");
    }
    irq_count = thre_iir = rx_len = rx_done = arrived = 0;
    for (int i = 0; i < 8; i++)
        ap_report[i] = 0;

    const char *cmdline = (const char *)(u64)(rd32(bp + 0x228));
    put_str("cmdline ");
    put_str(cmdline);
    put_char('\n');

    /* The UART as Linux's autoconfig sees it. */
    report("lsr", inb(COM1 + 5));
    outb(COM1 + 7, 0xa5);
    report("scr", inb(COM1 + 7));
    outb(COM1 + 2, 0x07);                       /* FIFOs on and cleared */
    report("iir", inb(COM1 + 2));

    report("rtc_sec", cmos(0));
    report("rtc_min", cmos(2));
    report("rtc_hour", cmos(4));
    report("rtc_day", cmos(7));
    report("rtc_month", cmos(8));
    report("rtc_year", cmos(0x32) << 8 | cmos(9));

    /* The MP table. */
    const u8 *mpf = find_mpf();
    u32 ncpus = 0;
    if (mpf) {
        const u8 *mpc = (const u8 *)(u64)rd32(mpf + 4);
        u16 len = rd16(mpc + 4), count = rd16(mpc + 34);
        u8 sum = 0;
        for (u32 i = 0; i < len; i++)
            sum += mpc[i];
        report("mp_sum", sum);
        const u8 *e = mpc + 44;
        for (u32 i = 0; i < count; i++) {
            if (e[0] == 0) {
                report("mp_apic", e[1]);
                ncpus++;
                e += 20;
            } else {
                if (e[0] == 2)
                    report("mp_ioapic", rd32(e + 4));
                e += 8;
            }
        }
    }
    report("mp_cpus", ncpus);

    /* The UART's interrupt through the I/O APIC: PIC masked, pin 4 -> 0x30. */
    for (int i = 0; i < 64; i++)
        set_gate(i, unexpected);
    set_gate(VECTOR_COM1, com1_handler);
    struct { u16 limit; u64 base; } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" :: "m"(idtr));
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    lapic_write(LAPIC_SVR, 0x1ff);
    ioapic_write(0x10 + 2 * 4, VECTOR_COM1);    /* fixed, physical, edge, active high */
    ioapic_write(0x11 + 2 * 4, 0);              /* to APIC 0 */
    outb(COM1 + 4, 0x0b);                       /* DTR, RTS, OUT2 */
    outb(COM1 + 1, 0x02);                       /* THRE interrupt */
    while (!thre_iir)
        __asm__ volatile("sti; hlt; cli");
    report("thre_iir", thre_iir);
    outb(COM1 + 1, 0x01);                       /* receive interrupt */
    put_str("ready for input\n");
    if (contains(cmdline, "kemu.dirty")) {
        /* Keep writing 1 MiB at 4 MiB (256 pages) until the line arrives: what a
         * live migration's dirty-page tracking has to follow. */
        volatile u64 *area = (volatile u64 *)0x400000ul;
        u64 n = 0;
        __asm__ volatile("sti");
        while (!rx_done) {
            area[(n * 521) % (0x100000 / 8)] = n;
            n++;
        }
        __asm__ volatile("cli");
        report("dirty_writes", n);
    } else {
        while (!rx_done)
            __asm__ volatile("sti; hlt; cli");
    }
    rx_buf[rx_len] = 0;
    put_str("rx ");
    put_str((const char *)rx_buf);
    put_char('\n');
    outb(COM1 + 1, 0);

    if (contains(cmdline, "kemu.smp") && ncpus > 1) {
        report("cpu", ids(0));
        u64 n = (u64)(tramp_end - tramp_start);
        memcpy((void *)TRAMPOLINE, tramp_start, n);
        lapic_write(LAPIC_ICR_HI, 0);
        lapic_write(LAPIC_ICR_LO, 0x000c4500);  /* INIT, all excluding self */
        lapic_write(LAPIC_ICR_LO, 0x000c4600 | (TRAMPOLINE >> 12));     /* SIPI */
        lapic_write(LAPIC_ICR_LO, 0x000c4600 | (TRAMPOLINE >> 12));
        while (arrived < ncpus - 1)
            __asm__ volatile("pause");
        for (u32 i = 1; i < ncpus && i < 8; i++)
            report("cpu", ap_report[i]);
    }
    put_str("resetting\n");
    reset_machine();
    return 0;
}
