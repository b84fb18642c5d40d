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
/// The command/status port (the data port is 0x60). Each is its own
/// one-port range: 0x61 between them is port B (the PIT's channel 2 gate).
pub const I8042_COMMAND: u16 = 0x64;

/// The i8042 at 0x60 (data) and 0x64 (command/status).
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

    fn pio_write(&self, base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        if base.0 == I8042_COMMAND && data.first() == Some(&CMD_RESET) {
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
        let (data, command) = (PioAddress(0x60), PioAddress(I8042_COMMAND));
        k.pio_write(data, 0, &[CMD_RESET]); // the data port: a keyboard byte
        k.pio_write(command, 0, &[0xad]); // disable keyboard
        let mut status = [0xffu8];
        k.pio_read(command, 0, &mut status);
        assert_eq!(
            status,
            [0],
            "a kernel waits for bit 1 (input full) to clear"
        );
        assert!(stops.0.lock().unwrap().is_empty());
        k.pio_write(command, 0, &[CMD_RESET]);
        assert_eq!(*stops.0.lock().unwrap(), [GuestStop::Reset]);
    }
}
