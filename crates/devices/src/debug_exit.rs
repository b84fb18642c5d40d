//! QEMU's isa-debug-exit: a write ends the VM with status `(v << 1) | 1`.

use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

use crate::{GuestStop, StopSink};

/// The debug-exit port (8, 16 or 32-bit writes).
pub struct DebugExit {
    sink: Arc<dyn StopSink>,
}

impl DebugExit {
    pub fn new(sink: Arc<dyn StopSink>) -> Self {
        DebugExit { sink }
    }
}

impl DevicePio for DebugExit {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn pio_write(&self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        self.sink
            .guest_stopped(GuestStop::DebugExit(crate::port_value(data)));
    }
}

crate::stateless!(DebugExit);
