//! One vCPU's local APIC (SDM vol. 3, ch. 11): xAPIC (the register page
//! at its base address) and x2APIC (MSRs 0x800-0x8ff); the IRR/ISR/TMR
//! with priority classes, TPR/PPR, EOI, the LVTs, the ICR, and the timer
//! in one-shot, periodic and TSC-deadline modes on host time.
//!
//! Any thread may deliver into it ([`Lapic::accept`]: the IOAPIC on a
//! device's thread, another vCPU's ICR, the timer thread); its own vCPU
//! thread takes what it may inject ([`Lapic::acknowledge`]) before each
//! entry and serves its register accesses. One lock guards the registers;
//! an atomic flag lets an entry with nothing pending skip it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::*};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::timer::TimerQueue;
use super::{msr, DeliveryMode, Effect, GuestTsc, Message, MsrError, Shorthand};
use crate::{InvalidState, Stateful};

/// The architectural reset value of IA32_APIC_BASE's address.
pub const APIC_BASE_DEFAULT: u64 = 0xfee0_0000;
const BASE_BSP: u64 = 1 << 8;
const BASE_X2APIC: u64 = 1 << 10;
const BASE_ENABLE: u64 = 1 << 11;
/// Bits of IA32_APIC_BASE a guest may set: the page (below 2^52), EXTD, EN.
const BASE_WRITABLE: u64 = 0x000f_ffff_ffff_f000 | BASE_X2APIC | BASE_ENABLE;

/// Version 0x14 (an integrated APIC), six LVT entries (timer, thermal,
/// performance counters, LINT0, LINT1, error): "max LVT entry" 5.
const VERSION: u32 = 0x14 | (5 << 16);
/// SVR: APIC software enable.
const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
/// The writable bits of each LVT, in register order (0x320..0x370).
const LVT_BITS: [u32; 6] = [0x700ff, 0x107ff, 0x107ff, 0x1a7ff, 0x1a7ff, 0x100ff];
const LVT_TIMER: usize = 0;
const TIMER_MODE: u32 = 3 << 17;
const TIMER_PERIODIC: u32 = 1 << 17;
const TIMER_DEADLINE: u32 = 2 << 17;
/// ESR bits: an illegal vector sent, received.
const ESR_SEND_ILLEGAL: u32 = 1 << 5;
const ESR_RECV_ILLEGAL: u32 = 1 << 6;
/// The timer's input clock: 1 GHz before the divider (what KVM's LAPIC
/// uses too), so TMICT counts nanoseconds at divide-by-1.
const BUS_NS: u64 = 1;
/// The shortest periodic timer brisk arms: a guest asking for less gets
/// this (KVM's LAPIC has the same floor), so it cannot busy the timer
/// thread.
const MIN_PERIOD: Duration = Duration::from_micros(200);

/// Whether the vCPU may run, or waits for a start-up IPI (SDM 8.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Startup {
    Run,
    /// After INIT (or at power-on for an AP): no instruction runs until a
    /// SIPI.
    WaitForSipi,
    /// A SIPI arrived: start in real mode at `vector << 12`.
    Sipi(u8),
}

/// A LAPIC's saved state: its registers, and the time its timer had left.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LapicState {
    pub apic_base: u64,
    pub tpr: u8,
    pub ldr: u32,
    pub dfr: u32,
    pub svr: u32,
    pub irr: [u32; 8],
    pub isr: [u32; 8],
    pub tmr: [u32; 8],
    pub esr: u32,
    pub esr_pending: u32,
    pub icr: u64,
    pub lvt: [u32; 6],
    pub tdcr: u32,
    pub tmict: u32,
    pub tsc_deadline: u64,
    /// Nanoseconds until the timer fires (none: not armed).
    pub timer_left_ns: Option<u64>,
    pub startup: Startup,
    pub nmi_pending: bool,
}

struct Regs {
    s: LapicState,
    /// When the armed timer fires (host time), and its period if periodic.
    due: Option<Instant>,
    period: Option<Duration>,
}

pub struct Lapic {
    id: u32,
    regs: Mutex<Regs>,
    /// An interrupt may be deliverable, an NMI or a start-up is pending:
    /// an entry that sees it clear takes no lock.
    attention: AtomicBool,
    /// TPR, for the vCPU's CR8 (read on every entry without the lock).
    tpr: AtomicU8,
    /// Where the xAPIC page is decoded (0: not, x2APIC or disabled).
    mmio_base: AtomicU64,
    timers: Arc<TimerQueue>,
    wake: Box<dyn Fn() + Send + Sync>,
}

fn test_bit(v: &[u32; 8], n: u8) -> bool {
    v[n as usize / 32] & (1 << (n % 32)) != 0
}

fn set_bit(v: &mut [u32; 8], n: u8, on: bool) {
    let (w, b) = (n as usize / 32, 1u32 << (n % 32));
    if on {
        v[w] |= b;
    } else {
        v[w] &= !b;
    }
}

fn highest(v: &[u32; 8]) -> Option<u8> {
    (0..8)
        .rev()
        .find(|&w| v[w] != 0)
        .map(|w| (w * 32 + 31 - v[w].leading_zeros() as usize) as u8)
}

