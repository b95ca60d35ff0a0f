/*
 * A virtio-blk driver in a few hundred lines, for kemu's x86-64 microvm board:
 * the device behind the virtio-mmio transport (version 2) of slot 0
 * (0xd0000000, IRQ 5), driven the way VIRTIO 1.2 says a driver must
 * (3.1.1 "Driver Requirements: Device Initialization", 4.2.3 "MMIO-specific
 * Initialization And Device Operation", 2.7 "Split Virtqueues", 5.2 "Block
 * Device").  Each result is a "key value" line on COM1:
 *
 *   magic version device_id   the slot's identification registers
 *   dev_features              DeviceFeatures, both halves
 *   features_ok               Status after FEATURES_OK (still set: accepted)
 *   queue_num_max, ready0     QueueNumMax of queue 0, QueueReady before setup
 *   status                    Status after DRIVER_OK
 *   capacity, blk_size        from the configuration space (generation-checked)
 *   ram_end                   end of RAM below 4 GiB, from the e820 map
 *   read_status/len/sum/head  VIRTIO_BLK_T_IN of sectors 0-3, completion polled
 *                             with VIRTQ_AVAIL_F_NO_INTERRUPT; sum is FNV-1a 64
 *                             of the data, head its first 8 bytes
 *   poll_isr                  InterruptStatus after that (0: no interrupt asked)
 *   read2_*, irq_isr          the last 2 sectors, completion by interrupt: IRQ 5
 *                             through the I/O APIC (level, vector 0x35), the
 *                             handler reads InterruptStatus and writes InterruptACK;
 *                             irq_isr is what it read
 *   woke                      with "kemu.wait": the byte the host sent after
 *                             "waiting" (the guest polls the 16550 for it)
 *   write_status/len          VIRTIO_BLK_T_OUT of one sector (WRITE_SECTOR) with
 *                             the pattern pattern_byte(i)
 *   verify_status, verify_bad the sector read back, bytes that differ
 *   flush_status/len          VIRTIO_BLK_T_FLUSH
 *   oob_status                a read crossing the end of the disk (IOERR = 1)
 *   bad_*                     a read whose data descriptor straddles the end of
 *                             RAM: the device enters DEVICE_NEEDS_RESET and sends a
 *                             configuration change interrupt; reported: the
 *                             interrupt's InterruptStatus, Status, the used index
 *                             and the request's status byte (untouched: 0xff)
 *   stuck_used, stuck_isr     used index and interrupt status bits after a valid
 *                             request made while the device needs reset (given
 *                             the host about 2^28 TSC ticks to serve the doorbell)
 *   reset_status              Status after writing 0 (device reset)
 *   again_status/sum          re-initialised: sectors 0-3 read again
 *   irq_vring/config/spurious interrupts taken with InterruptStatus bit 0, bit 1,
 *                             and none set (tolerated, as Linux's IRQ_NONE)
 *
 * then "done" and power off through the ACPI sleep control register (S5).
 *
 * The board may serve QueueNotify on another host thread (ioeventfd), so
 * completions are asynchronous: the driver always waits for the used ring, and
 * for an interrupt with the InterruptStatus bit it expects, never for a count.
 */
#include "guest.h"

#define VIRTIO_BASE 0xd0000000ul
#define VIRTIO_GSI 5
#define VECTOR_VIRTIO 0x35
#define LAPIC 0xfee00000ul
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define IOAPIC 0xfec00000ul
#define ACPI_SLEEP_CONTROL 0x600
#define ACPI_S5 ((5 << 2) | 0x20)       /* SLP_TYP 5 (the DSDT's \_S5), SLP_EN */

