//! brisk's own PC interrupt controllers, for `--irqchip user` kernels:
//! one local APIC per vCPU ([`Lapic`]: xAPIC page and x2APIC MSRs, its
//! timer in one-shot, periodic and TSC-deadline modes), the IOAPIC
//! ([`Ioapic`]), the 8259 pair's registers ([`Pic`]) and the 8254's
//! counters ([`Pit`]).
//!
//! With these in the VMM instead of KVM, a guest's HLT leaves KVM_RUN and
//! becomes brisk's user-space halt (seed 001), whatever kernel it is.
//! Nothing here touches KVM: the VMM hands each vCPU's APIC accesses (MMIO
//! exits in its page, MSR exits) to [`Apics`], and injects what
//! [`Lapic::acknowledge`] gives before each entry.
//!
//! Delivery follows the SDM (vol. 3, ch. 11): a [`Message`] (from the
//! IOAPIC, an ICR write or an MSI) picks its LAPICs by physical or logical
//! destination or shorthand; each accepts it into its IRR (fixed, lowest
//! priority), or takes it as NMI, INIT or SIPI.

mod ioapic;
mod lapic;
pub mod pic;
pub mod pit;
mod timer;

use std::sync::Arc;

pub use ioapic::{Ioapic, IoapicLine, IoapicState, IOAPIC_PINS, IOAPIC_SIZE};
pub use lapic::{Lapic, LapicState, Startup, APIC_BASE_DEFAULT};
pub use pic::{Pic, PicState};
pub use pit::{Pit, PitState};
use timer::TimerThread;

/// How a message is delivered (ICR / redirection entry bits 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    StartUp,
    ExtInt,
}

impl DeliveryMode {
    /// From the three mode bits; 0b011 and 0b111 are reserved.
    pub fn from_bits(bits: u32) -> Option<DeliveryMode> {
        Some(match bits & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::StartUp,
            7 => DeliveryMode::ExtInt,
            _ => return None,
        })
    }
}

/// Which LAPICs an ICR write names besides its destination field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shorthand {
    None,
    SelfOnly,
    All,
    AllButSelf,
}

/// An interrupt message on its way to LAPICs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    pub vector: u8,
    pub mode: DeliveryMode,
    /// Logical destination mode (else physical).
    pub logical: bool,
    /// The destination: 8 bits from the IOAPIC, an MSI or an xAPIC ICR,
    /// 32 from an x2APIC ICR (see `wide`).
    pub dest: u32,
    /// The destination is x2APIC's 32-bit form.
    pub wide: bool,
    pub level_triggered: bool,
    /// Level: assert (INIT de-assert is level-triggered with this clear).
    pub assert: bool,
    pub shorthand: Shorthand,
    /// The sending LAPIC (for the shorthands).
    pub source: Option<usize>,
}

impl Message {
    /// A fixed, edge-triggered interrupt to one APIC id (physical).
    pub fn fixed(vector: u8, apic_id: u32) -> Message {
        Message {
            vector,
            mode: DeliveryMode::Fixed,
            logical: false,
            dest: apic_id,
            wide: false,
            level_triggered: false,
            assert: true,
            shorthand: Shorthand::None,
            source: None,
        }
    }
}

/// The LAPICs of a VM, by vCPU index (APIC id = index).
pub struct Lapics(Vec<Arc<Lapic>>);

impl Lapics {
    pub fn get(&self, vcpu: usize) -> Option<&Arc<Lapic>> {
        self.0.get(vcpu)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Lapic>> {
        self.0.iter()
    }

    /// Deliver `m` to every LAPIC it names (one of them for lowest
    /// priority). Returns how many took it.
    pub fn deliver(&self, m: &Message) -> usize {
        let targets = self
            .0
            .iter()
            .enumerate()
            .filter(|(i, l)| match m.shorthand {
                Shorthand::SelfOnly => m.source == Some(*i),
                Shorthand::All => true,
                Shorthand::AllButSelf => m.source != Some(*i),
                Shorthand::None => l.matches(m.dest, m.logical, m.wide),
            });
        if m.mode == DeliveryMode::LowestPriority {
            // The choice among the matching LAPICs is the platform's (SDM
            // 11.6.2.4): the one with the lowest processor priority,
            // the lowest id on a tie.
            return match targets.min_by_key(|(_, l)| l.processor_priority()) {
                Some((_, l)) => usize::from(l.accept(m)),
                None => 0,
            };
        }
        targets.map(|(_, l)| usize::from(l.accept(m))).sum()
    }
}

/// A VM's interrupt controllers: its LAPICs (and their timer thread) and
/// its IOAPIC. The vCPU exit path calls in here for the APIC page and
/// the APIC MSRs; devices pull IOAPIC lines.
pub struct Apics {
    lapics: Arc<Lapics>,
    ioapic: Arc<Ioapic>,
    _timers: TimerThread,
}

/// What an access to an APIC register asks of the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Effect {
    None,
    /// An ICR write: deliver this.
    Send(Message),
    /// An EOI of a level-triggered vector: the IOAPIC's remote IRR.
    LevelEoi(u8),
}

