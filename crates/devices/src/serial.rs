//! A 16550 UART (vm-superio) writing the guest's output to a writer.

use std::io::Write;
use std::sync::Mutex;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vm_superio::{Serial, Trigger};

/// No interrupt line yet: transmit-empty and receive interrupts go nowhere
/// (guests poll LSR).
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// The UART: eight registers from its base port.
pub struct Uart {
    serial: Mutex<Serial<NoIrq, vm_superio::serial::NoEvents, Box<dyn Write + Send>>>,
}

impl Uart {
    /// A UART whose transmitted bytes go to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Uart {
            serial: Mutex::new(Serial::new(NoIrq, out)),
        }
    }
}

impl DevicePio for Uart {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if offset > 7 || data.is_empty() {
            data.fill(0xff);
            return;
        }
        let mut s = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        data[0] = s.read(offset as u8);
        data[1..].fill(0);
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset > 7 || data.is_empty() {
            return;
        }
        let mut s = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        // An output error (closed stdout) must not stop the guest.
        if let Err(e) = s.write(offset as u8, data[0]) {
            log::debug!("UART output failed: {e:?}");
        }
    }
}
