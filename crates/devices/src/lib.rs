//! brisk's exit dispatch and devices (UART, debug-exit, power-off,
//! counters, and the user-irqchip interrupt sources: timers, doorbell).
//!
//! [`Bus`] routes PIO and MMIO exits to devices by address range. It is
//! built before the vCPUs start and only read afterwards, so dispatch takes
//! no lock of its own: a device that has state takes its own lock.
//!
//! ```
//! use std::sync::Arc;
//! use brisk_devices::{Bus, CounterDevice};
//!
//! let mut bus = Bus::new();
//! bus.register_pio(0x700, 4, Arc::new(CounterDevice::default())).unwrap();
//! let mut data = [0u8; 4];
//! bus.pio_read(0x700, &mut data);
//! bus.pio_read(0x700, &mut data);
//! assert_eq!(u32::from_le_bytes(data), 1);
//! bus.pio_read(0x1234, &mut data); // nobody there: all-ones
//! assert_eq!(data, [0xff; 4]);
//! assert_eq!(bus.unclaimed_accesses(), 1);
//! ```

/// Log a warning a guest can cause as often as it likes, without letting
/// it flood the log: each call site logs its first 8 occurrences, then
/// only the 16th, 32nd, 64th... with the count so far.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)*) => {{
        static SEEN: ::std::sync::atomic::AtomicU64 = ::std::sync::atomic::AtomicU64::new(0);
        let n = SEEN.fetch_add(1, ::std::sync::atomic::Ordering::Relaxed) + 1;
        if n <= 8 {
            log::warn!($($arg)*);
        } else if n.is_power_of_two() {
            log::warn!("{} ({n} times so far; the rest not logged)", format_args!($($arg)*));
        }
    }};
}

pub mod apic;
mod bus;
mod cmos;
mod counter;
mod debug_exit;
mod doorbell;
mod fw_cfg;
mod i8042;
pub mod io_engine;
mod irq;
mod manager;
mod pci_host;
mod pm_timer;
mod power;
mod pvpanic;
pub mod rate_limiter;
mod serial;
mod state;
mod timer;
pub mod virtio;

pub use apic::{Apics, Ioapic, IoapicLine, Lapic, Pic};
pub use bus::{Bus, BusError};
pub use cmos::{Cmos, CmosState};
pub use counter::CounterDevice;
pub use debug_exit::DebugExit;
pub use doorbell::Doorbell;
pub use fw_cfg::{keys as fw_cfg_keys, FwCfg};
pub use i8042::{I8042, I8042_COMMAND};
pub use io_engine::{Budget, IoEngine, IoEngineError, IoWork, NotParked, Served};
pub use irq::{InterruptSink, IrqLine};
pub use manager::{DeviceManager, IoRange};
pub use pci_host::PciHostBridge;
pub use pm_timer::{PmTimer, PmTimerState, PM_TIMER_HZ};
pub use power::PowerOff;
pub use pvpanic::PvPanic;
pub use rate_limiter::{Limit, RateLimiter};
pub use serial::{Uart, UartState};
pub use state::{DeviceState, InvalidState, NoState, SaveRestore, StateError, Stateful};
pub use timer::{PeriodicTimers, TimerPorts, TimerState, TIMER_STRIDE};

/// Why a device ended the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestStop {
    /// The guest powered off (ACPI PM1a_CNT SLP_EN).
    PowerOff,
    /// The guest wrote this value to the debug-exit port.
    DebugExit(u32),
    /// The guest reset the machine (i8042 command 0xFE).
    Reset,
    /// The guest kernel reported a panic (pvpanic).
    Panic,
}

/// Where devices report that the guest asked to stop. The VMM implements
/// it; it must not block (it is called on a vCPU thread).
pub trait StopSink: Send + Sync {
    fn guest_stopped(&self, why: GuestStop);
}

/// A port access's data as a little-endian value (1, 2 or 4 bytes).
pub(crate) fn port_value(data: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    let n = data.len().min(4);
    v[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(v)
}

/// Answer a port read with `v`, little-endian, truncated to the access size.
pub(crate) fn put_port_value(data: &mut [u8], v: u32) {
    let n = data.len().min(4);
    data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
}
