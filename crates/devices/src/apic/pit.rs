//! The 8254 PIT's counters (ports 0x40-0x43) and port 0x61 (channel 2's
//! gate and output), for `--irqchip user` kernels.
//!
//! Each channel counts down at 1.193182 MHz on host time, so a guest can
//! calibrate against channel 2 (SDM-era firmware and kernels do: gate on
//! through port 0x61, load a count, poll OUT2). Modes 0-5, the latch and
//! read-back commands, LSB/MSB access. Channel 0's output is not wired to
//! an interrupt: under brisk's irqchip the LAPIC timers are the clock
//! events (a kernel told TSC-deadline and ARAT needs no PIT tick).

use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

use crate::{InvalidState, Stateful};

/// The counters' ports, and port 0x61 (NMI status and control).
pub const PIT_PORTS: u16 = 0x40;
pub const PORT_61: u16 = 0x61;
/// The PIT's input clock in Hz.
pub const PIT_HZ: u64 = 1_193_182;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Channel {
    /// The count loaded (0 means 65536).
    pub reload: u16,
    pub mode: u8,
    /// Access: 1 LSB, 2 MSB, 3 LSB then MSB.
    pub access: u8,
    /// The next write (or read) is the MSB of a 16-bit access.
    pub write_msb: bool,
    pub read_msb: bool,
    /// A count is being loaded (LSB written) or none was loaded.
    pub null_count: bool,
    pub latched: Option<u16>,
    pub status_latched: Option<u8>,
    /// Ticks counted since the load, at the save (or while the gate is
    /// low); counting resumes from here.
    pub ticks: u64,
    /// Counting (a count was loaded and the gate is high).
    pub running: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    pub channels: [Channel; 3],
    /// Port 0x61 bits 0 (gate 2) and 1 (speaker data enable).
    pub port61: u8,
}

struct Inner {
    s: PitState,
    /// When each running channel's tick count was `ticks`.
    since: [Instant; 3],
}

pub struct Pit(Mutex<Inner>);

impl Default for Pit {
    fn default() -> Self {
        Pit(Mutex::new(Inner {
            s: PitState::default(),
            since: [Instant::now(); 3],
        }))
    }
}

impl Inner {
    fn ticks(&self, c: usize) -> u64 {
        let ch = &self.s.channels[c];
        if !ch.running {
            return ch.ticks;
        }
        let ns = self.since[c].elapsed().as_nanos();
        ch.ticks + (ns * u128::from(PIT_HZ) / 1_000_000_000) as u64
    }

    fn period(&self, c: usize) -> u64 {
        match self.s.channels[c].reload {
            0 => 0x10000,
            n => u64::from(n),
        }
    }

    /// The counter's value and its OUT pin now.
    fn count_and_out(&self, c: usize) -> (u16, bool) {
        let ch = &self.s.channels[c];
        if ch.null_count && !ch.running {
            return (ch.reload, ch.mode != 0);
        }
        let (t, n) = (self.ticks(c), self.period(c));
        match ch.mode {
            // Interrupt on terminal count / one-shot: OUT rises at n and
            // the counter wraps on through 0xffff.
            0 | 1 => (((n.wrapping_sub(t)) & 0xffff) as u16, t >= n),
            // Rate generator: OUT low for the tick at count 1.
            2 | 6 => ((n - t % n) as u16, t % n != n - 1),
            // Square wave: OUT high for the first half of each period.
            3 | 7 => ((n - t % n) as u16, t % n < n.div_ceil(2)),
            // Strobes: OUT low for the one tick at terminal count.
            _ => (((n.wrapping_sub(t)) & 0xffff) as u16, t != n),
        }
    }

    fn start(&mut self, c: usize) {
        let gate = c != 2 || self.s.port61 & 1 != 0;
        let ch = &mut self.s.channels[c];
        ch.ticks = 0;
        ch.null_count = false;
        ch.running = gate;
        self.since[c] = Instant::now();
    }

    fn set_gate2(&mut self, high: bool) {
        let was = self.s.channels[2].running;
        if high && !was && !self.s.channels[2].null_count {
            // A rising gate restarts every mode but 0 (which resumes).
            if self.s.channels[2].mode == 0 {
                self.s.channels[2].running = true;
                self.since[2] = Instant::now();
            } else {
                self.start(2);
            }
        } else if !high && was {
            let t = self.ticks(2);
            let ch = &mut self.s.channels[2];
            ch.ticks = t;
            ch.running = false;
        }
    }

