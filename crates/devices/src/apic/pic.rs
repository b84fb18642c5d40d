//! The 8259A pair's registers (master at 0x20, slave at 0xa0, ELCR at
//! 0x4d0), for `--irqchip user` kernels.
//!
//! A kernel probes the PIC and programs it before it switches to the
//! IOAPIC (Linux takes ISA IRQs 0-15 as legacy IRQs only when the probe
//! reads back its mask), then masks it. Under brisk's irqchip every
//! interrupt goes through the IOAPIC: the PIC's output is not wired to the
//! LAPICs (no ExtINT), so a guest that stays in PIC mode gets no
//! interrupts. What is modelled is what a kernel reads back: the
//! initialisation sequence, the mask, IRR/ISR reads (empty) and the ELCR.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

use crate::{InvalidState, Stateful};

/// Where the two chips and the edge/level register answer.
pub const PIC_MASTER: u16 = 0x20;
pub const PIC_SLAVE: u16 = 0xa0;
pub const PIC_ELCR: u16 = 0x4d0;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chip {
    pub imr: u8,
    /// The next initialisation word expected (0: initialised).
    pub icw_step: u8,
    pub icw4: bool,
    pub vector_base: u8,
    pub elcr: u8,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicState {
    pub chips: [Chip; 2],
}

#[derive(Default)]
pub struct Pic(Mutex<PicState>);

impl Pic {
    fn with<R>(&self, f: impl FnOnce(&mut PicState) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Chip {
    fn write(&mut self, data_port: bool, v: u8) {
        if !data_port {
            if v & 0x10 != 0 {
                // ICW1: start initialisation; ICW4 follows if bit 0.
                *self = Chip {
                    elcr: self.elcr,
                    icw_step: 2,
                    icw4: v & 1 != 0,
                    ..Chip::default()
                };
            }
            // OCW2 (EOIs) and OCW3 (read selects): nothing in service.
            return;
        }
        match self.icw_step {
            2 => {
                self.vector_base = v & 0xf8;
                self.icw_step = 3;
            }
            3 => self.icw_step = if self.icw4 { 4 } else { 0 },
            4 => self.icw_step = 0,
            _ => self.imr = v,
        }
    }
}

impl DevicePio for Pic {
    fn pio_read(&self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let value = self.with(|s| match (base.0, offset) {
            (PIC_MASTER, 1) => s.chips[0].imr,
            (PIC_SLAVE, 1) => s.chips[1].imr,
            (PIC_ELCR, o) if o < 2 => s.chips[o as usize].elcr,
            // IRR or ISR (OCW3): nothing requested or in service.
            _ => 0,
        });
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn pio_write(&self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        self.with(|s| match (base.0, offset) {
            (PIC_MASTER, o) => s.chips[0].write(o == 1, v),
            (PIC_SLAVE, o) => s.chips[1].write(o == 1, v),
            // IRQs 0, 1, 2 (master) and 8, 13 (slave) are always edge.
            (PIC_ELCR, 0) => s.chips[0].elcr = v & 0xf8,
            (PIC_ELCR, 1) => s.chips[1].elcr = v & 0xde,
            _ => {}
        })
    }
}

impl Stateful for Pic {
    const VERSION: u32 = 1;
    type State = PicState;

    fn save(&self) -> PicState {
        self.with(|s| *s)
    }

    fn restore(&self, state: PicState) -> Result<(), InvalidState> {
        self.with(|s| *s = state);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(p: &Pic, port: u16, v: u8) {
        let (base, off) = if port >= PIC_ELCR {
            (PIC_ELCR, port - PIC_ELCR)
        } else {
            (port & !1, port & 1)
        };
        p.pio_write(PioAddress(base), off, &[v]);
    }

    fn inb(p: &Pic, port: u16) -> u8 {
        let mut b = [0u8];
        p.pio_read(PioAddress(port & !1), port & 1, &mut b);
        b[0]
    }

    #[test]
    fn linux_s_probe_reads_its_mask_back_after_an_initialisation() {
        let p = Pic::default();
        // Linux's probe_8259A: mask the slave, write a pattern, read it.
        out(&p, 0xa1, 0xff);
        out(&p, 0x21, 0xfb);
        assert_eq!(inb(&p, 0x21), 0xfb);
        // init_8259A: ICW1..ICW4 on each, then the masks.
        for (cmd, data, base) in [(0x20u16, 0x21u16, 0x30u8), (0xa0, 0xa1, 0x38)] {
            out(&p, cmd, 0x11);
            out(&p, data, base);
            out(&p, data, 4);
            out(&p, data, 1);
        }
        assert_eq!(inb(&p, 0x21), 0, "ICW1 clears the mask");
        out(&p, 0x21, 0xff);
        assert_eq!(inb(&p, 0x21), 0xff);
        assert_eq!(p.save().chips[1].vector_base, 0x38);
        assert_eq!(inb(&p, 0x20), 0, "nothing requested");
    }
}
