//! virtio devices over the virtio-mmio transport (version 2, "modern"),
//! on rust-vmm's `virtio-queue` (split virtqueues, descriptor chains,
//! readers and writers over guest memory) and `virtio-bindings`
//! (constants). [`mmio`] is the transport: registers, feature
//! negotiation, queue set-up, the interrupt status, and the hand-over of
//! notifications to the I/O engine; a device ([`block`], [`net`]) says
//! what it offers and serves its queues.

pub mod block;
pub mod mmio;
pub mod net;
pub mod tap;
pub mod vsock;

pub use block::DiskImage;
pub use mmio::{Notify, VirtioMmio, MMIO_SIZE, QUEUE_NOTIFY};
pub use net::{Mac, Net};
pub use tap::{Tap, TapError};
pub use vsock::{Vsock, VsockError};

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};

/// How many chains the driver has made available that the device has not
/// taken, read once from avail.idx; `None` if the ring cannot be read.
/// A hostile count (more than the queue holds) is capped to the queue's
/// size: popping stops where the chains end.
pub(crate) fn pending(queue: &Queue, mem: &mmio::GuestRam) -> Option<u16> {
    let avail = queue.avail_idx(mem, Ordering::Acquire).ok()?;
    Some((avail - Wrapping(queue.next_avail())).0.min(queue.size()))
}

/// Answer a read of a device's configuration space at `offset` from its
/// bytes `config` (past its end: zeros).
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| config.get(o.checked_add(i)?))
            .copied()
            .unwrap_or(0);
    }
}

/// [`crate::Served::More`] if chains are still available, else `Done`.
pub(crate) fn more(queue: &Queue, mem: &mmio::GuestRam) -> crate::Served {
    match pending(queue, mem) {
        Some(n) if n > 0 => crate::Served::More,
        _ => crate::Served::Done,
    }
}
