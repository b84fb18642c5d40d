//! ACPI PM1a control register: the guest powers off by setting SLP_EN.

use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

use crate::{GuestStop, StopSink};

const SLP_EN: u16 = 1 << 13;

/// PM1a_CNT. Any sleep request (SLP_EN) is taken as power-off: brisk has
/// no suspend states.
pub struct PowerOff {
    sink: Arc<dyn StopSink>,
}

impl PowerOff {
    pub fn new(sink: Arc<dyn StopSink>) -> Self {
        PowerOff { sink }
    }
}

impl DevicePio for PowerOff {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset != 0 || data.len() < 2 {
            return;
        }
        if u16::from_le_bytes([data[0], data[1]]) & SLP_EN != 0 {
            self.sink.guest_stopped(GuestStop::PowerOff);
        }
    }
}

crate::stateless!(PowerOff);
