//! PCI configuration mechanism #1 (ports 0xcf8-0xcff) with one device on
//! bus 0: a host bridge (as QEMU's i440FX: 8086:1237, class 06.00). A
//! kernel that probes PCI finds a working bus with nothing behind the
//! bridge; every other function reads all-ones ("no device").

use std::sync::Mutex;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

/// The address register's enable bit.
const ENABLE: u32 = 1 << 31;
/// Offset of the data window from the address register.
const DATA: u16 = 4;

/// The host bridge's configuration space header (the rest reads zero).
const fn host_bridge_config() -> [u8; 256] {
    let mut c = [0u8; 256];
    (c[0], c[1]) = (0x86, 0x80); // vendor: Intel
    (c[2], c[3]) = (0x37, 0x12); // device: 440FX
    c[8] = 0x02; // revision
    (c[0xa], c[0xb]) = (0x00, 0x06); // class: bridge, host bridge
    c
}
const CONFIG: [u8; 256] = host_bridge_config();

/// The mechanism #1 ports; its state is the address register.
#[derive(Default)]
pub struct PciHostBridge {
    address: Mutex<u32>,
}

impl PciHostBridge {
    /// The bytes `data` reads at `offset` (0-3) into the data window.
    fn read_config(&self, offset: u16, data: &mut [u8]) {
        let address = *self.address.lock().unwrap_or_else(|p| p.into_inner());
        // Bus 0, device 0, function 0: bits 23-8 all zero.
        if address & ENABLE == 0 || address & 0x00ff_ff00 != 0 {
            data.fill(0xff);
            return;
        }
        let reg = (address & 0xfc) as usize + offset as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = CONFIG.get(reg + i).copied().unwrap_or(0);
        }
    }
}

impl DevicePio for PciHostBridge {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => {
                let a = *self.address.lock().unwrap_or_else(|p| p.into_inner());
                data.copy_from_slice(&a.to_le_bytes());
            }
            DATA..=7 => self.read_config(offset - DATA, data),
            _ => data.fill(0xff),
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        // Only a 32-bit write sets the address (a byte write to 0xcfb is
        // mechanism #2's probe, which this bridge does not have); writes
        // to the configuration space are ignored: the bridge has nothing
        // to configure.
        if offset == 0 && data.len() == 4 {
            let v = u32::from_le_bytes(data.try_into().unwrap_or([0; 4]));
            *self.address.lock().unwrap_or_else(|p| p.into_inner()) = v;
        }
    }
}

impl crate::Stateful for PciHostBridge {
    const VERSION: u32 = 1;
    type State = u32;

    fn save(&self) -> u32 {
        *self.address.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn restore(&self, state: u32) -> Result<(), crate::InvalidState> {
        *self.address.lock().unwrap_or_else(|p| p.into_inner()) = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(d: &PciHostBridge, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        d.pio_read(PioAddress(0xcf8), offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn a_probe_finds_the_host_bridge_and_nothing_else() {
        let d = PciHostBridge::default();
        let base = PioAddress(0xcf8);
        // Linux's pci_check_type1: the address register reads back.
        d.pio_write(base, 0, &ENABLE.to_le_bytes());
        assert_eq!(read32(&d, 0), ENABLE);
        assert_eq!(read32(&d, DATA), 0x1237_8086);
        d.pio_write(base, 0, &(ENABLE | 0x08).to_le_bytes());
        assert_eq!(read32(&d, DATA) >> 16, 0x0600, "class: host bridge");
        let mut w = [0u8; 2];
        d.pio_read(base, DATA + 2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0600);
        // Device 1 on bus 0, and bus 1: nobody.
        d.pio_write(base, 0, &(ENABLE | 1 << 11).to_le_bytes());
        assert_eq!(read32(&d, DATA), 0xffff_ffff);
        d.pio_write(base, 0, &(ENABLE | 1 << 16).to_le_bytes());
        assert_eq!(read32(&d, DATA), 0xffff_ffff);
        // Disabled: all-ones; a byte write does not move the address.
        d.pio_write(base, 0, &0u32.to_le_bytes());
        assert_eq!(read32(&d, DATA), 0xffff_ffff);
        d.pio_write(base, 3, &[0x01]);
        assert_eq!(read32(&d, 0), 0);
        crate::state::tests::round_trip(&d, &PciHostBridge::default());
    }
}