impl LapicState {
    /// The state at power-on (or after INIT, with the base kept).
    fn reset(apic_base: u64, startup: Startup) -> LapicState {
        LapicState {
            apic_base,
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: 0xff,
            irr: [0; 8],
            isr: [0; 8],
            tmr: [0; 8],
            esr: 0,
            esr_pending: 0,
            icr: 0,
            lvt: [LVT_MASKED; 6],
            tdcr: 0,
            tmict: 0,
            tsc_deadline: 0,
            timer_left_ns: None,
            startup,
            nmi_pending: false,
        }
    }

    fn x2apic(&self) -> bool {
        self.apic_base & BASE_X2APIC != 0
    }

    fn hw_enabled(&self) -> bool {
        self.apic_base & BASE_ENABLE != 0
    }

    fn sw_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// Processor priority: the TPR, or the class of the highest vector in
    /// service if that is higher (SDM 11.8.3.1).
    fn ppr(&self) -> u8 {
        let isrv = highest(&self.isr).unwrap_or(0) & 0xf0;
        if self.tpr & 0xf0 >= isrv {
            self.tpr
        } else {
            isrv
        }
    }

    /// The highest requested vector whose class is above the PPR's.
    fn deliverable(&self) -> Option<u8> {
        let v = highest(&self.irr)?;
        (self.hw_enabled() && v & 0xf0 > self.ppr() & 0xf0).then_some(v)
    }

    fn timer_mode(&self) -> u32 {
        self.lvt[LVT_TIMER] & TIMER_MODE
    }

    /// The timer's divider (TDCR bits 0, 1 and 3).
    fn divide(&self) -> u64 {
        let code = (self.tdcr & 3) | ((self.tdcr >> 1) & 4);
        if code == 7 {
            1
        } else {
            2 << code
        }
    }
}

impl Lapic {
    pub(crate) fn new(
        id: u32,
        startup: Startup,
        timers: Arc<TimerQueue>,
        wake: Box<dyn Fn() + Send + Sync>,
    ) -> Lapic {
        let base = APIC_BASE_DEFAULT | BASE_ENABLE | if id == 0 { BASE_BSP } else { 0 };
        let lapic = Lapic {
            id,
            regs: Mutex::new(Regs {
                s: LapicState::reset(base, startup),
                due: None,
                period: None,
            }),
            attention: AtomicBool::new(false),
            tpr: AtomicU8::new(0),
            mmio_base: AtomicU64::new(0),
            timers,
            wake,
        };
        lapic.settle(&lapic.lock());
        lapic
    }

