//! The device manager: the devices of one VM, each with its name and its
//! address ranges, on the bus it owns. The platform registers them from
//! its list; snapshots save and restore them through it, by name.

use std::collections::BTreeMap;
use std::sync::Arc;

use vm_device::{DeviceMmio, DevicePio};

use crate::{Bus, BusError, DeviceState, SaveRestore, StateError};

/// Where a device answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoRange {
    Pio { base: u16, len: u16 },
    Mmio { base: u64, len: u64 },
}

struct Entry {
    name: String,
    ranges: Vec<IoRange>,
    state: Arc<dyn SaveRestore>,
}

/// The devices and their bus.
#[derive(Default)]
pub struct DeviceManager {
    bus: Bus,
    devices: Vec<Entry>,
}

impl DeviceManager {
    pub fn new() -> Self {
        Self::default()
    }

    /// Put `dev` on ports `base .. base + len` under `name` (unique: a
    /// name already given to another device is refused; the same device
    /// may answer at more than one range).
    pub fn add_pio<D>(
        &mut self,
        name: &str,
        base: u16,
        len: u16,
        dev: Arc<D>,
    ) -> Result<(), BusError>
    where
        D: DevicePio + SaveRestore + Send + Sync + 'static,
    {
        self.check_name(name, &(dev.clone() as Arc<dyn SaveRestore>))?;
        self.bus.register_pio(base, len, dev.clone())?;
        self.push(name, IoRange::Pio { base, len }, dev);
        Ok(())
    }

    /// Put `dev` at MMIO `base .. base + len` under `name` (unique).
    pub fn add_mmio<D>(
        &mut self,
        name: &str,
        base: u64,
        len: u64,
        dev: Arc<D>,
    ) -> Result<(), BusError>
    where
        D: DeviceMmio + SaveRestore + Send + Sync + 'static,
    {
        self.check_name(name, &(dev.clone() as Arc<dyn SaveRestore>))?;
        self.bus.register_mmio(base, len, dev.clone())?;
        self.push(name, IoRange::Mmio { base, len }, dev);
        Ok(())
    }

    /// Keep `dev`'s state under `name` for snapshots, for a device with
    /// no address on the bus (each vCPU's LAPIC, reached from its own
    /// exits).
    pub fn add_state<D>(&mut self, name: &str, dev: Arc<D>) -> Result<(), BusError>
    where
        D: SaveRestore + 'static,
    {
        let dev: Arc<dyn SaveRestore> = dev;
        self.check_name(name, &dev)?;
        if self.devices.iter().any(|e| e.name == name) {
            return Err(BusError::Name(name.to_string()));
        }
        self.devices.push(Entry {
            name: name.to_string(),
            ranges: Vec::new(),
            state: dev,
        });
        Ok(())
    }

    fn check_name(&self, name: &str, dev: &Arc<dyn SaveRestore>) -> Result<(), BusError> {
        match self.devices.iter().find(|e| e.name == name) {
            Some(e) if !std::ptr::addr_eq(Arc::as_ptr(&e.state), Arc::as_ptr(dev)) => {
                Err(BusError::Name(name.to_string()))
            }
            _ => Ok(()),
        }
    }

    fn push(&mut self, name: &str, range: IoRange, dev: Arc<dyn SaveRestore>) {
        match self.devices.iter_mut().find(|e| e.name == name) {
            // The same device at a second range (one device, two windows).
            Some(e) => e.ranges.push(range),
            None => self.devices.push(Entry {
                name: name.to_string(),
                ranges: vec![range],
                state: dev,
            }),
        }
    }

    /// The bus the vCPU threads dispatch exits on.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Every device: its name and ranges, in registration order.
    pub fn devices(&self) -> impl Iterator<Item = (&str, &[IoRange])> {
        self.devices
            .iter()
            .map(|e| (e.name.as_str(), &e.ranges[..]))
    }

    /// Every device's state, by name.
    pub fn save(&self) -> BTreeMap<String, DeviceState> {
        self.devices
            .iter()
            .map(|e| (e.name.clone(), e.state.save_state()))
            .collect()
    }

    /// Restore every device from `saved` (before the VM runs). A device
    /// missing from it, or a state that does not fit, is an error; the
    /// caller discards the VM then (never a half-restored one).
    /// Pull again every interrupt line whose device has one pending
    /// (after a restore, once every LAPIC is back).
    pub fn reassert_interrupts(&self) {
        for e in &self.devices {
            e.state.reassert();
        }
    }

    pub fn restore(&self, saved: &BTreeMap<String, DeviceState>) -> Result<(), StateError> {
        // A state for a device that is not here is a state of another
        // machine (or an altered one): refused, not ignored.
        if let Some(name) = saved
            .keys()
            .find(|n| !self.devices.iter().any(|e| &e.name == *n))
        {
            let shown: String = name.chars().take(64).flat_map(char::escape_debug).collect();
            return Err(StateError::Unknown(shown));
        }
        for e in &self.devices {
            let s = saved
                .get(&e.name)
                .ok_or_else(|| StateError::Missing(e.name.clone()))?;
            e.state.restore_state(&e.name, s)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CounterDevice, DebugExit, GuestStop, StopSink};

    struct Ignore;
    impl StopSink for Ignore {
        fn guest_stopped(&self, _: GuestStop) {}
    }

    #[test]
    fn devices_are_enumerable_and_saved_by_name() {
        let mut m = DeviceManager::new();
        m.add_pio("counter0", 0x700, 4, Arc::new(CounterDevice::default()))
            .unwrap();
        m.add_pio(
            "debug-exit",
            0xf4,
            4,
            Arc::new(DebugExit::new(Arc::new(Ignore))),
        )
        .unwrap();
        let names: Vec<_> = m.devices().map(|(n, _)| n).collect();
        assert_eq!(names, ["counter0", "debug-exit"]);
        assert!(m
            .add_pio("clash", 0x702, 4, Arc::new(CounterDevice::default()))
            .is_err());
        assert!(matches!(
            m.add_pio("counter0", 0x800, 4, Arc::new(CounterDevice::default())),
            Err(BusError::Name(_))
        ));
        let mut d = [0u8; 4];
        m.bus().pio_read(0x700, &mut d);
        let saved = m.save();
        assert_eq!(saved["counter0"].data, 1);
        let mut fresh = DeviceManager::new();
        fresh
            .add_pio("counter0", 0x700, 4, Arc::new(CounterDevice::default()))
            .unwrap();
        // A state for a device this machine lacks is another machine's.
        assert!(matches!(
            fresh.restore(&saved),
            Err(StateError::Unknown(n)) if n == "debug-exit"
        ));
        let mut ours = saved.clone();
        ours.remove("debug-exit");
        fresh.restore(&ours).unwrap();
        fresh.bus().pio_read(0x700, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
        let mut missing = ours.clone();
        missing.remove("counter0");
        assert!(matches!(
            fresh.restore(&missing),
            Err(StateError::Missing(_))
        ));
    }
}
