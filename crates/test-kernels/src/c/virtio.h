/* virtio-mmio (modern, version 2) for the polling test kernels: the first
 * device's registers, a split virtqueue of VQ_SIZE entries, and the
 * driver's side of feature negotiation and queue set-up. */
#ifndef VIRTIO_H
#define VIRTIO_H
#include "lib.h"

#define VIRTIO_MMIO 0xd0000000u
#define VREG(o) (*(volatile u32 *)(VIRTIO_MMIO + (o)))
#define VQ_SIZE 16
#define VQ_WRITE 2 /* VIRTQ_DESC_F_WRITE: the device writes the buffer */

struct vdesc { u64 addr; u32 len; u16 flags, next; };

struct vq {
    struct vdesc descs[VQ_SIZE] __attribute__((aligned(16)));
    struct { u16 flags, idx, ring[VQ_SIZE], used_event; } avail __attribute__((aligned(2)));
    struct { u16 flags, idx; struct { u32 id, len; } ring[VQ_SIZE]; u16 avail_event; } used __attribute__((aligned(4)));
};

#define barrier() __asm__ volatile("" ::: "memory")

/* Reset the first device and check it is modern virtio-mmio of device
 * `type` offering VERSION_1; returns its low feature word. `who` names
 * the kernel in what it prints; a mismatch exits 2. */
u32 virtio_begin(u32 type, const char *who);
/* Accept VERSION_1 and `features` (low word); refused: exit 2. */
void virtio_accept(u32 features, const char *who);
/* Set up queue `index` on `q`, interrupts suppressed (the kernel polls). */
void vq_setup(u32 index, struct vq *q, const char *who);
/* DRIVER_OK: the device may use the queues. */
void virtio_driver_ok(void);
/* Make descriptor `slot` available on queue `index` and notify. */
void vq_publish(struct vq *q, u32 index, u16 slot);
/* The next entry the device used on `q` past `*seen` (advanced): its
 * descriptor id and length; 0 if there is none yet. */
int vq_next_used(struct vq *q, u16 *seen, u32 *id, u32 *len);
/* The value of `key=N` on the command line (1 for a bare `key`), or `def`. */
u32 cmdline_arg(const struct multiboot_info *mbi, const char *key, u32 def);

#endif