    fn lock(&self) -> MutexGuard<'_, Regs> {
        self.regs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publish what the lock-free readers see, from `r` (called with the
    /// lock held, after every change).
    fn settle(&self, r: &Regs) {
        let s = &r.s;
        let attention = s.irr.iter().any(|&w| w != 0) || s.nmi_pending || s.startup != Startup::Run;
        self.attention.store(attention, Release);
        self.tpr.store(s.tpr, Relaxed);
        let base = if s.hw_enabled() && !s.x2apic() {
            s.apic_base & !0xfff & 0x000f_ffff_ffff_f000
        } else {
            0
        };
        self.mmio_base.store(base, Relaxed);
    }

    /// x2APIC's logical id, derived from the APIC id (SDM 11.12.10.2):
    /// the cluster in bits 31:16, one bit of 16 in 15:0.
    fn x2apic_ldr(&self) -> u32 {
        ((self.id >> 4) << 16) | (1 << (self.id & 0xf))
    }

    /// The APIC id (the vCPU index).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Where the xAPIC page is decoded, if it is.
    pub fn mmio_base(&self) -> Option<u64> {
        Some(self.mmio_base.load(Relaxed)).filter(|&b| b != 0)
    }

    /// IA32_APIC_BASE as the guest last set it.
    pub fn apic_base(&self) -> u64 {
        self.lock().s.apic_base
    }

    pub(crate) fn processor_priority(&self) -> u8 {
        self.lock().s.ppr()
    }

    /// Whether this LAPIC is one `dest` names (SDM 11.6.2: physical, or
    /// logical by LDR and DFR; `wide` is x2APIC's 32-bit form).
    pub fn matches(&self, dest: u32, logical: bool, wide: bool) -> bool {
        let r = self.lock();
        let s = &r.s;
        let broadcast = if wide {
            dest == u32::MAX
        } else {
            dest & 0xff == 0xff
        };
        if broadcast {
            return true;
        }
        if !logical {
            return if wide {
                dest == self.id
            } else {
                dest & 0xff == self.id
            };
        }
        if s.x2apic() {
            // Cluster in bits 31:16, a bit per member in 15:0.
            return s.ldr >> 16 == dest >> 16 && s.ldr & dest & 0xffff != 0;
        }
        let (ldr, mda) = ((s.ldr >> 24) as u8, dest as u8);
        match s.dfr >> 28 {
            0xf => ldr & mda != 0,
            0x0 => ldr >> 4 == mda >> 4 && ldr & mda & 0xf != 0,
            _ => false,
        }
    }

    /// Take a message this LAPIC was chosen for. Returns whether it took
    /// it (and so woke the vCPU; a vector already requested is taken
    /// again, coalesced).
    pub fn accept(&self, m: &Message) -> bool {
        let mut r = self.lock();
        if !r.s.hw_enabled() {
            return false;
        }
        let taken = match m.mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                if !r.s.sw_enabled() || (m.level_triggered && !m.assert) {
                    false
                } else if m.vector < 16 {
                    r.s.esr_pending |= ESR_RECV_ILLEGAL;
                    false
                } else {
                    set_bit(&mut r.s.irr, m.vector, true);
                    set_bit(&mut r.s.tmr, m.vector, m.level_triggered);
                    true
                }
            }
            DeliveryMode::Nmi => {
                r.s.nmi_pending = true;
                true
            }
            // INIT level de-assert only synchronises arbitration ids.
            DeliveryMode::Init if m.level_triggered && !m.assert => false,
            DeliveryMode::Init => {
                let base = r.s.apic_base;
                r.s = LapicState::reset(base, Startup::WaitForSipi);
                if r.s.x2apic() {
                    // INIT keeps x2APIC mode, whose LDR is the id's.
                    r.s.ldr = self.x2apic_ldr();
                }
                self.stop_timer(&mut r);
                true
            }
            DeliveryMode::StartUp if r.s.startup == Startup::WaitForSipi => {
                r.s.startup = Startup::Sipi(m.vector);
                true
            }
            // SMI and ExtINT are not modelled (no SMM, and the 8259's
            // output is not wired to the LAPICs).
            DeliveryMode::StartUp | DeliveryMode::Smi | DeliveryMode::ExtInt => false,
        };
        self.settle(&r);
        drop(r);
        if taken {
            (self.wake)();
        }
        taken
    }

    /// The vector to inject now, if one is deliverable: it moves from the
    /// IRR to the ISR (the guest's INTA).
    pub fn acknowledge(&self) -> Option<u8> {
        if !self.attention.load(Acquire) {
            return None;
        }
        let mut r = self.lock();
        let v = r.s.deliverable()?;
        set_bit(&mut r.s.irr, v, false);
        set_bit(&mut r.s.isr, v, true);
        self.settle(&r);
        Some(v)
    }

    /// Whether an interrupt is waiting that [`Lapic::acknowledge`] would
    /// give (a HLT with interrupts enabled must not halt then).
    pub fn deliverable(&self) -> bool {
        self.attention.load(Acquire) && self.lock().s.deliverable().is_some()
    }

    /// An NMI or a SIPI is waiting (either ends a halt, whatever IF is).
    pub fn must_wake(&self) -> bool {
        if !self.attention.load(Acquire) {
            return false;
        }
        let r = self.lock();
        r.s.nmi_pending || matches!(r.s.startup, Startup::Sipi(_))
    }

    /// Take a pending NMI.
    pub fn take_nmi(&self) -> bool {
        if !self.attention.load(Acquire) {
            return false;
        }
        let mut r = self.lock();
        let nmi = std::mem::take(&mut r.s.nmi_pending);
        self.settle(&r);
        nmi
    }

    /// Whether the vCPU may run; a SIPI is handed over once (the vCPU
    /// then runs from its vector).
    pub fn startup(&self) -> Startup {
        if !self.attention.load(Acquire) {
            return Startup::Run;
        }
        let mut r = self.lock();
        let now = r.s.startup;
        if let Startup::Sipi(_) = now {
            r.s.startup = Startup::Run;
            self.settle(&r);
        }
        now
    }

    /// TPR bits 7:4, as CR8 shows them.
    pub fn cr8(&self) -> u8 {
        self.tpr.load(Relaxed) >> 4
    }

    /// The guest wrote CR8 (64-bit mode's TPR).
    pub fn set_cr8(&self, cr8: u8) {
        let mut r = self.lock();
        r.s.tpr = (cr8 & 0xf) << 4;
        self.settle(&r);
    }

    /// A read of the xAPIC page at `offset`.
    pub(crate) fn mmio_read(&self, offset: u32, data: &mut [u8]) {
        let r = self.lock();
        // Registers are 32 bits at 16-byte boundaries; other bytes read 0.
        let value = if offset & 0xf < 4 {
            self.read(&r, offset & !0xf, false).unwrap_or(0) >> (8 * (offset & 3))
        } else {
            0
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = value.checked_shr(8 * i as u32).unwrap_or(0) as u8;
        }
    }

    /// A write to the xAPIC page at `offset` (only 32-bit writes at a
    /// register's start mean anything).
    pub(crate) fn mmio_write(&self, offset: u32, data: &[u8]) -> Effect {
        if offset & 0xf != 0 || data.len() != 4 {
            crate::guest_warn!(
                "LAPIC {}: {}-byte write at {offset:#x} ignored (registers take aligned 32-bit writes)",
                self.id,
                data.len()
            );
            return Effect::None;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let mut r = self.lock();
        let effect = self
            .write(&mut r, offset, value, false)
            .unwrap_or(Effect::None);
        self.settle(&r);
        effect
    }

    pub(crate) fn msr_read(&self, index: u32) -> Result<u64, MsrError> {
        let r = self.lock();
        match index {
            msr::APIC_BASE => Ok(r.s.apic_base),
            msr::TSC_DEADLINE if r.s.timer_mode() == TIMER_DEADLINE => Ok(r.s.tsc_deadline),
            msr::TSC_DEADLINE => Ok(0),
            _ => {
                let reg = x2apic_register(index, &r.s)?;
                if reg == 0x300 {
                    return Ok(r.s.icr & !(1 << 12));
                }
                self.read(&r, reg, true)
                    .map(u64::from)
                    .ok_or(MsrError::Invalid(index))
            }
        }
    }

    pub(crate) fn msr_write(
        &self,
        index: u32,
        value: u64,
        tsc: &mut dyn FnMut() -> Option<GuestTsc>,
    ) -> Result<Effect, MsrError> {
        let mut r = self.lock();
        let effect = match index {
            msr::APIC_BASE => {
                self.set_apic_base(&mut r, value)
                    .ok_or(MsrError::Invalid(index))?;
                Effect::None
            }
            msr::TSC_DEADLINE => {
                if r.s.timer_mode() == TIMER_DEADLINE {
                    // Ask for the TSC without the lock (an ioctl).
                    drop(r);
                    let now = tsc();
                    r = self.lock();
                    self.set_deadline(&mut r, value, now);
                }
                Effect::None
            }
            _ => {
                let reg = x2apic_register(index, &r.s)?;
                if reg == 0x300 {
                    r.s.icr = value;
                    self.send_icr(&mut r, true)
                } else {
                    let value = u32::try_from(value).map_err(|_| MsrError::Invalid(index))?;
                    self.write(&mut r, reg, value, true)
                        .ok_or(MsrError::Invalid(index))?
                }
            }
        };
        self.settle(&r);
        Ok(effect)
    }

    /// Register `reg`'s value; `None` for a register that does not read
    /// (reserved, or write-only in x2APIC mode: #GP there).
    fn read(&self, r: &Regs, reg: u32, x2: bool) -> Option<u32> {
        let s = &r.s;
        Some(match reg {
            0x20 if x2 => self.id,
            0x20 => self.id << 24,
            0x30 => VERSION,
            0x80 => u32::from(s.tpr),
            0x90 => 0,
            0xa0 => u32::from(s.ppr()),
            0xb0 | 0xc0 | 0xe0 | 0x3f0 if x2 => return None,
            0xb0 | 0xc0 => 0,
            0xd0 => s.ldr,
            0xe0 => s.dfr,
            0xf0 => s.svr,
            0x100..=0x170 => s.isr[(reg as usize - 0x100) >> 4],
            0x180..=0x1f0 => s.tmr[(reg as usize - 0x180) >> 4],
            0x200..=0x270 => s.irr[(reg as usize - 0x200) >> 4],
            0x280 => s.esr,
            // Delivery status (bit 12) always idle: delivery is immediate.
            0x300 => s.icr as u32 & !(1 << 12),
            0x310 if x2 => return None,
            0x310 => (s.icr >> 32) as u32,
            0x320..=0x370 => s.lvt[(reg as usize - 0x320) >> 4],
            0x380 => s.tmict,
            0x390 => current_count(r),
            0x3e0 => s.tdcr,
            _ if x2 => return None,
            _ => 0,
        })
    }

    /// Write `value` to register `reg`; `None` where x2APIC mode raises
    /// #GP (read-only or reserved register, reserved bits).
    fn write(&self, r: &mut Regs, reg: u32, value: u32, x2: bool) -> Option<Effect> {
        match reg {
            // The id is read-only here (x2APIC: architecturally).
            0x20 if x2 => return None,
            0x20 => {}
            0x80 => r.s.tpr = value as u8,
            0xb0 => {
                if x2 && value != 0 {
                    return None;
                }
                return Some(self.eoi(r));
            }
            0xd0 if x2 => return None,
            0xd0 => r.s.ldr = value & 0xff00_0000,
            0xe0 if x2 => return None,
            0xe0 => r.s.dfr = value | 0x0fff_ffff,
            0xf0 => {
                r.s.svr = value & 0x1ff;
                if !r.s.sw_enabled() {
                    for lvt in &mut r.s.lvt {
                        *lvt |= LVT_MASKED;
                    }
                }
            }
            0x280 => {
                if x2 && value != 0 {
                    return None;
                }
                r.s.esr = std::mem::take(&mut r.s.esr_pending);
            }
            0x300 if x2 => return None,
            0x300 => {
                r.s.icr = (r.s.icr & !0xffff_ffff) | u64::from(value);
                return Some(self.send_icr(r, false));
            }
            0x310 if x2 => return None,
            0x310 => r.s.icr = (r.s.icr & 0xffff_ffff) | (u64::from(value) << 32),
            0x320..=0x370 => {
                let i = (reg as usize - 0x320) >> 4;
                let mut v = value & LVT_BITS[i];
                if !r.s.sw_enabled() {
                    v |= LVT_MASKED;
                }
                let old_mode = r.s.timer_mode();
                r.s.lvt[i] = v;
                if i == LVT_TIMER && r.s.timer_mode() != old_mode {
                    // A mode change stops the timer (SDM 11.5.4.1).
                    r.s.tmict = 0;
                    r.s.tsc_deadline = 0;
                    self.stop_timer(r);
                }
            }
            // TSC-deadline mode ignores TMICT.
            0x380 if r.s.timer_mode() == TIMER_DEADLINE => {}
            0x380 => {
                r.s.tmict = value;
                self.start_count(r);
            }
            0x3e0 => r.s.tdcr = value & 0xb,
            0x3f0 if x2 => {
                let vector = value as u8;
                if value > 0xff {
                    return None;
                }
                let mut m = Message::fixed(vector, self.id);
                m.shorthand = Shorthand::SelfOnly;
                m.source = Some(self.id as usize);
                return Some(Effect::Send(m));
            }
            _ if x2 => return None,
            // xAPIC: writes to read-only or reserved registers are ignored.
            _ => {}
        }
        Some(Effect::None)
    }

    /// End the highest interrupt in service.
    fn eoi(&self, r: &mut Regs) -> Effect {
        let Some(v) = highest(&r.s.isr) else {
            return Effect::None;
        };
        set_bit(&mut r.s.isr, v, false);
        if test_bit(&r.s.tmr, v) {
            set_bit(&mut r.s.tmr, v, false);
            return Effect::LevelEoi(v);
        }
        Effect::None
    }

    /// The message an ICR write sends.
    fn send_icr(&self, r: &mut Regs, x2: bool) -> Effect {
        let icr = r.s.icr;
        let low = icr as u32;
        let Some(mode) = DeliveryMode::from_bits(low >> 8) else {
            return Effect::None;
        };
        let vector = low as u8;
        if matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority) && vector < 16 {
            r.s.esr_pending |= ESR_SEND_ILLEGAL;
            return Effect::None;
        }
        let shorthand = match (low >> 18) & 3 {
            0 => Shorthand::None,
            1 => Shorthand::SelfOnly,
            2 => Shorthand::All,
            _ => Shorthand::AllButSelf,
        };
        Effect::Send(Message {
            vector,
            mode,
            logical: low & (1 << 11) != 0,
            dest: if x2 {
                (icr >> 32) as u32
            } else {
                (icr >> 56) as u32
            },
            wide: x2,
            level_triggered: low & (1 << 15) != 0,
            assert: low & (1 << 14) != 0,
            shorthand,
            source: Some(self.id as usize),
        })
    }

    /// IA32_APIC_BASE written; `None` for a write that faults (reserved
    /// bits, x2APIC without EN, x2APIC straight back to xAPIC).
    fn set_apic_base(&self, r: &mut Regs, value: u64) -> Option<()> {
        let old = r.s.apic_base;
        if value & !(BASE_WRITABLE | BASE_BSP) != 0 {
            return None;
        }
        let value = (value & BASE_WRITABLE) | (old & BASE_BSP);
        let (en, x2) = (value & BASE_ENABLE != 0, value & BASE_X2APIC != 0);
        // x2APIC only from xAPIC (SDM 11.12.5): not with EN clear, nor
        // straight from disabled.
        if x2 && (!en || old & BASE_ENABLE == 0) {
            return None;
        }
        if old & BASE_X2APIC != 0 && en && !x2 {
            return None;
        }
        if !en && old & BASE_ENABLE != 0 {
            // Disabling resets the LAPIC (SDM 11.4.3); it keeps running.
            let startup = r.s.startup;
            r.s = LapicState::reset(value, startup);
            self.stop_timer(r);
        }
        if x2 && old & BASE_X2APIC == 0 {
            // x2APIC's logical id is derived from the APIC id.
            r.s.ldr = self.x2apic_ldr();
        }
        r.s.apic_base = value;
        Some(())
    }

    /// TMICT written in one-shot or periodic mode: (re)start the count.
    fn start_count(&self, r: &mut Regs) {
        if r.s.tmict == 0 {
            self.stop_timer(r);
            return;
        }
        let ns = u64::from(r.s.tmict) * r.s.divide() * BUS_NS;
        let mut span = Duration::from_nanos(ns);
        r.period = (r.s.timer_mode() == TIMER_PERIODIC).then(|| {
            span = span.max(MIN_PERIOD);
            span
        });
        self.arm(r, Instant::now() + span);
    }

    fn set_deadline(&self, r: &mut Regs, deadline: u64, tsc: Option<GuestTsc>) {
        r.s.tsc_deadline = deadline;
        r.period = None;
        if deadline == 0 {
            self.stop_timer(r);
            return;
        }
        let wait = match tsc {
            Some(t) if t.khz > 0 => {
                let ticks = deadline.saturating_sub(t.now);
                // ticks / kHz = ms; in ns without overflow for any u64.
                (u128::from(ticks) * 1_000_000 / u128::from(t.khz)).min(u128::from(u64::MAX)) as u64
            }
            // No TSC to compare with: fire now rather than never.
            _ => 0,
        };
        self.arm(r, Instant::now() + Duration::from_nanos(wait));
    }

    fn arm(&self, r: &mut Regs, at: Instant) {
        r.due = Some(at);
        self.timers.arm(self.id as usize, at);
    }

    fn stop_timer(&self, r: &mut Regs) {
        r.due = None;
        r.period = None;
        self.timers.disarm(self.id as usize);
    }

    /// The timer thread found the timer armed for `at` due. Returns when
    /// it fires next (periodic; already armed).
    pub(crate) fn timer_expired(&self, at: Instant) -> Option<Instant> {
        let mut r = self.lock();
        if r.due != Some(at) {
            // Re-armed or stopped since: that arming is the live one.
            return None;
        }
        let lvt = r.s.lvt[LVT_TIMER];
        let next = match r.period {
            // Periodic: the next tick a period after this one's due
            // time, or after now if the thread fell a period behind.
            // Armed here, under this LAPIC's lock, so a guest re-arming
            // meanwhile cannot be overwritten by this older arming.
            Some(p) => {
                let next = (at + p).max(Instant::now());
                self.arm(&mut r, next);
                Some(next)
            }
            None => {
                r.s.tsc_deadline = 0;
                r.due = None;
                None
            }
        };
        drop(r);
        if lvt & LVT_MASKED == 0 {
            self.accept(&Message::fixed(lvt as u8, self.id));
        }
        next
    }
}

