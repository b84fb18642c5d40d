//! An inter-vCPU doorbell: a port write that raises an interrupt on
//! another (or the same) vCPU.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

use crate::InterruptSink;

/// Write `(target_vcpu << 8) | vector` (16 or 32 bits). Reads return the
/// number of rings delivered so far (32 bits).
pub struct Doorbell {
    sink: Arc<dyn InterruptSink>,
    rings: AtomicU64,
    dropped: AtomicU64,
}

impl Doorbell {
    pub fn new(sink: Arc<dyn InterruptSink>) -> Self {
        Doorbell {
            sink,
            rings: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Rings delivered.
    pub fn rings(&self) -> u64 {
        self.rings.load(Relaxed)
    }

    /// Rings aimed at a vCPU that does not exist.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}

impl DevicePio for Doorbell {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        let v = (self.rings() as u32).to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&v[..n]);
    }

    fn pio_write(&self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(v);
        let (target, vector) = ((v >> 8) as usize & 0xff, v as u8);
        if self.sink.raise(target, vector) {
            self.rings.fetch_add(1, Relaxed);
        } else {
            if self.dropped.fetch_add(1, Relaxed) == 0 {
                log::warn!("doorbell: no vCPU {target}; ring dropped (further drops not logged)");
            }
        }
    }
}
