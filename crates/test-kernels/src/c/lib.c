#include "lib.h"

#define COM1 0x3f8
#define DEBUG_EXIT 0xf4

void putc(char c)
{
    while (!(inb(COM1 + 5) & 0x20))
        ;
    outb(COM1, c);
}

void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

/* 64-by-32 division without libgcc (shift and subtract). */
u64 udiv(u64 n, u32 d)
{
    u64 q = 0, r = 0;
    for (int i = 63; i >= 0; i--) {
        r = (r << 1) | ((n >> i) & 1);
        if (r >= d) {
            r -= d;
            q |= 1ULL << i;
        }
    }
    return q;
}

void putdec(u64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        u64 q = udiv(v, 10);
        buf[--i] = '0' + (char)(v - q * 10);
        v = q;
    } while (v);
    puts(&buf[i]);
}

void puthex(u32 v)
{
    puts("0x");
    for (int i = 28; i >= 0; i -= 4)
        putc("0123456789abcdef"[(v >> i) & 0xf]);
}

void exit(int code)
{
    outb(DEBUG_EXIT, (u8)code);
    for (;;)
        __asm__ volatile("cli; hlt");
}

int strncmp(const char *a, const char *b, u32 n)
{
    for (u32 i = 0; i < n; i++) {
        if (a[i] != b[i] || !a[i])
            return (u8)a[i] - (u8)b[i];
    }
    return 0;
}

void fw_cfg_read(u16 key, void *buf, u32 len)
{
    outw(0x510, key);
    for (u32 i = 0; i < len; i++)
        ((u8 *)buf)[i] = inb(0x511);
}

u32 acpi_u32(const u8 *p)
{
    return p[0] | p[1] << 8 | p[2] << 16 | (u32)p[3] << 24;
}

static int sum_ok(const u8 *p, u32 len)
{
    u8 s = 0;
    for (u32 i = 0; i < len; i++)
        s += p[i];
    return s == 0;
}

const u8 *acpi_find(const char *sig)
{
    /* The RSDP sits on a 16-byte boundary in the BIOS area. */
    for (u32 a = 0xe0000; a < 0x100000; a += 16) {
        const u8 *rsdp = (const u8 *)a;
        if (strncmp((const char *)rsdp, "RSD PTR ", 8) || !sum_ok(rsdp, 20))
            continue;
        const u8 *rsdt = (const u8 *)acpi_u32(rsdp + 16);
        if (strncmp((const char *)rsdt, "RSDT", 4) || !sum_ok(rsdt, acpi_u32(rsdt + 4)))
            return 0;
        for (u32 off = 36; off < acpi_u32(rsdt + 4); off += 4) {
            const u8 *t = (const u8 *)acpi_u32(rsdt + off);
            if (!strncmp((const char *)t, sig, 4) && sum_ok(t, acpi_u32(t + 4)))
                return t;
        }
        return 0;
    }
    return 0;
}

u16 pm_timer_port(void)
{
    const u8 *fadt = acpi_find("FACP");
    return fadt ? (u16)acpi_u32(fadt + 76) : 0;
}

void pm_wait(u16 port, u32 ticks)
{
    u32 start = inl(port) & 0xffffff, waited = 0;
    while (waited < ticks)
        waited = ((inl(port) & 0xffffff) - start) & 0xffffff;
}
