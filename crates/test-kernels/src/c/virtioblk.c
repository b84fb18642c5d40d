/* Drives brisk's first virtio-blk device (virtio-mmio at 0xd0000000) by
 * polling its virtqueue, no interrupts:
 *   (default) write a known pattern to sectors 0..PATTERN_SECTORS-1 in
 *   4 KiB requests, flush, read it all back in one request and compare,
 *   check that a read past the end and GET_ID answer as they should, then
 *   exit 0. The host checks the image file holds the pattern.
 *   bench=N: N 4 KiB reads at pseudo-random sectors, then N 4 KiB reads in
 *   order, each phase timed with the PM timer; prints the microseconds.
 * The pattern: byte i of sector s is (s * 31 + i * 7 + 1) & 0xff. */
#include "lib.h"

#define MMIO 0xd0000000u
#define REG(o) (*(volatile u32 *)(MMIO + (o)))
#define QSIZE 8
#define PATTERN_SECTORS 64

struct desc { u64 addr; u32 len; u16 flags, next; };
#define F_NEXT 1
#define F_WRITE 2

static struct desc descs[QSIZE] __attribute__((aligned(16)));
static struct { u16 flags, idx, ring[QSIZE], used_event; } avail __attribute__((aligned(2)));
static struct { u16 flags, idx; struct { u32 id, len; } ring[QSIZE]; u16 avail_event; } used __attribute__((aligned(4)));
static struct { u32 type, reserved; u64 sector; } req;
static u8 status;
static u8 buf[PATTERN_SECTORS * 512] __attribute__((aligned(4096)));

#define barrier() __asm__ volatile("" ::: "memory")

static u8 pattern(u32 sector, u32 i) { return (u8)(sector * 31 + i * 7 + 1); }

/* One request: header, optional data (device-writable for reads), status. */
static int submit(u32 type, u64 sector, void *data, u32 len, int device_writes)
{
    req.type = type;
    req.reserved = 0;
    req.sector = sector;
    status = 0xff;
    descs[0] = (struct desc){ (u32)&req, 16, F_NEXT, 1 };
    u16 last = 1;
    if (len) {
        descs[1] = (struct desc){ (u32)data, len, F_NEXT | (device_writes ? F_WRITE : 0), 2 };
        last = 2;
    } else {
        descs[0].next = 1;
    }
    descs[last] = (struct desc){ (u32)&status, 1, F_WRITE, 0 };
    u16 before = used.idx;
    avail.ring[avail.idx % QSIZE] = 0;
    barrier();
    avail.idx++;
    barrier();
    REG(0x50) = 0;
    for (u32 spin = 0; used.idx == before; spin++) {
        if (spin > 10000000u) {
            puts("virtioblk: the device never used the request\n");
            exit(3);
        }
        pause();
    }
    barrier();
    return status;
}

static u32 rng = 12345;
static u32 next_rand(void) { rng = rng * 1103515245u + 12345u; return rng >> 8; }

