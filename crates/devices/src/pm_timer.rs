//! The ACPI PM timer: a free-running 24-bit counter at 3.579545 MHz, read
//! with a 32-bit `in`. Derived from the host's monotonic clock, so it
//! advances at the right rate whatever the vCPUs do.

use std::time::Instant;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

/// The PM timer's frequency in Hz.
pub const PM_TIMER_HZ: u64 = 3_579_545;

pub struct PmTimer {
    epoch: Instant,
    /// Nanoseconds to subtract from `epoch.elapsed()` (a restore moves the
    /// count back to what was saved); an atomic, so a read takes no lock.
    offset_ns: std::sync::atomic::AtomicI64,
}

impl Default for PmTimer {
    fn default() -> Self {
        PmTimer {
            epoch: Instant::now(),
            offset_ns: std::sync::atomic::AtomicI64::new(0),
        }
    }
}

impl PmTimer {
    /// The counter's current value.
    pub fn value(&self) -> u32 {
        (self.ticks() & 0xff_ffff) as u32
    }

    /// Ticks since the timer started (not wrapped).
    fn ticks(&self) -> u64 {
        let off = self.offset_ns.load(std::sync::atomic::Ordering::Relaxed);
        let ns = (self.epoch.elapsed().as_nanos() as i128 - i128::from(off)).max(0) as u128;
        (ns * u128::from(PM_TIMER_HZ) / 1_000_000_000) as u64
    }
}

impl DevicePio for PmTimer {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        crate::put_port_value(data, self.value());
    }

    fn pio_write(&self, _base: PioAddress, _offset: PioAddressOffset, _data: &[u8]) {}
}

/// The count at the save and the host's wall clock then: a restored timer
/// goes on from the count moved on by the time since, as kvmclock and the
/// TSC do (the guest's clocks agree).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PmTimerState {
    pub ticks: u64,
    /// CLOCK_REALTIME in ns at the save.
    pub saved_at_ns: u64,
}

fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
}

impl crate::Stateful for PmTimer {
    /// 2: the wall clock at the save (version 1 had the count alone, and
    /// a restored count lagged the other clocks by the time saved).
    const VERSION: u32 = 2;
    type State = PmTimerState;

    fn save(&self) -> PmTimerState {
        PmTimerState {
            ticks: self.ticks(),
            saved_at_ns: realtime_ns(),
        }
    }

    fn restore(&self, s: PmTimerState) -> Result<(), crate::InvalidState> {
        let since = realtime_ns().saturating_sub(s.saved_at_ns);
        let ticks = s.ticks;
        let want = u128::from(ticks) * 1_000_000_000 / u128::from(PM_TIMER_HZ) + u128::from(since);
        let off = self.epoch.elapsed().as_nanos() as i128 - want as i128;
        let off = i64::try_from(off).map_err(|_| crate::InvalidState::Range {
            what: "the PM timer's count".into(),
            value: ticks.to_string(),
            allowed: "it must be within 2^63 ns of now".into(),
        })?;
        self.offset_ns
            .store(off, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_the_count_goes_on() {
        use crate::SaveRestore;
        let a = PmTimer {
            epoch: Instant::now() - std::time::Duration::from_secs(2),
            offset_ns: Default::default(),
        };
        let b = PmTimer::default();
        let saved = a.save_state();
        b.restore_state("pm", &saved).unwrap();
        let (was, now) = (saved.data["ticks"].as_u64().unwrap(), b.ticks());
        assert!(now >= was, "{now} < {was}");
        assert!(matches!(
            b.restore_state(
                "pm",
                &crate::DeviceState {
                    version: 9,
                    ..saved
                }
            ),
            Err(crate::StateError::Version { .. })
        ));
    }

    #[test]
    fn wraps_at_24_bits() {
        let t = PmTimer {
            epoch: Instant::now() - std::time::Duration::from_secs(5),
            offset_ns: Default::default(),
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
