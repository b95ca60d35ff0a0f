/*
 * An interrupt through KVM's in-kernel irqchip: the guest programs the
 * master 8259 (ICW1-4: vectors 0x20-0x27; OCW1: only IRQ 4 unmasked), loads
 * an IDT whose vector 0x24 handler counts interrupts and sends the 8259 a
 * non-specific EOI, then signals "ready" on port 0x530 and waits with
 * sti; hlt.  The host raises GSI 4 (KVM_IRQ_LINE), which reaches the CPU
 * through the PIC and the local APIC's LINT0 (ExtINT, set up by the VMM).
 * A second round does the same with the host writing an irqfd.  Any other
 * vector is reported as an unexpected exception and fails the guest.
 */
#include "guest.h"

static struct idt_gate idt[48] __attribute__((aligned(16)));
static volatile u32 irq_count;
static volatile u32 last_vector;

__attribute__((interrupt)) static void irq4_handler(struct interrupt_frame *f)
{
    (void)f;
    irq_count++;
    last_vector = 0x24;
    outb(0x20, 0x20);              /* non-specific EOI to the master PIC */
}

__attribute__((interrupt)) static void unexpected(struct interrupt_frame *f)
{
    (void)f;
    put_str("unexpected interrupt\n");
    outb(0x501, 2);
    for (;;) __asm__ volatile("cli; hlt");
}

static void set_gate(int vec, void (*handler)(struct interrupt_frame *))
{
    u64 a = (u64)handler;
    idt[vec] = (struct idt_gate){(u16)a, read_cs(), 0, 0x8e, (u16)(a >> 16), (u32)(a >> 32), 0};
}

static void wait_irq(u32 count)
{
    while (irq_count < count)
        __asm__ volatile("sti; hlt; cli");
}

int guest_main(const u8 *bp, u32 apic_id)
{
    (void)bp; (void)apic_id;
    for (int i = 0; i < 48; i++)
        set_gate(i, unexpected);
    set_gate(0x24, irq4_handler);
    struct { u16 limit; u64 base; } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" :: "m"(idtr));

    outb(0x20, 0x11); outb(0x21, 0x20); outb(0x21, 0x04); outb(0x21, 0x01);
    outb(0xa0, 0x11); outb(0xa1, 0x28); outb(0xa1, 0x02); outb(0xa1, 0x01);
    outb(0x21, 0xef);              /* only IRQ 4 */
    outb(0xa1, 0xff);

    outb(0x530, 1);                /* ready: raise GSI 4 with KVM_IRQ_LINE */
    wait_irq(1);
    report("vector", last_vector);
    outb(0x530, 2);                /* ready: signal the irqfd */
    wait_irq(2);
    report("irqs", irq_count);
    return irq_count == 2 ? 0 : 1;
}
