/* See virtio.h. */
#include "virtio.h"

static void fail(const char *who, const char *what)
{
    puts(who);
    puts(": ");
    puts(what);
    putc('\n');
    exit(2);
}

u32 virtio_begin(u32 type, const char *who)
{
    if (VREG(0) != 0x74726976 || VREG(4) != 2 || VREG(8) != type)
        fail(who, "not the expected modern virtio-mmio device at 0xd0000000");
    VREG(0x70) = 0;
    VREG(0x70) = 1 | 2;
    VREG(0x14) = 1;
    if (!(VREG(0x10) & 1))
        fail(who, "VERSION_1 not offered");
    VREG(0x14) = 0;
    return VREG(0x10);
}

void virtio_accept(u32 features, const char *who)
{
    VREG(0x24) = 1;
    VREG(0x20) = 1; /* VERSION_1 */
    VREG(0x24) = 0;
    VREG(0x20) = features;
    VREG(0x70) = 1 | 2 | 8;
    if (!(VREG(0x70) & 8))
        fail(who, "features refused");
}

void vq_setup(u32 index, struct vq *q, const char *who)
{
    VREG(0x30) = index;
    if (VREG(0x34) < VQ_SIZE)
        fail(who, "queue too small");
    VREG(0x38) = VQ_SIZE;
    VREG(0x80) = (u32)q->descs; VREG(0x84) = 0;
    VREG(0x90) = (u32)&q->avail; VREG(0x94) = 0;
    VREG(0xa0) = (u32)&q->used; VREG(0xa4) = 0;
    q->avail.flags = 1; /* no interrupts: the kernel polls */
    VREG(0x44) = 1;
}

void virtio_driver_ok(void)
{
    VREG(0x70) = 1 | 2 | 8 | 4;
}

void vq_publish(struct vq *q, u32 index, u16 slot)
{
    q->avail.ring[q->avail.idx % VQ_SIZE] = slot;
    barrier();
    q->avail.idx++;
    barrier();
    VREG(0x50) = index;
}

int vq_next_used(struct vq *q, u16 *seen, u32 *id, u32 *len)
{
    if (q->used.idx == *seen)
        return 0;
    barrier();
    *id = q->used.ring[*seen % VQ_SIZE].id;
    *len = q->used.ring[*seen % VQ_SIZE].len;
    (*seen)++;
    return 1;
}

u32 cmdline_arg(const struct multiboot_info *mbi, const char *key, u32 def)
{
    u32 n = 0;
    while (key[n]) n++;
    if (!(mbi->flags & (1 << 2))) return def;
    for (const char *c = (const char *)mbi->cmdline; *c; c++) {
        if (strncmp(c, key, n)) continue;
        if (c[n] != '=') return 1; /* a bare flag */
        u32 v = 0;
        for (c += n + 1; *c >= '0' && *c <= '9'; c++) v = v * 10 + (*c - '0');
        return v;
    }
    return def;
}
