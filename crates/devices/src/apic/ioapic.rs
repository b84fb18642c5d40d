//! The IOAPIC (82093AA): 24 input pins, each with a redirection entry
//! that turns the pin into a message to LAPICs. MMIO: IOREGSEL at +0x00,
//! IOWIN at +0x10.
//!
//! brisk's devices pull their line as an edge ([`crate::IrqLine`]). A pin
//! programmed level-triggered delivers once and sets its remote IRR; a
//! pull while the remote IRR (or the mask) is set is kept pending and
//! delivered at the EOI (or the unmask), so no interrupt is lost. That
//! can add one interrupt with nothing to do, which drivers expect.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::DeviceMmio;

use super::{DeliveryMode, Lapics, Message, Shorthand};
use crate::{InvalidState, IrqLine, Stateful};

pub const IOAPIC_PINS: usize = 24;
/// Bytes of its MMIO window.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Version 0x11, 24 redirection entries (max index 23).
const VERSION: u32 = 0x11 | (((IOAPIC_PINS as u32) - 1) << 16);
const RTE_DELIVERY_STATUS: u64 = 1 << 12;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
/// The bits a guest writes: vector, mode, dest mode, polarity, trigger,
/// mask, destination.
const RTE_WRITABLE: u64 = 0xff00_0000_0001_afff;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicState {
    pub id: u32,
    pub ioregsel: u32,
    pub redirection: Vec<u64>,
    /// Pins pulled but not yet delivered (masked, or level with the remote
    /// IRR set).
    pub pending: u32,
}

pub struct Ioapic {
    state: Mutex<IoapicState>,
    lapics: Arc<Lapics>,
}