/* virtio-mmio registers (4.2.2). */
#define MAGIC_VALUE 0x000
#define VERSION 0x004
#define DEVICE_ID 0x008
#define DEVICE_FEATURES 0x010
#define DEVICE_FEATURES_SEL 0x014
#define DRIVER_FEATURES 0x020
#define DRIVER_FEATURES_SEL 0x024
#define QUEUE_SEL 0x030
#define QUEUE_NUM_MAX 0x034
#define QUEUE_NUM 0x038
#define QUEUE_READY 0x044
#define QUEUE_NOTIFY 0x050
#define INTERRUPT_STATUS 0x060
#define INTERRUPT_ACK 0x064
#define STATUS 0x070
#define QUEUE_DESC_LOW 0x080
#define QUEUE_DESC_HIGH 0x084
#define QUEUE_DRIVER_LOW 0x090
#define QUEUE_DRIVER_HIGH 0x094
#define QUEUE_DEVICE_LOW 0x0a0
#define QUEUE_DEVICE_HIGH 0x0a4
#define CONFIG_GENERATION 0x0fc
#define CONFIG 0x100

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_FAILED 128

#define VIRTIO_F_VERSION_1 32
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1

#define QSZ 8                           /* queue size used (<= QueueNumMax) */
#define SECTOR 512
#define READ_SECTORS 4
#define WRITE_SECTOR 6

struct virtq_desc { u64 addr; u32 len; u16 flags; u16 next; };
struct virtq_avail { u16 flags; u16 idx; u16 ring[QSZ]; u16 used_event; };
struct virtq_used_elem { u32 id; u32 len; };
struct virtq_used { u16 flags; u16 idx; struct virtq_used_elem ring[QSZ]; u16 avail_event; };
struct blk_req { u32 type; u32 reserved; u64 sector; };

/* The three areas of queue 0, each in its own page (2.7: 16/2/4-byte alignment). */
static volatile struct virtq_desc desc[QSZ] __attribute__((aligned(4096)));
static volatile struct virtq_avail avail __attribute__((aligned(4096)));
static volatile struct virtq_used used __attribute__((aligned(4096)));

static volatile struct blk_req req __attribute__((aligned(16)));
static volatile u8 req_status;
static u8 buf[READ_SECTORS * SECTOR] __attribute__((aligned(4096)));

static u16 avail_idx, used_idx;         /* the driver's shadow indices */
/* Interrupts taken: InterruptStatus bits seen since the last submit, and counts. */
static volatile u32 isr_seen, irq_vring, irq_config, irq_spurious;

static struct idt_gate idt[256] __attribute__((aligned(16)));

#define barrier() __asm__ volatile("" ::: "memory")

static u32 vread(u32 reg) { return MMIO(u32, VIRTIO_BASE + reg); }
static void vwrite(u32 reg, u32 v) { MMIO(u32, VIRTIO_BASE + reg) = v; }

static void poweroff(void)
{
    outb(ACPI_SLEEP_CONTROL, ACPI_S5);
    for (;;) __asm__ volatile("cli; hlt");
}

static void fail(const char *why)
{
    put_str("fail ");
    put_str(why);
    put_char('\n');
    poweroff();
}

__attribute__((interrupt)) static void virtio_handler(struct interrupt_frame *f)
{
    (void)f;
    u32 isr = vread(INTERRUPT_STATUS);
    if (isr)
        vwrite(INTERRUPT_ACK, isr);     /* lowers the (level-triggered) line */
    else
        irq_spurious++;                 /* nothing to do, as Linux's IRQ_NONE */
    isr_seen |= isr;
    irq_vring += isr & 1;
    irq_config += isr >> 1 & 1;
    MMIO(u32, LAPIC + LAPIC_EOI) = 0;
}

__attribute__((interrupt)) static void unexpected(struct interrupt_frame *f)
{
    (void)f;
    fail("unexpected interrupt or exception");
}

static void set_gate(int vec, void (*handler)(struct interrupt_frame *))
{
    u64 a = (u64)handler;
    idt[vec] = (struct idt_gate){(u16)a, read_cs(), 0, 0x8e, (u16)(a >> 16), (u32)(a >> 32), 0};
}

static void ioapic_write(u32 reg, u32 v)
{
    MMIO(u32, IOAPIC) = reg;
    MMIO(u32, IOAPIC + 0x10) = v;
}

static u64 fnv1a(const u8 *p, u64 n)
{
    u64 h = 0xcbf29ce484222325ul;
    while (n--) {
        h ^= *p++;
        h *= 0x100000001b3ul;
    }
    return h;
}

static u8 pattern_byte(u32 i) { return (u8)(i * 7 + 0x5a) ^ (u8)(i >> 8); }

