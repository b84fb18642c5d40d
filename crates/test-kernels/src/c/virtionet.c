/* Drives brisk's first virtio device (virtio-mmio at 0xd0000000) as
 * virtio-net, polling its two queues (0: receive, 1: transmit), no
 * interrupts. It prints the MAC from the configuration space and the
 * features offered, accepts VERSION_1, MAC and MRG_RXBUF (and, with
 * `offload` on the command line, GUEST_CSUM/GUEST_TSO4/GUEST_TSO6 and
 * CSUM), then, as the command line says:
 *   echo=N   receive N frames of ethertype 0x88b5 or IPv4 UDP and send
 *            each back to its sender (the first one's virtio-net header
 *            is printed), then exit 0; other frames (the host's IPv6 or
 *            ARP chatter) are not counted or answered;
 *   burst=N  send N 60-byte frames (size=BYTES for 60 to 1514; ethertype
 *            0x88b5, a sequence number in the payload, then byte i = i),
 *            wait until the device used them, exit 0;
 *   flood    send without end, three chains in four bad ones: a buffer
 *            outside guest memory, a 2 GiB length, a descriptor whose
 *            next is itself: a hostile guest that never stops.
 * Frames sent go to the broadcast address from this NIC's MAC. */
#include "lib.h"

#define MMIO 0xd0000000u
#define REG(o) (*(volatile u32 *)(MMIO + (o)))
#define QSIZE 16
#define BUF 2048
#define HDR 12

struct desc { u64 addr; u32 len; u16 flags, next; };
#define F_WRITE 2

struct vq {
    struct desc descs[QSIZE] __attribute__((aligned(16)));
    struct { u16 flags, idx, ring[QSIZE], used_event; } avail __attribute__((aligned(2)));
    struct { u16 flags, idx; struct { u32 id, len; } ring[QSIZE]; u16 avail_event; } used __attribute__((aligned(4)));
};

static struct vq rxq, txq;
static u8 rxbuf[QSIZE][BUF] __attribute__((aligned(64)));
static u8 txbuf[QSIZE][BUF] __attribute__((aligned(64)));
static u8 mac[6];

#define barrier() __asm__ volatile("" ::: "memory")

static u32 arg(const struct multiboot_info *mbi, const char *key, u32 def)
{
    u32 n = 0;
    for (u32 k = 0; key[k]; k++) n++;
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

static void setup_queue(u32 index, struct vq *q)
{
    REG(0x30) = index;
    if (REG(0x34) < QSIZE) {
        puts("virtionet: queue too small\n");
        exit(2);
    }
    REG(0x38) = QSIZE;
    REG(0x80) = (u32)q->descs; REG(0x84) = 0;
    REG(0x90) = (u32)&q->avail; REG(0x94) = 0;
    REG(0xa0) = (u32)&q->used; REG(0xa4) = 0;
    q->avail.flags = 1; /* no interrupts: this kernel polls */
    REG(0x44) = 1;
}

/* Give receive buffer i to the device. */
static void post_rx(u16 i)
{
    rxq.descs[i] = (struct desc){ (u32)rxbuf[i], BUF, F_WRITE, 0 };
    rxq.avail.ring[rxq.avail.idx % QSIZE] = i;
    barrier();
    rxq.avail.idx++;
    barrier();
    REG(0x50) = 0;
}


/* Publish descriptor `d` in transmit slot `slot` and notify (the caller
 * waited for a free slot). */
static void send_desc(u16 slot, struct desc d)
{
    txq.descs[slot] = d;
    txq.avail.ring[txq.avail.idx % QSIZE] = slot;
    barrier();
    txq.avail.idx++;
    barrier();
    REG(0x50) = 1;
}

static void wait_tx_room(void)
{
    for (u32 spin = 0; (u16)(txq.avail.idx - txq.used.idx) >= QSIZE; spin++) {
        if (spin > 100000000u) {
            puts("virtionet: the device never used a transmit buffer\n");
            exit(3);
        }
        pause();
    }
}

static void put_mac(const u8 *m)
{
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 6; i++) {
        if (i) putc(':');
        putc(hex[m[i] >> 4]);
        putc(hex[m[i] & 15]);
    }
}

