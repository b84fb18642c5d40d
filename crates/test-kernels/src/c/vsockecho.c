/* Drives brisk's first virtio device (virtio-mmio at 0xd0000000) as
 * virtio-vsock, polling its queues (0: receive, 1: transmit, 2: events),
 * no interrupts. It listens on guest port 1234 and sends back whatever a
 * connection sends (from the buffer it arrived in: under PVM this
 * kernel's stores are emulated one by one), and at start connects once
 * to host port 1235 and sends "vsockecho: hello\n" there (echoing on that
 * connection too). It answers SHUTDOWN with RST, CREDIT_REQUEST with
 * CREDIT_UPDATE, and drops what the host's credit has no room for. With
 * `hostile` on its command line it first sends bad packets (another
 * source CID, an unknown operation, a length past its buffer, data on a
 * connection that does not exist, a request to a host port nobody
 * listens on, more data than the credit allows) and carries on. It runs
 * until the host ends the VM. */
#include "virtio.h"

#define QSIZE VQ_SIZE
#define RXBUF 4096
#define HDR 44
#define BUF_ALLOC 65536u
#define LISTEN_PORT 1234
#define HOST_PORT 1235
#define MY_PORT 5000
#define MAXCONN 8

enum { OP_REQUEST = 1, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST };

struct hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

static struct vq rxq, txq, evq;
static u8 rxbuf[QSIZE][RXBUF] __attribute__((aligned(64)));
static u8 ctl[QSIZE][HDR + 32] __attribute__((aligned(64)));
static u32 evbuf;
/* Which receive buffer a transmit slot sends from (-1: a control buffer). */
static int tx_from_rx[QSIZE];
static u64 cid;

struct conn { int used; u32 local, peer, peer_buf_alloc, peer_fwd_cnt, tx_cnt, fwd_cnt; };
static struct conn conns[MAXCONN];

static void post_rx(u16 i)
{
    rxq.descs[i] = (struct vdesc){ (u32)rxbuf[i], RXBUF, VQ_WRITE, 0 };
    vq_publish(&rxq, 0, i);
}

static void post_event(void)
{
    evq.descs[0] = (struct vdesc){ (u32)&evbuf, 4, VQ_WRITE, 0 };
    vq_publish(&evq, 2, 0);
}

static u16 tx_seen;

/* Transmit slots the device used: receive buffers sent from go back. */
static void reclaim(void)
{
    u32 slot, len;
    while (vq_next_used(&txq, &tx_seen, &slot, &len)) {
        if (slot < QSIZE && tx_from_rx[slot] >= 0) {
            post_rx((u16)tx_from_rx[slot]);
            tx_from_rx[slot] = -1;
        }
    }
}

static u16 tx_slot(void)
{
    for (u32 spin = 0; (u16)(txq.avail.idx - tx_seen) >= QSIZE; spin++) {
        reclaim();
        if (spin > 100000000u) {
            puts("vsockecho: the device never used a transmit buffer\n");
            exit(3);
        }
        pause();
    }
    return txq.avail.idx % QSIZE;
}

static void fill(struct hdr *h, struct conn *c, u32 local, u32 peer, u16 op, u32 len)
{
    h->src_cid = cid;
    h->dst_cid = 2;
    h->src_port = local;
    h->dst_port = peer;
    h->len = len;
    h->type = 1;
    h->op = op;
    h->flags = 0;
    h->buf_alloc = BUF_ALLOC;
    h->fwd_cnt = c ? c->fwd_cnt : 0;
}

/* A packet from a control buffer, with `len` bytes of payload `data`. */
static void send_ctl(struct conn *c, u32 local, u32 peer, u16 op, const char *data, u32 len)
{
    u16 slot = tx_slot();
    struct hdr *h = (struct hdr *)ctl[slot];
    fill(h, c, local, peer, op, len);
    for (u32 i = 0; i < len; i++) ctl[slot][HDR + i] = data[i];
    txq.descs[slot] = (struct vdesc){ (u32)ctl[slot], HDR + len, 0, 0 };
    tx_from_rx[slot] = -1;
    if (c && op == OP_RW) c->tx_cnt += len;
    vq_publish(&txq, 1, slot);
}

static struct conn *find(u32 local, u32 peer)
{
    for (int i = 0; i < MAXCONN; i++)
        if (conns[i].used && conns[i].local == local && conns[i].peer == peer) return &conns[i];
    return 0;
}

static struct conn *add(u32 local, u32 peer, const struct hdr *h)
{
    for (int i = 0; i < MAXCONN; i++)
        if (!conns[i].used) {
            conns[i] = (struct conn){ 1, local, peer, h->buf_alloc, h->fwd_cnt, 0, 0 };
            return &conns[i];
        }
    return 0;
}

