//! A device whose every read returns the next value of a counter.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

/// Read: the next value (0, 1, 2, ...), little-endian, truncated to the
/// access size. Writes set the counter. Used by the `pio` guest and the
/// exit-path benchmarks: one per vCPU, so vCPUs never share a cache line.
#[derive(Debug, Default)]
pub struct CounterDevice {
    next: AtomicU32,
}

impl CounterDevice {
    /// How many reads it has answered (since the last write).
    pub fn value(&self) -> u32 {
        self.next.load(Relaxed)
    }
}

impl DevicePio for CounterDevice {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        crate::put_port_value(data, self.next.fetch_add(1, Relaxed));
    }

    fn pio_write(&self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        self.next.store(crate::port_value(data), Relaxed);
    }
}

impl crate::Stateful for CounterDevice {
    const VERSION: u32 = 1;
    type State = u32;

    fn save(&self) -> u32 {
        self.next.load(Relaxed)
    }

    fn restore(&self, next: u32) -> Result<(), crate::InvalidState> {
        self.next.store(next, Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let (a, b) = (CounterDevice::default(), CounterDevice::default());
        let mut d = [0u8; 4];
        for _ in 0..5 {
            a.pio_read(PioAddress(0), 0, &mut d);
        }
        crate::state::tests::round_trip(&a, &b);
        b.pio_read(PioAddress(0), 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 5, "continues where it was");
    }
}
