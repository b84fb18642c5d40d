//! virtio devices over the virtio-mmio transport (version 2, "modern"),
//! on rust-vmm's `virtio-queue` (split virtqueues, descriptor chains,
//! readers and writers over guest memory) and `virtio-bindings`
//! (constants). [`mmio`] is the transport: registers, feature
//! negotiation, queue set-up, the interrupt status; a device ([`block`])
//! says what it offers and serves its queue when the driver notifies.

pub mod block;
pub mod mmio;

pub use block::DiskImage;
pub use mmio::{VirtioMmio, MMIO_SIZE};
