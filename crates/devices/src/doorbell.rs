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
        crate::put_port_value(data, self.rings() as u32);
    }

    fn pio_write(&self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        let v = crate::port_value(data);
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
