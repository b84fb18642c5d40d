//! The PC's CMOS RTC (MC146818) at 0x70 (index) / 0x71 (data): the date
//! and time from the host's clock (UTC, BCD, 24-hour, as a PC BIOS leaves
//! it), the status registers a kernel reads, the memory size fields, and
//! the rest of the 128 bytes as battery-backed RAM.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

const SECONDS: usize = 0x00;
const MINUTES: usize = 0x02;
const HOURS: usize = 0x04;
const WEEKDAY: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const STATUS_A: usize = 0x0a;
const STATUS_B: usize = 0x0b;
const STATUS_C: usize = 0x0c;
const STATUS_D: usize = 0x0d;
const CENTURY: usize = 0x32;
/// Status B: 24-hour mode, BCD (DM clear), no interrupts enabled.
const B_24H: u8 = 0x02;
/// Status D: the battery is good (valid RAM and time).
const D_VRT: u8 = 0x80;
/// Status A: 32.768 kHz time base, 1024 Hz rate; update not in progress.
const A_DEFAULT: u8 = 0x26;

struct Regs {
    index: u8,
    ram: [u8; 128],
}

/// The RTC; its state is the index and the 128 bytes (the clock itself
/// is read from the host at each access).
pub struct Cmos {
    regs: Mutex<Regs>,
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// (year, month, day) of `days` since 1970-01-01 (proleptic Gregorian;
/// Howard Hinnant's days-to-civil).
fn civil(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl Cmos {
    /// A CMOS for a guest with `memory` bytes of RAM below 4 GiB.
    pub fn new(memory: u64) -> Self {
        let mut ram = [0u8; 128];
        ram[STATUS_A] = A_DEFAULT;
        ram[STATUS_B] = B_24H;
        ram[STATUS_D] = D_VRT;
        // Base memory 640 KiB; extended memory (KiB above 1 MiB, to 64
        // MiB); memory above 16 MiB in 64 KiB blocks (as QEMU's BIOS).
        (ram[0x15], ram[0x16]) = (0x80, 0x02);
        let ext_kib = (memory.saturating_sub(1 << 20) >> 10).min(0xfc00) as u16;
        (ram[0x17], ram[0x18]) = (ext_kib as u8, (ext_kib >> 8) as u8);
        (ram[0x30], ram[0x31]) = (ext_kib as u8, (ext_kib >> 8) as u8);
        let above16 = (memory.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        (ram[0x34], ram[0x35]) = (above16 as u8, (above16 >> 8) as u8);
        Cmos {
            regs: Mutex::new(Regs { index: 0, ram }),
        }
    }

    /// Register `reg`, the clock registers from the host's time now.
    fn read_reg(regs: &Regs, reg: usize) -> u8 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let (days, secs) = ((now / 86_400) as i64, now % 86_400);
        let (year, month, day) = civil(days);
        match reg {
            SECONDS => bcd(secs % 60),
            MINUTES => bcd(secs / 60 % 60),
            HOURS => bcd(secs / 3600),
            // 1 = Sunday; 1970-01-01 was a Thursday.
            WEEKDAY => bcd(((days + 4).rem_euclid(7) + 1) as u64),
            DAY => bcd(day),
            MONTH => bcd(month),
            YEAR => bcd(year.rem_euclid(100) as u64),
            CENTURY => bcd(year.div_euclid(100) as u64),
            // Reading C clears it (no interrupt sources here anyway).
            STATUS_C => 0,
            r => regs.ram[r],
        }
    }
}

impl DevicePio for Cmos {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let regs = self.regs.lock().unwrap_or_else(|p| p.into_inner());
        data.fill(0xff);
        if offset == 1 {
            data[0] = Self::read_reg(&regs, usize::from(regs.index & 0x7f));
        } else if offset == 0 {
            data[0] = regs.index;
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let mut regs = self.regs.lock().unwrap_or_else(|p| p.into_inner());
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 is the NMI mask, kept but meaningless here.
            0 => regs.index = v,
            1 => {
                let reg = usize::from(regs.index & 0x7f);
                match reg {
                    // The clock follows the host; C and D are read-only.
                    SECONDS..=YEAR | CENTURY | STATUS_C | STATUS_D => {}
                    // Keep 24-hour BCD, whatever the guest asks: the clock
                    // registers are always produced that way.
                    STATUS_B => regs.ram[reg] = (v & !0x06) | B_24H,
                    _ => regs.ram[reg] = v,
                }
            }
            _ => {}
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct CmosState {
    index: u8,
    ram: Vec<u8>,
}

impl crate::Stateful for Cmos {
    const VERSION: u32 = 1;
    type State = CmosState;

    fn save(&self) -> CmosState {
        let regs = self.regs.lock().unwrap_or_else(|p| p.into_inner());
        CmosState {
            index: regs.index,
            ram: regs.ram.to_vec(),
        }
    }

    fn restore(&self, s: CmosState) -> Result<(), crate::InvalidState> {
        let ram: [u8; 128] = s
            .ram
            .try_into()
            .map_err(|r: Vec<u8>| crate::InvalidState::Count {
                what: "bytes of CMOS RAM",
                saved: r.len(),
                here: 128,
            })?;
        *self.regs.lock().unwrap_or_else(|p| p.into_inner()) = Regs {
            index: s.index,
            ram,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &Cmos, reg: u8) -> u8 {
        c.pio_write(PioAddress(0x70), 0, &[reg | 0x80]);
        let mut b = [0u8];
        c.pio_read(PioAddress(0x70), 1, &mut b);
        b[0]
    }

    fn from_bcd(v: u8) -> u64 {
        u64::from(v >> 4) * 10 + u64::from(v & 0xf)
    }

    #[test]
    fn days_become_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
        assert_eq!(civil(20_788), (2026, 12, 1));
    }

    #[test]
    fn the_clock_reads_the_hosts_date_in_bcd() {
        let c = Cmos::new(64 << 20);
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let (y, m, d) = (read(&c, 9), read(&c, 8), read(&c, 7));
        let century = read(&c, 0x32);
        let after = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let year = from_bcd(century) * 100 + from_bcd(y);
        let date = (year as i64, from_bcd(m), from_bcd(d));
        // Read across midnight at worst: one of the two ends' dates.
        assert!(
            date == civil((before / 86_400) as i64) || date == civil((after / 86_400) as i64),
            "{date:?}"
        );
        assert_eq!(read(&c, 0x0b) & 0x06, B_24H, "BCD, 24-hour");
        assert_eq!(read(&c, 0x0d), D_VRT);
        assert_eq!(read(&c, 0x0a) & 0x80, 0, "no update in progress");
        // Extended memory: 63 MiB above 1 MiB, in KiB.
        assert_eq!(
            u16::from_le_bytes([read(&c, 0x30), read(&c, 0x31)]),
            63 * 1024
        );
        // NVRAM keeps what is written; the clock ignores writes.
        c.pio_write(PioAddress(0x70), 0, &[0x40]);
        c.pio_write(PioAddress(0x70), 1, &[0x5a]);
        assert_eq!(read(&c, 0x40), 0x5a);
        c.pio_write(PioAddress(0x70), 0, &[MONTH as u8]);
        c.pio_write(PioAddress(0x70), 1, &[0x99]);
        assert_ne!(read(&c, MONTH as u8), 0x99);
        crate::state::tests::round_trip(&c, &Cmos::new(0));
    }
}