int kmain(u32 magic, struct multiboot_info *mbi)
{
    (void)magic;
    if (REG(0) != 0x74726976 || REG(4) != 2 || REG(8) != 1) {
        puts("virtionet: no virtio-net (modern virtio-mmio) at 0xd0000000\n");
        return 2;
    }
    REG(0x70) = 0;
    REG(0x70) = 1 | 2;
    REG(0x14) = 1;
    u32 hi = REG(0x10);
    REG(0x14) = 0;
    u32 lo = REG(0x10);
    if (!(hi & 1)) {
        puts("virtionet: VERSION_1 not offered\n");
        return 2;
    }
    for (int i = 0; i < 6; i++) mac[i] = *(volatile u8 *)(MMIO + 0x100 + i);
    u16 status = *(volatile u16 *)(MMIO + 0x106);
    puts("virtionet: mac ");
    put_mac(mac);
    puts(" link ");
    puts(status & 1 ? "up" : "down");
    puts(" features ");
    puthex(lo);
    putc('\n');
    /* MAC (5), MRG_RXBUF (15); offloads: CSUM (0), GUEST_CSUM (1),
     * GUEST_TSO4 (7), GUEST_TSO6 (8). */
    u32 want = (1u << 5) | (1u << 15);
    if (arg(mbi, "offload", 0))
        want |= (1u << 0) | (1u << 1) | (1u << 7) | (1u << 8);
    if ((lo & want) != want) {
        puts("virtionet: a feature this kernel needs is not offered\n");
        return 2;
    }
    REG(0x24) = 1;
    REG(0x20) = 1; /* VERSION_1 */
    REG(0x24) = 0;
    REG(0x20) = want;
    REG(0x70) = 1 | 2 | 8;
    if (!(REG(0x70) & 8)) {
        puts("virtionet: features refused\n");
        return 2;
    }
    setup_queue(0, &rxq);
    setup_queue(1, &txq);
    REG(0x70) = 1 | 2 | 8 | 4;
    puts("virtionet: accepted ");
    puthex(want);
    putc('\n');

    u32 burst = arg(mbi, "burst", 0), echo = arg(mbi, "echo", 0), flood = arg(mbi, "flood", 0);
    u32 size = arg(mbi, "size", 60);
    if (size < 60 || size > 1514) {
        puts("virtionet: size must be 60 to 1514\n");
        return 2;
    }
    if (burst || flood) {
        /* Every slot's frame is written once (under PVM this kernel's
         * stores are emulated, one by one): each send changes only the
         * sequence number. */
        for (u16 slot = 0; slot < QSIZE; slot++) {
            u8 *f = txbuf[slot];
            for (int i = 0; i < HDR; i++) f[i] = 0;
            for (int i = 0; i < 6; i++) { f[HDR + i] = 0xff; f[HDR + 6 + i] = mac[i]; }
            f[HDR + 12] = 0x88; f[HDR + 13] = 0xb5;
            for (u32 i = 18; i < size; i++) f[HDR + i] = (u8)i;
        }
        for (u32 n = 0; flood || n < burst; n++) {
            wait_tx_room();
            u16 slot = txq.avail.idx % QSIZE;
            u8 *f = txbuf[slot];
            f[HDR + 14] = n >> 24; f[HDR + 15] = n >> 16; f[HDR + 16] = n >> 8; f[HDR + 17] = n;
            struct desc d = { (u32)txbuf[slot], HDR + size, 0, 0 };
            if (flood && (n & 3) == 1) d.addr = 0xfff00000u; /* past RAM */
            if (flood && (n & 3) == 2) d.len = 0x7fffffffu;  /* 2 GiB */
            if (flood && (n & 3) == 3) { d.flags = 1; d.next = slot; } /* a loop */
            send_desc(slot, d);
        }
        for (u32 spin = 0; txq.used.idx != txq.avail.idx; spin++) {
            if (spin > 100000000u) {
                puts("virtionet: the burst was never all used\n");
                return 3;
            }
            pause();
        }
        puts("virtionet: sent ");
        putdec(burst);
        puts(" frames\n");
        return 0;
    }

    for (u16 i = 0; i < QSIZE; i++) post_rx(i);
    u16 rx_seen = 0;
    for (u32 got = 0; got < echo;) {
        if (rxq.used.idx == rx_seen) {
            pause();
            continue;
        }
        barrier();
        u32 id = rxq.used.ring[rx_seen % QSIZE].id, len = rxq.used.ring[rx_seen % QSIZE].len;
        rx_seen++;
        u8 *in = rxbuf[id];
        u16 type = len > HDR + 14 ? (u16)(in[HDR + 12] << 8 | in[HDR + 13]) : 0;
        int ours = type == 0x88b5 || (type == 0x0800 && len > HDR + 24 && in[HDR + 23] == 17);
        if (!ours || len > BUF) {
            post_rx(id);
            continue;
        }
        if (got == 0) {
            puts("virtionet: first frame: hdr flags ");
            putdec(in[0]);
            puts(" gso ");
            putdec(in[1]);
            puts(" buffers ");
            putdec(in[10] | in[11] << 8);
            puts(" length ");
            putdec(len);
            putc('\n');
        }
        /* Sent back from the buffer it came in (no copy: under PVM this
         * kernel's stores are emulated, one by one): a clean header, the
         * sender's MAC as the destination. */
        for (int i = 0; i < HDR; i++) in[i] = 0;
        for (int i = 0; i < 6; i++) { in[HDR + i] = in[HDR + 6 + i]; in[HDR + 6 + i] = mac[i]; }
        wait_tx_room();
        send_desc(txq.avail.idx % QSIZE, (struct desc){ (u32)in, len, 0, 0 });
        for (u32 spin = 0; txq.used.idx != txq.avail.idx; spin++) {
            if (spin > 100000000u) {
                puts("virtionet: an echo was never used\n");
                return 3;
            }
            pause();
        }
        post_rx(id);
        got++;
    }
    puts("virtionet: echoed ");
    putdec(echo);
    puts(" frames\n");
    return 0;
}
