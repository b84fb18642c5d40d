//! PIO and MMIO buses keyed by address range, with accounting of accesses
//! nobody claims.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};

/// A device could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// At `base .. base + len` (in `space`): overlapping or empty.
    #[error("{space} {base:#x}+{len}: {source:?}")]
    Range {
        space: &'static str,
        base: u64,
        len: u64,
        #[source]
        source: vm_device::bus::Error,
    },
    /// Another device already has this name.
    #[error("a device named '{0}' already exists")]
    Name(String),
}

/// The VM's buses.
#[derive(Default)]
pub struct Bus {
    io: IoManager,
    unclaimed: AtomicU64,
    /// Addresses already logged (only touched when debug logging is on).
    logged: Mutex<HashSet<(bool, u64)>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Route ports `base .. base + len` to `dev`.
    pub fn register_pio(
        &mut self,
        base: u16,
        len: u16,
        dev: Arc<dyn DevicePio + Send + Sync>,
    ) -> Result<(), BusError> {
        let err = |source| BusError::Range {
            space: "ports",
            base: base.into(),
            len: len.into(),
            source,
        };
        let range = PioRange::new(PioAddress(base), len).map_err(err)?;
        self.io.register_pio(range, dev).map_err(err)
    }

    /// Route addresses `base .. base + len` to `dev`.
    pub fn register_mmio(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<dyn DeviceMmio + Send + Sync>,
    ) -> Result<(), BusError> {
        let err = |source| BusError::Range {
            space: "MMIO",
            base,
            len,
            source,
        };
        let range = MmioRange::new(MmioAddress(base), len).map_err(err)?;
        self.io.register_mmio(range, dev).map_err(err)
    }

    /// Port read; all-ones where no device answers.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if self.io.pio_read(PioAddress(port), data).is_err() {
            data.fill(0xff);
            self.unclaimed(false, port as u64, "read");
        }
    }

    /// Port write; ignored where no device answers.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if self.io.pio_write(PioAddress(port), data).is_err() {
            self.unclaimed(false, port as u64, "write");
        }
    }

    /// MMIO read; all-ones where no device answers.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if self.io.mmio_read(MmioAddress(addr), data).is_err() {
            data.fill(0xff);
            self.unclaimed(true, addr, "read");
        }
    }

    /// MMIO write; ignored where no device answers.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if self.io.mmio_write(MmioAddress(addr), data).is_err() {
            self.unclaimed(true, addr, "write");
        }
    }

    /// Accesses (PIO and MMIO) that no device claimed.
    pub fn unclaimed_accesses(&self) -> u64 {
        self.unclaimed.load(Relaxed)
    }

    fn unclaimed(&self, mmio: bool, addr: u64, what: &str) {
        self.unclaimed.fetch_add(1, Relaxed);
        // The set is only taken with debug logging on, so a guest storming
        // an unknown port costs one relaxed add per access otherwise.
        if log::log_enabled!(log::Level::Debug) {
            let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
            if logged.insert((mmio, addr)) {
                let space = if mmio { "MMIO address" } else { "port" };
                log::debug!("unclaimed {what} at {space} {addr:#x} (logged once per address)");
            }
        }
    }
}