    fn control(&mut self, v: u8) {
        let c = (v >> 6) as usize;
        if c == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear statuses.
            for i in (0..3).filter(|i| v & (2 << i) != 0) {
                if v & 0x20 == 0 && self.s.channels[i].latched.is_none() {
                    self.s.channels[i].latched = Some(self.count_and_out(i).0);
                }
                if v & 0x10 == 0 {
                    let (_, out) = self.count_and_out(i);
                    let ch = &self.s.channels[i];
                    let status = (u8::from(out) << 7)
                        | (u8::from(ch.null_count) << 6)
                        | (ch.access << 4)
                        | (ch.mode << 1);
                    self.s.channels[i].status_latched = Some(status);
                }
            }
            return;
        }
        let access = (v >> 4) & 3;
        if access == 0 {
            if self.s.channels[c].latched.is_none() {
                self.s.channels[c].latched = Some(self.count_and_out(c).0);
            }
            return;
        }
        let ch = &mut self.s.channels[c];
        *ch = Channel {
            mode: (v >> 1) & 7,
            access,
            null_count: true,
            ..Channel::default()
        };
    }

    fn write_count(&mut self, c: usize, v: u8) {
        let ch = &mut self.s.channels[c];
        let loaded = match ch.access {
            1 => {
                ch.reload = u16::from(v);
                true
            }
            2 => {
                ch.reload = u16::from(v) << 8;
                true
            }
            _ if !ch.write_msb => {
                ch.reload = (ch.reload & 0xff00) | u16::from(v);
                ch.write_msb = true;
                ch.null_count = true;
                false
            }
            _ => {
                ch.reload = (ch.reload & 0xff) | (u16::from(v) << 8);
                ch.write_msb = false;
                true
            }
        };
        if loaded {
            self.start(c);
        }
    }

    fn read_count(&mut self, c: usize) -> u8 {
        if let Some(st) = self.s.channels[c].status_latched.take() {
            return st;
        }
        let value = match self.s.channels[c].latched {
            Some(l) => l,
            None => self.count_and_out(c).0,
        };
        let ch = &mut self.s.channels[c];
        let byte = match ch.access {
            2 => (value >> 8) as u8,
            3 if ch.read_msb => (value >> 8) as u8,
            _ => value as u8,
        };
        let done = match ch.access {
            3 => {
                let was_msb = ch.read_msb;
                ch.read_msb = !was_msb;
                was_msb
            }
            _ => true,
        };
        if done {
            ch.latched = None;
        }
        byte
    }
}

impl Pit {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl DevicePio for Pit {
    fn pio_read(&self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let value = self.with(|p| match (base.0, offset) {
            (PIT_PORTS, o @ 0..=2) => p.read_count(o as usize),
            (PORT_61, 0) => {
                // Bit 4 toggles with the DRAM refresh (every 15 us);
                // bit 5 is OUT2.
                let refresh = (p.since[0].elapsed().as_micros() / 15) % 2 == 1;
                let out2 = p.count_and_out(2).1 && p.s.port61 & 1 != 0;
                (p.s.port61 & 3) | (u8::from(refresh) << 4) | (u8::from(out2) << 5)
            }
            _ => 0xff,
        });
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn pio_write(&self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        self.with(|p| match (base.0, offset) {
            (PIT_PORTS, o @ 0..=2) => p.write_count(o as usize, v),
            (PIT_PORTS, 3) => p.control(v),
            (PORT_61, 0) => {
                p.set_gate2(v & 1 != 0);
                p.s.port61 = v & 3;
            }
            _ => {}
        })
    }
}

impl Stateful for Pit {
    const VERSION: u32 = 1;
    type State = PitState;

    fn save(&self) -> PitState {
        self.with(|p| {
            let mut s = p.s;
            for c in 0..3 {
                s.channels[c].ticks = p.ticks(c);
            }
            s
        })
    }

    fn restore(&self, state: PitState) -> Result<(), InvalidState> {
        if let Some(ch) = state.channels.iter().find(|c| c.mode > 7 || c.access > 3) {
            return Err(InvalidState::Range {
                what: "PIT channel mode/access".into(),
                value: format!("{}/{}", ch.mode, ch.access),
                allowed: "modes 0-7, access 0-3".into(),
            });
        }
        self.with(|p| {
            p.s = state;
            p.since = [Instant::now(); 3];
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(p: &Pit, port: u16, v: u8) {
        let (base, off) = if port == PORT_61 {
            (PORT_61, 0)
        } else {
            (PIT_PORTS, port - PIT_PORTS)
        };
        p.pio_write(PioAddress(base), off, &[v]);
    }

    fn inb(p: &Pit, port: u16) -> u8 {
        let (base, off) = if port == PORT_61 {
            (PORT_61, 0)
        } else {
            (PIT_PORTS, port - PIT_PORTS)
        };
        let mut b = [0u8];
        p.pio_read(PioAddress(base), off, &mut b);
        b[0]
    }

    #[test]
    fn channel_2_counts_down_only_with_its_gate_and_raises_out2_at_terminal_count() {
        let p = Pit::default();
        // Gate off: mode 0 loaded, nothing counts.
        out(&p, PORT_61, 0);
        out(&p, 0x43, 0xb0);
        out(&p, 0x42, 0x10);
        out(&p, 0x42, 0x00);
        assert_eq!(inb(&p, PORT_61) & 0x20, 0);
        out(&p, 0x43, 0x80); // latch channel 2
        assert_eq!((inb(&p, 0x42), inb(&p, 0x42)), (0x10, 0x00));
        // Gate on: the 16-tick count ends within microseconds.
        out(&p, PORT_61, 1);
        let t = Instant::now();
        while inb(&p, PORT_61) & 0x20 == 0 {
            assert!(t.elapsed().as_secs() < 5, "OUT2 never rose");
        }
        // Read-back of the status: OUT high, mode 0, LSB+MSB.
        out(&p, 0x43, 0xe8);
        assert_eq!(inb(&p, 0x42), 0x80 | (3 << 4));
    }

    #[test]
    fn a_saved_count_goes_on_from_where_it_was() {
        let p = Pit::default();
        out(&p, 0x43, 0x34); // channel 0, mode 2
        out(&p, 0x40, 0xff);
        out(&p, 0x40, 0xff);
        let saved = p.save();
        let q = Pit::default();
        q.restore(saved).unwrap();
        let s = q.save();
        assert_eq!(s.channels[0].mode, 2);
        assert_eq!(s.channels[0].reload, 0xffff);
        assert!(s.channels[0].running);
        assert!(s.channels[0].ticks >= saved.channels[0].ticks);
    }
}
