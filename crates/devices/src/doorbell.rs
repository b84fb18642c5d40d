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
    vcpus: usize,
    rings: AtomicU64,
    dropped: AtomicU64,
}

impl Doorbell {
    /// A doorbell ringing `vcpus` vCPUs through `sink`.
    pub fn new(sink: Arc<dyn InterruptSink>, vcpus: usize) -> Self {
        Doorbell {
            sink,
            vcpus,
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
        if target < self.vcpus {
            // Counted before the raise: once the target takes it (and, say,
            // powers the VM off), the count already includes it.
            self.rings.fetch_add(1, Relaxed);
            self.sink.raise(target, vector);
        } else {
            if self.dropped.fetch_add(1, Relaxed) == 0 {
                log::warn!("doorbell: no vCPU {target}; ring dropped (further drops not logged)");
            }
        }
    }
}

/// Rings delivered and dropped (statistics the guest can read back).
impl crate::Stateful for Doorbell {
    const VERSION: u32 = 1;
    type State = (u64, u64);

    fn save(&self) -> (u64, u64) {
        (self.rings(), self.dropped())
    }

    fn restore(&self, (rings, dropped): (u64, u64)) -> Result<(), crate::InvalidState> {
        self.rings.store(rings, Relaxed);
        self.dropped.store(dropped, Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nowhere;
    impl InterruptSink for Nowhere {
        fn raise(&self, vcpu: usize, _vector: u8) -> bool {
            vcpu == 0
        }
    }

    #[test]
    fn state_round_trips() {
        let (a, b) = (
            Doorbell::new(Arc::new(Nowhere), 1),
            Doorbell::new(Arc::new(Nowhere), 1),
        );
        a.pio_write(PioAddress(0), 0, &0x21u32.to_le_bytes());
        a.pio_write(PioAddress(0), 0, &0x0321u32.to_le_bytes()); // no vCPU 3
        let saved = crate::state::tests::round_trip(&a, &b);
        assert_eq!(saved.data, serde_json::json!([1, 1]));
    }
}