/// TMCCT: what is left of the count (0 when not counting).
fn current_count(r: &Regs) -> u32 {
    let Some(due) = r.due else {
        return 0;
    };
    if r.s.timer_mode() == TIMER_DEADLINE {
        return 0;
    }
    let left = due.saturating_duration_since(Instant::now()).as_nanos() as u64;
    let per_count = r.s.divide() * BUS_NS;
    (left / per_count).min(u64::from(r.s.tmict)) as u32
}

/// The xAPIC register offset of x2APIC MSR `index`.
fn x2apic_register(index: u32, s: &LapicState) -> Result<u32, MsrError> {
    if !(msr::X2APIC_FIRST..=msr::X2APIC_LAST).contains(&index) {
        return Err(MsrError::Unknown(index));
    }
    if !s.x2apic() || !s.hw_enabled() {
        return Err(MsrError::NotX2apic(index));
    }
    Ok((index - msr::X2APIC_FIRST) << 4)
}

impl Stateful for Lapic {
    const VERSION: u32 = 1;
    type State = LapicState;

    fn save(&self) -> LapicState {
        let r = self.lock();
        let mut s = r.s.clone();
        s.timer_left_ns = r
            .due
            .map(|d| d.saturating_duration_since(Instant::now()).as_nanos() as u64);
        s
    }