/// Why an APIC MSR access is refused (the guest gets #GP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MsrError {
    #[error("MSR {0:#x} is not an APIC register brisk models")]
    Unknown(u32),
    #[error("x2APIC MSR {0:#x} accessed while the APIC is not in x2APIC mode")]
    NotX2apic(u32),
    #[error("MSR {0:#x}: a reserved or read-only register, or a reserved bit set")]
    Invalid(u32),
}

/// The MSRs brisk's LAPIC answers.
pub mod msr {
    pub const APIC_BASE: u32 = 0x1b;
    pub const TSC_DEADLINE: u32 = 0x6e0;
    pub const X2APIC_FIRST: u32 = 0x800;
    pub const X2APIC_LAST: u32 = 0x8ff;
}

/// What the vCPU knows of its time stamp counter, for TSC-deadline writes.
#[derive(Clone, Copy, Debug)]
pub struct GuestTsc {
    /// The guest's TSC now.
    pub now: u64,
    /// Its frequency in kHz.
    pub khz: u64,
}

impl Apics {
    /// The controllers of a VM of `vcpus` vCPUs; `wake(i)` gets vCPU `i`
    /// out of the guest or its halt (it must not block). `init` runs
    /// first on the timer thread (a seccomp filter). vCPU 0 is the BSP;
    /// the others wait for INIT/SIPI when `aps_wait` (a kernel), or run.
    pub fn new(
        vcpus: usize,
        aps_wait: bool,
        wake: Arc<dyn Fn(usize) + Send + Sync>,
        init: Box<dyn FnOnce() + Send>,
    ) -> std::io::Result<Apics> {
        let queue = Arc::new(timer::TimerQueue::default());
        let lapics = (0..vcpus)
            .map(|i| {
                let wake = wake.clone();
                let start = if i == 0 || !aps_wait {
                    Startup::Run
                } else {
                    Startup::WaitForSipi
                };
                Arc::new(Lapic::new(
                    i as u32,
                    start,
                    queue.clone(),
                    Box::new(move || wake(i)),
                ))
            })
            .collect();
        let lapics = Arc::new(Lapics(lapics));
        let ioapic = Arc::new(Ioapic::new(lapics.clone()));
        let timers = TimerThread::start(queue, lapics.clone(), init)?;
        Ok(Apics {
            lapics,
            ioapic,
            _timers: timers,
        })
    }

    pub fn lapics(&self) -> &Arc<Lapics> {
        &self.lapics
    }

    pub fn lapic(&self, vcpu: usize) -> &Arc<Lapic> {
        &self.lapics.0[vcpu]
    }

    pub fn ioapic(&self) -> &Arc<Ioapic> {
        &self.ioapic
    }

    /// Whether `addr` is in vCPU `vcpu`'s APIC page (xAPIC mode).
    pub fn claims_mmio(&self, vcpu: usize, addr: u64) -> bool {
        self.lapic(vcpu).mmio_base() == Some(addr & !0xfff)
    }

    /// An MMIO read in vCPU `vcpu`'s APIC page.
    pub fn mmio_read(&self, vcpu: usize, addr: u64, data: &mut [u8]) {
        self.lapic(vcpu).mmio_read((addr & 0xfff) as u32, data);
    }

    /// An MMIO write in vCPU `vcpu`'s APIC page.
    pub fn mmio_write(&self, vcpu: usize, addr: u64, data: &[u8]) {
        let effect = self.lapic(vcpu).mmio_write((addr & 0xfff) as u32, data);
        self.apply(effect);
    }