/* End of the e820 RAM entry that holds 1 MiB (struct boot_params: 0x1e8, 0x2d0). */
static u64 ram_end(const u8 *bp)
{
    u8 n = bp[0x1e8];
    for (u32 i = 0; i < n && i < 128; i++) {
        const u8 *e = bp + 0x2d0 + 20 * i;
        u64 addr = rd64(e), size = rd64(e + 8);
        if (rd32(e + 16) == 1 && addr <= 0x100000 && 0x100000 < addr + size)
            return addr + size;
    }
    return 0;
}

/* 3.1.1 steps 1-8 and 4.2.3.2 (queue 0); reports and powers off on failure. */
static void init_device(int verbose)
{
    vwrite(STATUS, 0);                                  /* reset */
    if (vread(STATUS) != 0)
        fail("reset did not clear Status");
    vwrite(STATUS, S_ACKNOWLEDGE);
    vwrite(STATUS, S_ACKNOWLEDGE | S_DRIVER);

    vwrite(DEVICE_FEATURES_SEL, 0);
    u64 features = vread(DEVICE_FEATURES);
    vwrite(DEVICE_FEATURES_SEL, 1);
    features |= (u64)vread(DEVICE_FEATURES) << 32;
    if (!(features >> VIRTIO_F_VERSION_1 & 1))
        fail("VIRTIO_F_VERSION_1 not offered");
    /* VERSION_1, and FLUSH so that VIRTIO_BLK_T_FLUSH is defined (5.2.6.2). */
    u64 accept = (1ul << VIRTIO_F_VERSION_1) | (features & (1ul << VIRTIO_BLK_F_FLUSH));
    vwrite(DRIVER_FEATURES_SEL, 0);
    vwrite(DRIVER_FEATURES, (u32)accept);
    vwrite(DRIVER_FEATURES_SEL, 1);
    vwrite(DRIVER_FEATURES, (u32)(accept >> 32));
    vwrite(STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    u32 st = vread(STATUS);
    if (verbose) {
        report("dev_features", features);
        report("drv_features", accept);
        report("features_ok", st);
    }
    if (!(st & S_FEATURES_OK)) {
        vwrite(STATUS, st | S_FAILED);
        fail("FEATURES_OK not accepted");
    }

    vwrite(QUEUE_SEL, 0);
    u32 max = vread(QUEUE_NUM_MAX);
    u32 ready = vread(QUEUE_READY);
    if (verbose) {
        report("queue_num_max", max);
        report("ready0", ready);
    }
    if (max < QSZ || ready)
        fail("queue 0 unusable");
    memset((void *)desc, 0, sizeof(desc));
    memset((void *)&avail, 0, sizeof(avail));
    memset((void *)&used, 0, sizeof(used));
    avail_idx = used_idx = 0;
    vwrite(QUEUE_NUM, QSZ);
    vwrite(QUEUE_DESC_LOW, (u32)(u64)desc);
    vwrite(QUEUE_DESC_HIGH, (u32)((u64)desc >> 32));
    vwrite(QUEUE_DRIVER_LOW, (u32)(u64)&avail);
    vwrite(QUEUE_DRIVER_HIGH, (u32)((u64)&avail >> 32));
    vwrite(QUEUE_DEVICE_LOW, (u32)(u64)&used);
    vwrite(QUEUE_DEVICE_HIGH, (u32)((u64)&used >> 32));
    vwrite(QUEUE_READY, 1);
    if (vread(QUEUE_READY) != 1)
        fail("QueueReady did not stick");

    vwrite(STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    st = vread(STATUS);
    if (verbose)
        report("status", st);
    if (st != (S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK))
        fail("DRIVER_OK");
}

/* One request: header, optional data, status byte (5.2.6), made available and notified. */
static void submit(u32 type, u64 sector, u64 data, u32 len, int device_writes)
{
    req.type = type;
    req.reserved = 0;
    req.sector = sector;
    req_status = 0xff;
    isr_seen = 0;                       /* interrupts are off until the wait */
    u16 n = 0;
    desc[n].addr = (u64)&req;
    desc[n].len = sizeof(req);
    desc[n].flags = VIRTQ_DESC_F_NEXT;
    desc[n].next = n + 1;
    n++;
    if (len) {
        desc[n].addr = data;
        desc[n].len = len;
        desc[n].flags = VIRTQ_DESC_F_NEXT | (device_writes ? VIRTQ_DESC_F_WRITE : 0);
        desc[n].next = n + 1;
        n++;
    }
    desc[n].addr = (u64)&req_status;
    desc[n].len = 1;
    desc[n].flags = VIRTQ_DESC_F_WRITE;
    desc[n].next = 0;
    avail.ring[avail_idx % QSZ] = 0;                    /* head: descriptor 0 */
    barrier();                                          /* ring entry before idx (2.7.13) */
    avail.idx = ++avail_idx;
    barrier();
    vwrite(QUEUE_NOTIFY, 0);
}

/* The used entry of the last request (its only one in flight); returns its length. */
static u32 take_used(void)
{
    barrier();
    u32 len = used.ring[used_idx % QSZ].len;
    if (used.ring[used_idx % QSZ].id != 0)
        fail("used id");
    used_idx++;
    return len;
}

/* Completion by polling the used ring (the doorbell may be served on another
 * host thread: completion is asynchronous). */
static u32 wait_poll(void)
{
    for (u64 spin = 0; used.idx == used_idx; spin++) {
        if (spin > (1ul << 32))
            fail("no used buffer (poll)");
        __asm__ volatile("pause");
    }
    return take_used();
}

/* Completion by interrupt: sleep until a used-buffer interrupt came and the used
 * ring moved (an interrupt whose InterruptStatus reads 0 is just counted). */
static u32 wait_irq(void)
{
    while (!(isr_seen & 1) || used.idx == used_idx)
        __asm__ volatile("sti; hlt; cli");
    return take_used();
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64)hi << 32 | lo;
}

static u64 read_capacity(void)
{
    u32 gen, lo, hi;
    do {                                                /* 4.2.2: ConfigGeneration */
        gen = vread(CONFIG_GENERATION);
        lo = vread(CONFIG);
        hi = vread(CONFIG + 4);
    } while (gen != vread(CONFIG_GENERATION));
    return (u64)hi << 32 | lo;
}

int guest_main(const u8 *bp, u32 apic_id)
{
    (void)apic_id;
    isr_seen = irq_vring = irq_config = irq_spurious = 0;

    u32 magic = vread(MAGIC_VALUE), version = vread(VERSION), id = vread(DEVICE_ID);
    report("magic", magic);
    report("version", version);
    report("device_id", id);
    if (magic != 0x74726976 || version != 2 || id != 2)
        fail("no virtio-blk (version 2) in slot 0");

    init_device(1);
    u64 capacity = read_capacity();
    report("capacity", capacity);
    report("blk_size", vread(CONFIG + 20));
    u64 ram = ram_end(bp);
    report("ram_end", ram);
    if (capacity < 16)
        fail("disk too small");

    /* Read sectors 0-3, polling, no interrupt wanted (2.7.7). */
    avail.flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
    memset(buf, 0, sizeof(buf));
    submit(VIRTIO_BLK_T_IN, 0, (u64)buf, READ_SECTORS * SECTOR, 1);
    report("read_len", wait_poll());
    report("read_status", req_status);
    u64 sum0 = fnv1a(buf, READ_SECTORS * SECTOR);
    report("read_sum", sum0);
    report("read_head", rd64(buf));
    report("poll_isr", vread(INTERRUPT_STATUS));

    /* From now on, completions by interrupt: IRQ 5 -> I/O APIC pin 5 -> vector 0x35. */
    for (int i = 0; i < 256; i++)
        set_gate(i, unexpected);
    set_gate(VECTOR_VIRTIO, virtio_handler);
    struct { u16 limit; u64 base; } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" :: "m"(idtr));
    outb(0x21, 0xff);                                   /* both 8259s masked */
    outb(0xa1, 0xff);
    MMIO(u32, LAPIC + LAPIC_SVR) = 0x1ff;
    ioapic_write(0x10 + 2 * VIRTIO_GSI, VECTOR_VIRTIO | 1 << 15);  /* fixed, level, high */
    ioapic_write(0x11 + 2 * VIRTIO_GSI, 0);                         /* to APIC 0 */
    avail.flags = 0;

    /* The last two sectors, by interrupt. */
    memset(buf, 0, sizeof(buf));
    submit(VIRTIO_BLK_T_IN, capacity - 2, (u64)buf, 2 * SECTOR, 1);
    report("read2_len", wait_irq());
    report("irq_isr", isr_seen);
    report("read2_status", req_status);
    report("read2_sum", fnv1a(buf, 2 * SECTOR));
    report("isr_after_ack", vread(INTERRUPT_STATUS));

    /* With "kemu.wait": wait (polling the 16550) for a byte from the host, the
     * device set up and used: where the snapshot tests stop it. */
    const char *cmdline = (const char *)(u64)rd32(bp + 0x228);
    for (const char *c = cmdline; *c; c++) {
        const char *w = "kemu.wait", *p = c;
        while (*w && *p == *w) { p++; w++; }
        if (!*w) {
            outb(COM1 + 1, 0x01);       /* IER.ERBFI: listening (its IRQ stays masked) */
            put_str("waiting\n");
            while (!(inb(COM1 + 5) & 1))
                __asm__ volatile("pause");
            report("woke", inb(COM1));
            break;
        }
    }

    /* Write one sector with a pattern, read it back, flush. */
    for (u32 i = 0; i < SECTOR; i++)
        buf[i] = pattern_byte(i);
    submit(VIRTIO_BLK_T_OUT, WRITE_SECTOR, (u64)buf, SECTOR, 0);
    report("write_len", wait_irq());
    report("write_status", req_status);
    memset(buf, 0, SECTOR);
    submit(VIRTIO_BLK_T_IN, WRITE_SECTOR, (u64)buf, SECTOR, 1);
    report("verify_len", wait_irq());
    report("verify_status", req_status);
    u32 bad = 0;
    for (u32 i = 0; i < SECTOR; i++)
        bad += buf[i] != pattern_byte(i);
    report("verify_bad", bad);
    submit(VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0);
    report("flush_len", wait_irq());
    report("flush_status", req_status);

    /* A read crossing the end of the disk: an I/O error, the device carries on. */
    submit(VIRTIO_BLK_T_IN, capacity - 1, (u64)buf, 2 * SECTOR, 1);
    report("oob_len", wait_irq());
    report("oob_status", req_status);

    /* A data buffer straddling the end of RAM: a broken driver.  The device must not
     * touch it; it sets DEVICE_NEEDS_RESET and raises a configuration interrupt. */
    u16 used_before = used.idx;
    submit(VIRTIO_BLK_T_IN, 0, ram - SECTOR / 2, SECTOR, 1);
    while (!(isr_seen & 2))
        __asm__ volatile("sti; hlt; cli");
    report("bad_isr", isr_seen);
    report("bad_status", vread(STATUS));
    report("bad_used", (u16)(used.idx - used_before));
    report("bad_req_status", req_status);
    /* A valid request now: not processed until reset (2.1.2).  Give the host
     * time to serve the doorbell (about 2^28 TSC ticks, interrupts on). */
    submit(VIRTIO_BLK_T_IN, 0, (u64)buf, SECTOR, 1);
    for (u64 t0 = rdtsc(); rdtsc() - t0 < (1ul << 28);)
        __asm__ volatile("sti; pause; cli");
    report("stuck_used", (u16)(used.idx - used_before));
    report("stuck_isr", isr_seen);

    /* Reset and start again: the device works as before. */
    vwrite(STATUS, 0);
    report("reset_status", vread(STATUS));
    init_device(0);
    memset(buf, 0, sizeof(buf));
    submit(VIRTIO_BLK_T_IN, 0, (u64)buf, READ_SECTORS * SECTOR, 1);
    report("again_len", wait_irq());
    report("again_status", req_status);
    report("again_sum", fnv1a(buf, READ_SECTORS * SECTOR));
    report("irq_vring", irq_vring);
    report("irq_config", irq_config);
    report("irq_spurious", irq_spurious);

    put_str("done\n");
    poweroff();
    return 0;
}
