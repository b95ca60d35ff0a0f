/* Helpers shared by the test guests: port I/O, output to the 16550 at 0x3f8,
 * MSRs, CPUID, MMIO.  Freestanding, no libc. */
#ifndef GUEST_H
#define GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define COM1 0x3f8

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}

static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

#define READ_CR(n) ({ u64 __v; __asm__ volatile("mov %%cr" #n ", %0" : "=r"(__v)); __v; })

static inline u64 read_rflags(void) { u64 v; __asm__ volatile("pushfq; popq %0" : "=r"(v)); return v; }
static inline u16 read_cs(void) { u16 v; __asm__ volatile("mov %%cs, %0" : "=r"(v)); return v; }
static inline u16 read_ds(void) { u16 v; __asm__ volatile("mov %%ds, %0" : "=r"(v)); return v; }
static inline u16 read_ss(void) { u16 v; __asm__ volatile("mov %%ss, %0" : "=r"(v)); return v; }

#define MMIO(type, addr) (*(volatile type *)(u64)(addr))

static __attribute__((unused)) void put_char(char c) { outb(COM1, (u8)c); }

static __attribute__((unused)) void put_str(const char *s) { while (*s) put_char(*s++); }

static __attribute__((unused)) void put_hex(u64 v)
{
    char buf[19];
    int i = 18;
    buf[i] = 0;
    do { buf[--i] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    put_str(buf + i);
}

/* One "key value" line. */
static __attribute__((unused)) void report(const char *key, u64 v)
{
    put_str(key);
    put_char(' ');
    put_hex(v);
    put_char('\n');
}

/* A 64-bit interrupt gate (Intel SDM vol. 3, 6.14.1). */
struct idt_gate {
    u16 off0, sel;
    u8 ist, type;
    u16 off1;
    u32 off2, zero;
} __attribute__((packed));

struct interrupt_frame;

static inline u16 rd16(const u8 *p) { return *(const u16 *)p; }
static inline u32 rd32(const u8 *p) { return *(const u32 *)p; }
static inline u64 rd64(const u8 *p) { return *(const u64 *)p; }

void *memset(void *d, int c, unsigned long n);
void *memcpy(void *d, const void *s, unsigned long n);
void *memset(void *d, int c, unsigned long n) { u8 *p = d; while (n--) *p++ = (u8)c; return d; }
void *memcpy(void *d, const void *s, unsigned long n)
{
    u8 *p = d; const u8 *q = s;
    while (n--) *p++ = *q++;
    return d;
}

int guest_main(const u8 *boot_params, u32 apic_id);

#endif