/* Bad packets: each one is the device's to refuse. */
static void hostile(void)
{
    struct hdr *h;
    u16 slot;
    for (int kind = 0; kind < 6; kind++) {
        slot = tx_slot();
        h = (struct hdr *)ctl[slot];
        fill(h, 0, 6000 + kind, 7000, OP_RW, 8);
        u32 len = HDR + 8;
        if (kind == 0) h->src_cid = 77;            /* not this guest */
        if (kind == 1) h->op = 42;                 /* no such operation */
        if (kind == 2) h->len = 100000;            /* past its buffer */
        /* kind 3: data on a connection that does not exist */
        if (kind == 4) { h->op = OP_REQUEST; h->len = 0; len = HDR; } /* nobody on port 7000 */
        if (kind == 5) { h->len = 0; len = 20; }  /* shorter than a header */
        txq.descs[slot] = (struct vdesc){ (u32)ctl[slot], len, 0, 0 };
        tx_from_rx[slot] = -1;
        vq_publish(&txq, 1, slot);
    }
    puts("vsockecho: sent bad packets\n");
}

int kmain(u32 magic, struct multiboot_info *mbi)
{
    (void)magic;
    virtio_begin(19, "vsockecho");
    virtio_accept(0, "vsockecho");
    cid = *(volatile u32 *)(VIRTIO_MMIO + 0x100) | (u64)*(volatile u32 *)(VIRTIO_MMIO + 0x104) << 32;
    vq_setup(0, &rxq, "vsockecho");
    vq_setup(1, &txq, "vsockecho");
    vq_setup(2, &evq, "vsockecho");
    virtio_driver_ok();
    for (int i = 0; i < QSIZE; i++) tx_from_rx[i] = -1;
    for (u16 i = 0; i < QSIZE; i++) post_rx(i);
    post_event();
    if (cmdline_arg(mbi, "hostile", 0)) hostile();
    puts("vsockecho: cid ");
    putdec(cid);
    puts(", listening on 1234\n");

    /* The one connection out. */
    struct hdr offer;
    fill(&offer, 0, MY_PORT, HOST_PORT, OP_REQUEST, 0);
    add(MY_PORT, HOST_PORT, &offer)->peer_buf_alloc = 0;
    send_ctl(0, MY_PORT, HOST_PORT, OP_REQUEST, 0, 0);

    u16 rx_seen = 0, ev_seen = 0;
    for (;;) {
        reclaim();
        if (evq.used.idx != ev_seen) {
            ev_seen = evq.used.idx;
            puts("vsockecho: transport reset\n");
            for (int i = 0; i < MAXCONN; i++) conns[i].used = 0;
            post_event();
        }
        u32 id, len;
        if (!vq_next_used(&rxq, &rx_seen, &id, &len)) {
            pause();
            continue;
        }
        struct hdr *h = (struct hdr *)rxbuf[id];
        if (len < HDR || h->len > len - HDR) {
            post_rx(id);
            continue;
        }
        u32 local = h->dst_port, peer = h->src_port;
        struct conn *c = find(local, peer);
        if (c) {
            c->peer_buf_alloc = h->buf_alloc;
            c->peer_fwd_cnt = h->fwd_cnt;
        }
        int reposted = 0;
        switch (h->op) {
        case OP_REQUEST:
            if (local == LISTEN_PORT && !c && (c = add(local, peer, h)))
                send_ctl(c, local, peer, OP_RESPONSE, 0, 0);
            else
                send_ctl(0, local, peer, OP_RST, 0, 0);
            break;
        case OP_RESPONSE:
            if (c && local == MY_PORT) {
                static const char hello[] = "vsockecho: hello\n";
                puts("vsockecho: connected to host port 1235\n");
                send_ctl(c, local, peer, OP_RW, hello, sizeof hello - 1);
            }
            break;
        case OP_RW:
            if (!c) {
                send_ctl(0, local, peer, OP_RST, 0, 0);
                break;
            }
            c->fwd_cnt += h->len;
            if (c->peer_buf_alloc - (c->tx_cnt - c->peer_fwd_cnt) >= h->len) {
                /* Back from the buffer it came in. */
                u32 n = h->len;
                u16 slot = tx_slot();
                fill(h, c, local, peer, OP_RW, n);
                c->tx_cnt += n;
                txq.descs[slot] = (struct vdesc){ (u32)rxbuf[id], HDR + n, 0, 0 };
                tx_from_rx[slot] = (int)id;
                vq_publish(&txq, 1, slot);
                reposted = 1;
            } else {
                send_ctl(c, local, peer, OP_CREDIT_REQUEST, 0, 0);
            }
            break;
        case OP_SHUTDOWN:
            if (c) c->used = 0;
            send_ctl(0, local, peer, OP_RST, 0, 0);
            break;
        case OP_RST:
            if (c) c->used = 0;
            break;
        case OP_CREDIT_REQUEST:
            if (c) send_ctl(c, local, peer, OP_CREDIT_UPDATE, 0, 0);
            break;
        default:
            break;
        }
        if (!reposted) post_rx(id);
    }
}