int kmain(u32 magic, struct multiboot_info *mbi)
{
    (void)magic;
    if (REG(0) != 0x74726976 || REG(4) != 2 || REG(8) != 2) {
        puts("virtioblk: no virtio-blk (modern virtio-mmio) at 0xd0000000\n");
        return 2;
    }
    REG(0x70) = 0;
    REG(0x70) = 1 | 2;
    REG(0x14) = 1;
    u32 hi = REG(0x10);
    REG(0x14) = 0;
    u32 lo = REG(0x10);
    if (!(hi & 1)) {
        puts("virtioblk: VERSION_1 not offered\n");
        return 2;
    }
    REG(0x24) = 1;
    REG(0x20) = 1; /* VERSION_1 */
    REG(0x24) = 0;
    REG(0x20) = lo & (1u << 9); /* FLUSH */
    REG(0x70) = 1 | 2 | 8;
    if (!(REG(0x70) & 8)) {
        puts("virtioblk: features refused\n");
        return 2;
    }
    REG(0x30) = 0;
    if (REG(0x34) < QSIZE) {
        puts("virtioblk: queue too small\n");
        return 2;
    }
    REG(0x38) = QSIZE;
    REG(0x80) = (u32)descs; REG(0x84) = 0;
    REG(0x90) = (u32)&avail; REG(0x94) = 0;
    REG(0xa0) = (u32)&used; REG(0xa4) = 0;
    avail.flags = 1; /* no interrupts: this kernel polls */
    REG(0x44) = 1;
    REG(0x70) = 1 | 2 | 8 | 4;
    u64 capacity = *(volatile u32 *)(MMIO + 0x100) | (u64)*(volatile u32 *)(MMIO + 0x104) << 32;
    puts("virtioblk: capacity ");
    putdec(capacity);
    puts(" sectors, features ");
    puthex(lo);
    putc('\n');

    u32 bench = 0;
    if (mbi->flags & (1 << 2)) {
        for (const char *c = (const char *)mbi->cmdline; *c; c++)
            if (!strncmp(c, "bench=", 6))
                for (c += 6; *c >= '0' && *c <= '9'; c++)
                    bench = bench * 10 + (*c - '0');
    }
    if (bench) {
        u16 pm = pm_timer_port();
        /* 32-bit arithmetic: no libgcc here; bench disks are < 2 TiB. */
        u32 span = capacity > 8 ? (u32)(capacity >> 3) : 1;
        for (int phase = 0; phase < 2; phase++) {
            u32 t0 = inl(pm) & 0xffffff, ticks = 0;
            for (u32 n = 0; n < bench; n++) {
                u32 sector = phase == 0 ? (next_rand() % span) * 8 : (n % span) * 8;
                if (submit(0, sector, buf, 4096, 1) != 0) {
                    puts("virtioblk: a bench read failed\n");
                    return 4;
                }
                u32 t1 = inl(pm) & 0xffffff;
                ticks += (t1 - t0) & 0xffffff;
                t0 = t1;
            }
            puts(phase == 0 ? "virtioblk: bench random 4k reads " : "virtioblk: bench sequential 4k reads ");
            putdec(bench);
            puts(" in ");
            putdec(udiv((u64)ticks * 1000000u, 3579545u));
            puts(" us\n");
        }
        return 0;
    }

    if (capacity < PATTERN_SECTORS + 8) {
        puts("virtioblk: the disk is too small for the pattern\n");
        return 2;
    }
    for (u32 s = 0; s < PATTERN_SECTORS; s += 8) {
        for (u32 i = 0; i < 4096; i++)
            buf[i] = pattern(s + i / 512, i % 512);
        if (submit(1, s, buf, 4096, 0) != 0) {
            puts("virtioblk: a write failed\n");
            return 4;
        }
    }
    if (submit(4, 0, 0, 0, 0) != 0) {
        puts("virtioblk: flush failed\n");
        return 4;
    }
    for (u32 i = 0; i < sizeof(buf); i++)
        buf[i] = 0;
    if (submit(0, 0, buf, sizeof(buf), 1) != 0) {
        puts("virtioblk: the read-back failed\n");
        return 4;
    }
    for (u32 i = 0; i < sizeof(buf); i++) {
        if (buf[i] != pattern(i / 512, i % 512)) {
            puts("virtioblk: read back a different byte at ");
            putdec(i);
            putc('\n');
            return 5;
        }
    }
    puts("virtioblk: wrote, flushed and read back ");
    putdec(sizeof(buf));
    puts(" bytes\n");
    /* Past the end: IOERR (1), not a crash or a short read. */
    int past = submit(0, capacity, buf, 512, 1);
    puts("virtioblk: a read past the end answers ");
    putdec(past);
    putc('\n');
    if (past != 1)
        return 6;
    for (u32 i = 0; i < 20; i++)
        buf[i] = 0;
    if (submit(8, 0, buf, 20, 1) != 0)
        return 7;
    buf[20] = 0;
    puts("virtioblk: id '");
    puts((const char *)buf);
    puts("'\n");
    return 0;
}
