//! QEMU's pvpanic device (ACPI `QEMU0001`, one I/O port): a guest kernel
//! writes bit 0 when it panics, so the VMM can report the panic at once
//! instead of waiting for a reboot or a hang.

use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

use crate::{GuestStop, StopSink};

/// The kernel panicked.
const PANICKED: u8 = 1;
/// A crash kernel is loaded (it will take over): not an end.
const CRASH_LOADED: u8 = 2;

pub struct PvPanic {
    sink: Arc<dyn StopSink>,
}

impl PvPanic {
    pub fn new(sink: Arc<dyn StopSink>) -> Self {
        PvPanic { sink }
    }
}

impl DevicePio for PvPanic {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        // The events this device reports.
        data.fill(0);
        data[0] = PANICKED | CRASH_LOADED;
    }

    fn pio_write(&self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        let v = data.first().copied().unwrap_or(0);
        if v & PANICKED != 0 {
            self.sink.guest_stopped(GuestStop::Panic);
        } else if v & CRASH_LOADED != 0 {
            log::info!("the guest kernel crashed into its crash kernel");
        }
    }
}

crate::stateless!(PvPanic);