    /// Whether `index` is an MSR brisk's LAPIC answers.
    pub fn is_apic_msr(index: u32) -> bool {
        matches!(index, msr::APIC_BASE | msr::TSC_DEADLINE)
            || (msr::X2APIC_FIRST..=msr::X2APIC_LAST).contains(&index)
    }

    /// RDMSR of an APIC MSR on vCPU `vcpu`.
    pub fn msr_read(&self, vcpu: usize, index: u32) -> Result<u64, MsrError> {
        self.lapic(vcpu).msr_read(index)
    }

    /// WRMSR of an APIC MSR on vCPU `vcpu`; `tsc` is asked for only by a
    /// TSC-deadline write.
    pub fn msr_write(
        &self,
        vcpu: usize,
        index: u32,
        value: u64,
        tsc: &mut dyn FnMut() -> Option<GuestTsc>,
    ) -> Result<(), MsrError> {
        let effect = self.lapic(vcpu).msr_write(index, value, tsc)?;
        self.apply(effect);
        Ok(())
    }

    /// Deliver an MSI (address/data as a PCI device writes them).
    pub fn signal_msi(&self, address: u64, data: u32) -> usize {
        self.lapics.deliver(&Message {
            vector: data as u8,
            mode: DeliveryMode::from_bits(data >> 8).unwrap_or(DeliveryMode::Fixed),
            logical: address & (1 << 2) != 0,
            dest: ((address >> 12) & 0xff) as u32,
            wide: false,
            level_triggered: data & (1 << 15) != 0,
            assert: true,
            shorthand: Shorthand::None,
            source: None,
        })
    }

    fn apply(&self, effect: Effect) {
        match effect {
            Effect::None => {}
            Effect::Send(m) => {
                self.lapics.deliver(&m);
            }
            Effect::LevelEoi(vector) => self.ioapic.eoi(vector),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    fn apics(n: usize) -> (Apics, Arc<AtomicUsize>) {
        let woken = Arc::new(AtomicUsize::new(0));
        let w = woken.clone();
        let a = Apics::new(
            n,
            true,
            Arc::new(move |_| {
                w.fetch_add(1, SeqCst);
            }),
            Box::new(|| {}),
        )
        .unwrap();
        for i in 0..n {
            a.mmio_write(i, APIC_BASE_DEFAULT | 0xf0, &0x1ffu32.to_le_bytes());
        }
        (a, woken)
    }

    #[test]
    fn an_msi_reaches_the_lapic_its_address_names() {
        let (a, _) = apics(3);
        // Physical destination 2, fixed, vector 0x51.
        assert_eq!(a.signal_msi(0xfee0_0000 | (2 << 12), 0x51), 1);
        assert_eq!(a.lapic(2).acknowledge(), Some(0x51));
        assert_eq!(a.lapic(0).acknowledge(), None);
    }

    #[test]
    fn lowest_priority_picks_one_lapic_and_broadcast_reaches_all() {
        let (a, _) = apics(3);
        // LAPIC 0 busy at TPR 0x80: lowest priority goes elsewhere.
        a.mmio_write(0, APIC_BASE_DEFAULT | 0x80, &0x80u32.to_le_bytes());
        let mut m = Message::fixed(0x61, 0xff);
        m.mode = DeliveryMode::LowestPriority;
        assert_eq!(a.lapics().deliver(&m), 1);
        assert_eq!(a.lapic(1).acknowledge(), Some(0x61));
        assert_eq!(a.lapics().deliver(&Message::fixed(0x62, 0xff)), 3);
    }

    #[test]
    fn an_icr_write_in_the_page_starts_the_aps_and_wakes_them() {
        let (a, woken) = apics(3);
        assert_eq!(a.lapic(1).startup(), Startup::WaitForSipi);
        let icr = |v: u32| a.mmio_write(0, APIC_BASE_DEFAULT | 0x300, &v.to_le_bytes());
        icr(0x000c_4500); // INIT to all but self
        icr(0x000c_4609); // SIPI vector 9
        for ap in 1..3 {
            assert_eq!(a.lapic(ap).startup(), Startup::Sipi(9));
        }
        assert_eq!(a.lapic(0).startup(), Startup::Run);
        assert_eq!(woken.load(SeqCst), 4);
        assert!(a.claims_mmio(0, APIC_BASE_DEFAULT + 0x20));
        assert!(!a.claims_mmio(0, APIC_BASE_DEFAULT + 0x1000));
    }
}
