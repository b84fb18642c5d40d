//! The PC keyboard controller, only as far as a kernel uses it without a
//! keyboard: its status port reads "nothing to read, ready for a command",
//! and command 0xFE (pulse the reset line) resets the machine. Linux's
//! `reboot=k` reboots this way.

use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

use crate::{GuestStop, StopSink};

/// The command that pulses the CPU's reset line.
const CMD_RESET: u8 = 0xfe;
/// Offset of the command/status port (0x64) from the data port (0x60).
pub const I8042_COMMAND_OFFSET: u16 = 4;

/// The i8042 at 0x60 (data) - 0x64 (command/status).
pub struct I8042 {
    sink: Arc<dyn StopSink>,
}

impl I8042 {
    pub fn new(sink: Arc<dyn StopSink>) -> Self {
        I8042 { sink }
    }
}

impl DevicePio for I8042 {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty. Data: nothing.
        data.fill(0);
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset == I8042_COMMAND_OFFSET && data.first() == Some(&CMD_RESET) {
            self.sink.guest_stopped(GuestStop::Reset);
        }
    }
}

crate::stateless!(I8042);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Stops(Mutex<Vec<GuestStop>>);
    impl StopSink for Stops {
        fn guest_stopped(&self, why: GuestStop) {
            self.0.lock().unwrap().push(why);
        }
    }

    #[test]
    fn only_command_0xfe_on_the_command_port_resets() {
        let stops = Arc::new(Stops::default());
        let k = I8042::new(stops.clone());
        let base = PioAddress(0x60);
        k.pio_write(base, 0, &[CMD_RESET]); // the data port: a keyboard byte
        k.pio_write(base, 4, &[0xad]); // disable keyboard
        let mut status = [0xffu8];
        k.pio_read(base, 4, &mut status);
        assert_eq!(
            status,
            [0],
            "a kernel waits for bit 1 (input full) to clear"
        );
        assert!(stops.0.lock().unwrap().is_empty());
        k.pio_write(base, 4, &[CMD_RESET]);
        assert_eq!(*stops.0.lock().unwrap(), [GuestStop::Reset]);
    }
}
