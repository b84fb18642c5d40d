//! QEMU's fw_cfg, I/O-port interface: write a 16-bit key to the selector
//! port, then read the item's bytes one at a time from the data port.

use std::collections::BTreeMap;
use std::sync::Mutex;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

/// The keys brisk provides (QEMU's numbering).
pub mod keys {
    pub const SIGNATURE: u16 = 0x00;
    pub const ID: u16 = 0x01;
    pub const RAM_SIZE: u16 = 0x03;
    pub const NB_CPUS: u16 = 0x05;
    pub const MAX_CPUS: u16 = 0x0f;
    /// kvm-unit-tests' name for the memory limit it may use.
    pub const MAX_RAM: u16 = 0x11;
    pub const FILE_DIR: u16 = 0x19;
    /// File items are numbered from here.
    pub const FILE_FIRST: u16 = 0x20;
}

/// Items, the selected one and the read offset. Unknown keys read zeros.
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    cursor: Mutex<(u16, usize)>,
}

impl FwCfg {
    /// The standard items for `cpus` vCPUs and `ram` bytes, and `files`
    /// (name, contents) in the file directory.
    pub fn new(cpus: u16, ram: u64, files: &[(&str, Vec<u8>)]) -> Self {
        let mut items = BTreeMap::new();
        items.insert(keys::SIGNATURE, b"QEMU".to_vec());
        items.insert(keys::ID, 1u32.to_le_bytes().to_vec()); // traditional interface
        items.insert(keys::RAM_SIZE, ram.to_le_bytes().to_vec());
        items.insert(keys::MAX_RAM, ram.to_le_bytes().to_vec());
        items.insert(keys::NB_CPUS, cpus.to_le_bytes().to_vec());
        items.insert(keys::MAX_CPUS, cpus.to_le_bytes().to_vec());
        // Directory: big-endian count, then {size BE32, key BE16, 0u16, name[56]}.
        let mut dir = (files.len() as u32).to_be_bytes().to_vec();
        for (i, (name, data)) in files.iter().enumerate() {
            let key = keys::FILE_FIRST + i as u16;
            dir.extend_from_slice(&(data.len() as u32).to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut n = [0u8; 56];
            let len = name.len().min(55);
            n[..len].copy_from_slice(&name.as_bytes()[..len]);
            dir.extend_from_slice(&n);
            items.insert(key, data.clone());
        }
        items.insert(keys::FILE_DIR, dir);
        FwCfg {
            items,
            cursor: Mutex::new((0, 0)),
        }
    }
}

impl DevicePio for FwCfg {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let mut cursor = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        if offset != 1 {
            data.fill(0);
            return;
        }
        let item = self.items.get(&cursor.0).map(Vec::as_slice).unwrap_or(&[]);
        for b in data.iter_mut() {
            *b = item.get(cursor.1).copied().unwrap_or(0);
            cursor.1 += 1;
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset == 0 && data.len() >= 2 {
            *self.cursor.lock().unwrap_or_else(|p| p.into_inner()) =
                (u16::from_le_bytes([data[0], data[1]]), 0);
        }
    }
}

/// The selected item and the read offset (the items are fixed at
/// creation, from the configuration).
impl crate::Stateful for FwCfg {
    const VERSION: u32 = 1;
    type State = (u16, usize);

    fn save(&self) -> (u16, usize) {
        *self.cursor.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn restore(&self, cursor: (u16, usize)) -> Result<(), crate::InvalidState> {
        // An offset past the item could only come from a corrupt state (and
        // would overflow as the guest reads on).
        let len = self.items.get(&cursor.0).map_or(0, Vec::len);
        if cursor.1 > len {
            return Err(crate::InvalidState::Range {
                what: format!("the offset in item {:#x}", cursor.0),
                value: cursor.1.to_string(),
                allowed: format!("the item has {len} bytes"),
            });
        }
        *self.cursor.lock().unwrap_or_else(|p| p.into_inner()) = cursor;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(f: &FwCfg, key: u16, n: usize) -> Vec<u8> {
        f.pio_write(PioAddress(0), 0, &key.to_le_bytes());
        let mut out = vec![0u8; n];
        for b in out.iter_mut() {
            let mut one = [0u8];
            f.pio_read(PioAddress(0), 1, &mut one);
            *b = one[0];
        }
        out
    }

    #[test]
    fn items_read_back_as_qemu_lays_them_out() {
        let f = FwCfg::new(4, 64 << 20, &[("etc/brisk", b"hi".to_vec())]);
        assert_eq!(read(&f, keys::SIGNATURE, 4), b"QEMU");
        assert_eq!(read(&f, keys::NB_CPUS, 2), 4u16.to_le_bytes());
        assert_eq!(read(&f, keys::RAM_SIZE, 8), (64u64 << 20).to_le_bytes());
        let dir = read(&f, keys::FILE_DIR, 4 + 64);
        assert_eq!(&dir[..4], &1u32.to_be_bytes());
        assert_eq!(&dir[8..10], &keys::FILE_FIRST.to_be_bytes());
        assert!(dir[12..].starts_with(b"etc/brisk\0"));
        assert_eq!(
            read(&f, keys::FILE_FIRST, 3),
            b"hi\0",
            "past the end reads 0"
        );
        assert_eq!(read(&f, 0x7777, 2), [0, 0], "unknown keys read 0");
    }

    #[test]
    fn state_round_trips_mid_item() {
        let (a, b) = (FwCfg::new(2, 1 << 20, &[]), FwCfg::new(2, 1 << 20, &[]));
        a.pio_write(PioAddress(0), 0, &keys::SIGNATURE.to_le_bytes());
        let mut one = [0u8];
        a.pio_read(PioAddress(0), 1, &mut one);
        crate::state::tests::round_trip(&a, &b);
        b.pio_read(PioAddress(0), 1, &mut one);
        assert_eq!(one[0], b'E', "the second byte of QEMU");
        use crate::SaveRestore;
        let corrupt = crate::DeviceState {
            version: 1,
            data: serde_json::json!([0, usize::MAX]),
        };
        assert!(b.restore_state("fw_cfg", &corrupt).is_err());
    }
}