impl Ioapic {
    pub(crate) fn new(lapics: Arc<Lapics>) -> Ioapic {
        Ioapic {
            state: Mutex::new(IoapicState {
                id: 0,
                ioregsel: 0,
                redirection: vec![RTE_MASKED; IOAPIC_PINS],
                pending: 0,
            }),
            lapics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, IoapicState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A device pulled pin `pin`.
    pub fn pulse(&self, pin: usize) {
        let mut s = self.lock();
        if pin >= IOAPIC_PINS {
            return;
        }
        let rte = s.redirection[pin];
        if rte & RTE_MASKED != 0 || rte & (RTE_LEVEL | RTE_REMOTE_IRR) == RTE_LEVEL | RTE_REMOTE_IRR
        {
            s.pending |= 1 << pin;
            return;
        }
        self.deliver(&mut s, pin);
    }

    /// An EOI for `vector` reached the IOAPIC (a level-triggered vector's
    /// EOI is broadcast by the LAPIC).
    pub fn eoi(&self, vector: u8) {
        let mut s = self.lock();
        for pin in 0..IOAPIC_PINS {
            let rte = s.redirection[pin];
            if rte as u8 != vector || rte & RTE_REMOTE_IRR == 0 {
                continue;
            }
            s.redirection[pin] &= !RTE_REMOTE_IRR;
            if s.pending & (1 << pin) != 0 && rte & RTE_MASKED == 0 {
                self.deliver(&mut s, pin);
            }
        }
    }

    /// Send pin `pin`'s message (it is unmasked), clearing its pending bit.
    fn deliver(&self, s: &mut IoapicState, pin: usize) {
        s.pending &= !(1 << pin);
        let rte = s.redirection[pin];
        let level = rte & RTE_LEVEL != 0;
        if level {
            s.redirection[pin] |= RTE_REMOTE_IRR;
        }
        let mode = DeliveryMode::from_bits((rte >> 8) as u32).unwrap_or(DeliveryMode::Fixed);
        self.lapics.deliver(&Message {
            vector: rte as u8,
            mode,
            logical: rte & (1 << 11) != 0,
            dest: (rte >> 56) as u32,
            wide: false,
            level_triggered: level,
            assert: true,
            shorthand: Shorthand::None,
            source: None,
        });
    }

    fn read_register(&self, s: &IoapicState) -> u32 {
        match s.ioregsel {
            0 => s.id << 24,
            1 => VERSION,
            2 => s.id << 24,
            r @ 0x10..=0x3f => {
                let rte = s.redirection[(r as usize - 0x10) / 2];
                if r % 2 == 0 {
                    rte as u32
                } else {
                    (rte >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_register(&self, s: &mut IoapicState, value: u32) {
        match s.ioregsel {
            0 => s.id = (value >> 24) & 0xf,
            r @ 0x10..=0x3f => {
                let pin = (r as usize - 0x10) / 2;
                let old = s.redirection[pin];
                let new = if r % 2 == 0 {
                    (old & !0xffff_ffff) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                let kept = old & (RTE_REMOTE_IRR | RTE_DELIVERY_STATUS);
                let mut rte = (new & RTE_WRITABLE) | kept;
                if rte & RTE_LEVEL == 0 {
                    rte &= !RTE_REMOTE_IRR;
                }
                s.redirection[pin] = rte;
                let unmasked = old & RTE_MASKED != 0 && rte & RTE_MASKED == 0;
                let idle = rte & RTE_REMOTE_IRR == 0;
                if unmasked && idle && s.pending & (1 << pin) != 0 {
                    self.deliver(s, pin);
                }
            }
            // The version and arbitration registers are read-only.
            _ => {}
        }
    }
}

/// Pin `pin` of an IOAPIC, as a device's interrupt line.
pub struct IoapicLine {
    pub ioapic: Arc<Ioapic>,
    pub pin: usize,
}

impl IrqLine for IoapicLine {
    fn trigger(&self) {
        self.ioapic.pulse(self.pin);
    }
}

impl DeviceMmio for Ioapic {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        let s = self.lock();
        let value = match offset {
            0x00 => s.ioregsel,
            0x10 => self.read_register(&s),
            _ => 0,
        };
        crate::put_port_value(data, value);
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        let value = crate::port_value(data);
        let mut s = self.lock();
        match offset {
            0x00 => s.ioregsel = value & 0xff,
            0x10 => self.write_register(&mut s, value),
            // No EOI register at version 0x11.
            _ => {}
        }
    }
}

impl Stateful for Ioapic {
    const VERSION: u32 = 1;
    type State = IoapicState;

    fn save(&self) -> IoapicState {
        self.lock().clone()
    }

    fn restore(&self, state: IoapicState) -> Result<(), InvalidState> {
        if state.redirection.len() != IOAPIC_PINS {
            return Err(InvalidState::Count {
                what: "IOAPIC redirection entries",
                saved: state.redirection.len(),
                here: IOAPIC_PINS,
            });
        }
        *self.lock() = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::timer::TimerQueue;
    use super::super::{Lapic, Startup};
    use super::*;

    fn setup() -> (Ioapic, Arc<Lapics>) {
        let queue = Arc::new(TimerQueue::default());
        let lapics: Vec<Arc<Lapic>> = (0..2)
            .map(|i| Arc::new(Lapic::new(i, Startup::Run, queue.clone(), Box::new(|| {}))))
            .collect();
        for l in &lapics {
            l.mmio_write(0xf0, &0x1ffu32.to_le_bytes());
        }
        let lapics = Arc::new(Lapics(lapics));
        (Ioapic::new(lapics.clone()), lapics)
    }

    fn write(io: &Ioapic, reg: u32, v: u32) {
        io.mmio_write(MmioAddress(0), 0, &reg.to_le_bytes());
        io.mmio_write(MmioAddress(0), 0x10, &v.to_le_bytes());
    }

    fn read(io: &Ioapic, reg: u32) -> u32 {
        io.mmio_write(MmioAddress(0), 0, &reg.to_le_bytes());
        let mut b = [0u8; 4];
        io.mmio_read(MmioAddress(0), 0x10, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn an_edge_pin_reaches_its_destination_lapic_and_a_masked_one_waits_for_the_unmask() {
        let (io, lapics) = setup();
        assert_eq!(read(&io, 1), VERSION);
        write(&io, 0x10 + 2 * 4 + 1, 1 << 24);
        write(&io, 0x10 + 2 * 4, 0x24);
        io.pulse(4);
        assert_eq!(lapics.get(1).unwrap().acknowledge(), Some(0x24));
        assert_eq!(lapics.get(0).unwrap().acknowledge(), None);
        write(&io, 0x10 + 2 * 5, (1 << 16) | 0x25);
        io.pulse(5);
        assert_eq!(lapics.get(0).unwrap().acknowledge(), None);
        write(&io, 0x10 + 2 * 5, 0x25);
        assert_eq!(lapics.get(0).unwrap().acknowledge(), Some(0x25));
    }

    #[test]
    fn a_level_pin_holds_its_remote_irr_until_the_eoi_and_delivers_what_came_meanwhile() {
        let (io, lapics) = setup();
        let l0 = lapics.get(0).unwrap();
        write(&io, 0x10 + 2 * 10, (1 << 15) | 0x3a);
        io.pulse(10);
        assert_ne!(read(&io, 0x10 + 2 * 10) & (1 << 14), 0, "remote IRR set");
        io.pulse(10);
        assert_eq!(l0.acknowledge(), Some(0x3a));
        assert_eq!(l0.acknowledge(), None, "the second pull waits for the EOI");
        let effect = l0.mmio_write(0xb0, &0u32.to_le_bytes());
        assert_eq!(effect, super::super::Effect::LevelEoi(0x3a));
        io.eoi(0x3a);
        assert_eq!(l0.acknowledge(), Some(0x3a));
        l0.mmio_write(0xb0, &0u32.to_le_bytes());
        io.eoi(0x3a);
        assert_eq!(read(&io, 0x10 + 2 * 10) & (1 << 14), 0);
    }

    #[test]
    fn logical_destinations_and_read_only_bits_hold() {
        let (io, lapics) = setup();
        // Flat logical: LAPIC 1 has LDR bit 1.
        lapics
            .get(1)
            .unwrap()
            .mmio_write(0xd0, &(2u32 << 24).to_le_bytes());
        write(&io, 0x10 + 2 * 6 + 1, 2 << 24);
        write(&io, 0x10 + 2 * 6, (1 << 11) | (1 << 14) | (1 << 12) | 0x46);
        assert_eq!(read(&io, 0x10 + 2 * 6) & ((1 << 14) | (1 << 12)), 0);
        io.pulse(6);
        assert_eq!(lapics.get(1).unwrap().acknowledge(), Some(0x46));
        let saved = io.save();
        let (other, _) = setup();
        other.restore(saved.clone()).unwrap();
        assert_eq!(other.save(), saved);
    }
}
