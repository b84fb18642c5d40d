//! The ACPI PM timer: a free-running 24-bit counter at 3.579545 MHz, read
//! with a 32-bit `in`. Derived from the host's monotonic clock, so it
//! advances at the right rate whatever the vCPUs do.

use std::time::Instant;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

/// The PM timer's frequency in Hz.
pub const PM_TIMER_HZ: u64 = 3_579_545;

pub struct PmTimer {
    start: Instant,
}

impl Default for PmTimer {
    fn default() -> Self {
        PmTimer {
            start: Instant::now(),
        }
    }
}

impl PmTimer {
    /// The counter's current value.
    pub fn value(&self) -> u32 {
        let ns = self.start.elapsed().as_nanos();
        ((ns * u128::from(PM_TIMER_HZ) / 1_000_000_000) & 0xff_ffff) as u32
    }
}

impl DevicePio for PmTimer {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        crate::put_port_value(data, self.value());
    }

    fn pio_write(&self, _base: PioAddress, _offset: PioAddressOffset, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_at_24_bits() {
        let t = PmTimer {
            start: Instant::now() - std::time::Duration::from_secs(5),
        };
        // 5 s is 17.9 M ticks: past 2^24, so it has wrapped once.
        let v = t.value();
        assert!(v < 1 << 24);
        let expect = (5 * PM_TIMER_HZ) & 0xff_ffff;
        assert!(
            (u64::from(v)).abs_diff(expect) < PM_TIMER_HZ / 10,
            "{v} vs {expect}"
        );
    }
}