    fn restore(&self, s: LapicState) -> Result<(), InvalidState> {
        if s.apic_base & !(BASE_WRITABLE | BASE_BSP) != 0 {
            return Err(InvalidState::Range {
                what: "IA32_APIC_BASE".into(),
                value: format!("{:#x}", s.apic_base),
                allowed: "a page address, EXTD, EN and BSP".into(),
            });
        }
        let mut r = self.lock();
        self.stop_timer(&mut r);
        let left = s.timer_left_ns;
        r.s = s;
        r.s.timer_left_ns = None;
        if let Some(ns) = left {
            if r.s.timer_mode() == TIMER_PERIODIC && r.s.tmict != 0 {
                let p = Duration::from_nanos(u64::from(r.s.tmict) * r.s.divide() * BUS_NS);
                r.period = Some(p.max(MIN_PERIOD));
            }
            self.arm(&mut r, Instant::now() + Duration::from_nanos(ns));
        }
        self.settle(&r);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn lapic(id: u32) -> (Lapic, Arc<AtomicUsize>) {
        let woken = Arc::new(AtomicUsize::new(0));
        let w = woken.clone();
        let l = Lapic::new(
            id,
            Startup::Run,
            Arc::new(TimerQueue::default()),
            Box::new(move || {
                w.fetch_add(1, SeqCst);
            }),
        );
        (l, woken)
    }

    fn write(l: &Lapic, reg: u32, v: u32) -> Effect {
        l.mmio_write(reg, &v.to_le_bytes())
    }

    fn read(l: &Lapic, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        l.mmio_read(reg, &mut b);
        u32::from_le_bytes(b)
    }

    fn enabled(id: u32) -> (Lapic, Arc<AtomicUsize>) {
        let (l, w) = lapic(id);
        write(&l, 0xf0, SVR_ENABLE | 0xff);
        (l, w)
    }

    fn fixed(v: u8) -> Message {
        Message::fixed(v, 0)
    }

    #[test]
    fn the_highest_class_above_ppr_goes_first_and_eoi_unblocks_the_rest() {
        let (l, woken) = enabled(0);
        for v in [0x31, 0x52, 0x55] {
            assert!(l.accept(&fixed(v)));
        }
        assert_eq!(woken.load(SeqCst), 3);
        assert_eq!(l.acknowledge(), Some(0x55));
        // 0x52 is in the class now in service: it waits for the EOI.
        assert_eq!(read(&l, 0xa0), 0x50, "PPR is the in-service class");
        assert!(!l.deliverable());
        assert_eq!(l.acknowledge(), None);
        write(&l, 0xb0, 0);
        assert_eq!(l.acknowledge(), Some(0x52));
        write(&l, 0xb0, 0);
        // TPR 0x40 holds back class 3.
        write(&l, 0x80, 0x40);
        assert_eq!(l.acknowledge(), None);
        write(&l, 0x80, 0x20);
        assert_eq!(l.acknowledge(), Some(0x31));
        assert_eq!(
            read(&l, 0x100 + 0x10),
            1 << 0x11,
            "0x31 in service: ISR word 1 bit 17"
        );
    }

    #[test]
    fn a_software_disabled_lapic_takes_no_fixed_interrupt_but_takes_nmi_and_init() {
        let (l, woken) = lapic(1);
        assert!(!l.accept(&fixed(0x40)));
        assert_eq!(l.acknowledge(), None);
        let mut nmi = fixed(0);
        nmi.mode = DeliveryMode::Nmi;
        assert!(l.accept(&nmi));
        assert!(l.take_nmi());
        assert!(!l.take_nmi());
        let mut init = fixed(0);
        init.mode = DeliveryMode::Init;
        assert!(l.accept(&init));
        assert_eq!(l.startup(), Startup::WaitForSipi);
        let mut sipi = fixed(0x9a);
        sipi.mode = DeliveryMode::StartUp;
        assert!(l.accept(&sipi));
        assert_eq!(l.startup(), Startup::Sipi(0x9a));
        assert_eq!(l.startup(), Startup::Run, "a SIPI starts the vCPU once");
        assert!(!l.accept(&sipi), "a SIPI to a running vCPU is ignored");
        assert_eq!(woken.load(SeqCst), 3);
    }

    #[test]
    fn level_triggered_vectors_report_their_eoi_and_vectors_below_16_are_errors() {
        let (l, _) = enabled(0);
        let mut m = fixed(0x61);
        m.level_triggered = true;
        l.accept(&m);
        assert_eq!(read(&l, 0x180 + 0x30), 1 << 1, "TMR bit 0x61");
        assert_eq!(l.acknowledge(), Some(0x61));
        assert_eq!(write(&l, 0xb0, 0), Effect::LevelEoi(0x61));
        assert!(!l.accept(&fixed(7)));
        assert_eq!(read(&l, 0x280), 0, "ESR shows errors only after a write");
        write(&l, 0x280, 0);
        assert_eq!(read(&l, 0x280), ESR_RECV_ILLEGAL);
    }

    #[test]
    fn destinations_follow_physical_flat_cluster_and_x2apic_rules() {
        let (l, _) = enabled(3);
        assert!(l.matches(3, false, false));
        assert!(!l.matches(2, false, false));
        assert!(l.matches(0xff, false, false), "xAPIC broadcast");
        write(&l, 0xd0, 0x08 << 24);
        assert!(l.matches(0x0c, true, false), "flat: any bit of the mask");
        assert!(!l.matches(0x04, true, false));
        write(&l, 0xe0, 0x0fff_ffff);
        write(&l, 0xd0, 0x12 << 24);
        assert!(l.matches(0x13, true, false), "cluster 1, member bit 1");
        assert!(!l.matches(0x23, true, false), "another cluster");
        let base = APIC_BASE_DEFAULT | BASE_ENABLE | BASE_X2APIC;
        l.msr_write(msr::APIC_BASE, base, &mut || None).unwrap();
        assert_eq!(l.mmio_base(), None, "x2APIC mode: no page");
        assert_eq!(l.msr_read(0x80d).unwrap(), 1 << 3, "derived x2APIC LDR");
        assert!(l.matches(0b1000, true, true), "cluster 0, member bit 3");
        assert!(l.matches(3, false, true));
        assert!(l.matches(u32::MAX, false, true));
        assert!(!l.matches(0x103, false, true));
    }

    #[test]
    fn x2apic_mode_is_reached_only_through_the_architectural_transitions() {
        let (l, _) = enabled(0);
        assert_eq!(l.msr_read(0x802), Err(MsrError::NotX2apic(0x802)));
        let x2 = APIC_BASE_DEFAULT | BASE_ENABLE | BASE_X2APIC;
        assert!(l
            .msr_write(msr::APIC_BASE, APIC_BASE_DEFAULT | BASE_X2APIC, &mut || {
                None
            })
            .is_err());
        l.msr_write(msr::APIC_BASE, x2, &mut || None).unwrap();
        assert_eq!(l.msr_read(msr::APIC_BASE).unwrap(), x2 | BASE_BSP);
        assert!(
            l.msr_write(msr::APIC_BASE, APIC_BASE_DEFAULT | BASE_ENABLE, &mut || {
                None
            })
            .is_err(),
            "x2APIC to xAPIC directly faults"
        );
        assert_eq!(l.msr_read(0x802).unwrap(), 0);
        assert!(
            l.msr_write(0x80b, 1, &mut || None).is_err(),
            "EOI takes 0 only"
        );
        assert!(
            l.msr_write(0x802, 5, &mut || None).is_err(),
            "ID is read-only"
        );
        // SELF_IPI.
        let e = l.msr_write(0x83f, 0x44, &mut || None).unwrap();
        let Effect::Send(m) = e else { panic!("{e:?}") };
        assert_eq!((m.vector, m.shorthand), (0x44, Shorthand::SelfOnly));
        // A 64-bit ICR with a 32-bit destination.
        let e = l
            .msr_write(0x830, (7u64 << 32) | 0x4000 | 0x45, &mut || None)
            .unwrap();
        let Effect::Send(m) = e else { panic!("{e:?}") };
        assert_eq!((m.dest, m.wide, m.vector), (7, true, 0x45));
    }

    #[test]
    fn init_keeps_x2apic_mode_and_its_logical_id() {
        let (l, _) = enabled(0x13);
        let x2 = APIC_BASE_DEFAULT | BASE_ENABLE | BASE_X2APIC;
        l.msr_write(msr::APIC_BASE, x2, &mut || None).unwrap();
        let mut init = fixed(0);
        init.mode = DeliveryMode::Init;
        l.accept(&init);
        assert_eq!(l.msr_read(0x80d).unwrap(), (1 << 16) | (1 << 3));
        assert!(l.matches((1 << 16) | (1 << 3), true, true));
    }

    #[test]
    fn the_icr_sends_init_sipi_and_nmi_with_their_destinations() {
        let (l, _) = enabled(0);
        write(&l, 0x310, 2 << 24);
        let Effect::Send(m) = write(&l, 0x300, 0x4500) else {
            panic!()
        };
        assert_eq!((m.mode, m.dest, m.assert), (DeliveryMode::Init, 2, true));
        let Effect::Send(m) = write(&l, 0x300, 0x0600 | 0x9a) else {
            panic!()
        };
        assert_eq!((m.mode, m.vector), (DeliveryMode::StartUp, 0x9a));
        let Effect::Send(m) = write(&l, 0x300, 0x000c_0400) else {
            panic!()
        };
        assert_eq!(
            (m.mode, m.shorthand),
            (DeliveryMode::Nmi, Shorthand::AllButSelf)
        );
        assert_eq!(read(&l, 0x300) & (1 << 12), 0, "delivery status idle");
    }

    #[test]
    fn timer_modes_count_down_fire_and_stop() {
        let (l, _) = enabled(0);
        // One-shot, divide by 1, a long count: TMCCT counts down.
        write(&l, 0x3e0, 0xb);
        write(&l, 0x320, 0x30);
        write(&l, 0x380, 1_000_000_000);
        let c = read(&l, 0x390);
        assert!(c > 0 && c <= 1_000_000_000);
        let due = l.lock().due.unwrap();
        assert_eq!(l.timer_expired(due), None, "one-shot: no next tick");
        assert_eq!(read(&l, 0x390), 0);
        assert_eq!(l.acknowledge(), Some(0x30));
        write(&l, 0xb0, 0);
        // Periodic: the next tick is a period on, and at least MIN_PERIOD.
        write(&l, 0x320, TIMER_PERIODIC | 0x31);
        write(&l, 0x380, 10);
        let due = l.lock().due.unwrap();
        let next = l.timer_expired(due).unwrap();
        assert!(next >= due + MIN_PERIOD);
        // A stale expiry (re-armed since) fires nothing.
        assert_eq!(l.timer_expired(due), None);
        // Mode change stops it.
        write(&l, 0x320, TIMER_DEADLINE | 0x32);
        assert!(l.lock().due.is_none());
        // TSC deadline: armed from the guest's TSC, reads back, clears on firing.
        let x2 = APIC_BASE_DEFAULT | BASE_ENABLE;
        l.msr_write(msr::APIC_BASE, x2, &mut || None).unwrap();
        let tsc = GuestTsc {
            now: 1_000,
            khz: 1_000_000,
        };
        l.msr_write(msr::TSC_DEADLINE, 1_000 + 2_000_000_000, &mut || Some(tsc))
            .unwrap();
        assert_eq!(
            l.msr_read(msr::TSC_DEADLINE).unwrap(),
            1_000 + 2_000_000_000
        );
        let due = l.lock().due.unwrap();
        let left = due.saturating_duration_since(Instant::now());
        assert!(left > Duration::from_millis(1500) && left <= Duration::from_secs(2));
        l.timer_expired(due);
        assert_eq!(l.msr_read(msr::TSC_DEADLINE).unwrap(), 0);
        assert_eq!(l.acknowledge(), Some(0x32));
    }

    #[test]
    fn a_masked_timer_counts_but_raises_nothing() {
        let (l, _) = enabled(0);
        write(&l, 0x320, LVT_MASKED | 0x30);
        write(&l, 0x380, 5);
        let due = l.lock().due.unwrap();
        l.timer_expired(due);
        assert_eq!(l.acknowledge(), None);
    }

    #[test]
    fn its_state_round_trips_with_the_timer_still_armed() {
        let (l, _) = enabled(0);
        write(&l, 0x320, TIMER_PERIODIC | 0x40);
        write(&l, 0x380, 50_000_000);
        l.accept(&fixed(0x70));
        l.acknowledge();
        l.accept(&fixed(0x66));
        let saved = l.save();
        let (m, _) = lapic(0);
        m.restore(saved.clone()).unwrap();
        assert!(m.lock().due.is_some() && m.lock().period.is_some());
        let again = m.save();
        assert_eq!(
            LapicState {
                timer_left_ns: None,
                ..again
            },
            LapicState {
                timer_left_ns: None,
                ..saved
            }
        );
        write(&m, 0xb0, 0);
        assert_eq!(m.acknowledge(), Some(0x66));
    }
}
