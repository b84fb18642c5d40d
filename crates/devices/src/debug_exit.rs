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

/// No state: what it does is fixed when it is made.
impl crate::Stateful for DebugExit {
    const VERSION: u32 = 1;
    type State = crate::NoState;

    fn save(&self) -> crate::NoState {
        crate::NoState {}
    }

    fn restore(&self, _: crate::NoState) -> Result<(), String> {
        Ok(())
    }
}
