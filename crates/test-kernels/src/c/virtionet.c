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
#include "virtio.h"

#define QSIZE VQ_SIZE
#define BUF 2048
#define HDR 12

static struct vq rxq, txq;
static u8 rxbuf[QSIZE][BUF] __attribute__((aligned(64)));
static u8 txbuf[QSIZE][BUF] __attribute__((aligned(64)));
static u8 mac[6];

/* Give receive buffer i to the device. */
static void post_rx(u16 i)
{
    rxq.descs[i] = (struct vdesc){ (u32)rxbuf[i], BUF, VQ_WRITE, 0 };
    vq_publish(&rxq, 0, i);
}


/* Publish descriptor `d` in transmit slot `slot` and notify (the caller
 * waited for a free slot). */
static void send_desc(u16 slot, struct vdesc d)
{
    txq.descs[slot] = d;
    vq_publish(&txq, 1, slot);
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
    u32 lo = virtio_begin(1, "virtionet");
    for (int i = 0; i < 6; i++) mac[i] = *(volatile u8 *)(VIRTIO_MMIO + 0x100 + i);
    u16 status = *(volatile u16 *)(VIRTIO_MMIO + 0x106);
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
    if (cmdline_arg(mbi, "offload", 0))
        want |= (1u << 0) | (1u << 1) | (1u << 7) | (1u << 8);
    if ((lo & want) != want) {
        puts("virtionet: a feature this kernel needs is not offered\n");
        return 2;
    }
    virtio_accept(want, "virtionet");
    vq_setup(0, &rxq, "virtionet");
    vq_setup(1, &txq, "virtionet");
    virtio_driver_ok();
    puts("virtionet: accepted ");
    puthex(want);
    putc('\n');

    u32 burst = cmdline_arg(mbi, "burst", 0), echo = cmdline_arg(mbi, "echo", 0), flood = cmdline_arg(mbi, "flood", 0);
    u32 size = cmdline_arg(mbi, "size", 60);
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
            struct vdesc d = { (u32)txbuf[slot], HDR + size, 0, 0 };
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
        u32 id, len;
        if (!vq_next_used(&rxq, &rx_seen, &id, &len)) {
            pause();
            continue;
        }
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
        send_desc(txq.avail.idx % QSIZE, (struct vdesc){ (u32)in, len, 0, 0 });
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
