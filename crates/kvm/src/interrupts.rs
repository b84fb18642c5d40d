//! Interrupts for a VM without an in-kernel irqchip (`Irqchip::User`).
//!
//! Any thread raises a vector in a vCPU's [`PendingInterrupts`]; the vCPU
//! thread injects the highest pending vector with KVM_INTERRUPT before an
//! entry when KVM says the guest can take one (`kvm_run.ready_for_interrupt_injection`),
//! and otherwise sets `request_interrupt_window` so KVM exits
//! (KVM_EXIT_IRQ_WINDOW_OPEN) as soon as it can. Whoever raises must also
//! get the vCPU out of the guest or its halt (brisk's VMM kicks it with
//! `Request::Interrupt`). Like an APIC's IRR, one pending bit per vector:
//! a vector raised again before it is injected is coalesced.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Mutex;
use std::time::Instant;

const WORDS: usize = 4;

/// Where a vCPU's interrupts come from under the user irqchip: what it
/// injects before each entry, and whether it may run at all. Brisk's
/// LAPIC model implements it for kernels; [`PendingInterrupts`] (vectors
/// with no APIC: no priority, no EOI) for the built-in guests.
pub trait InterruptController: Send + Sync {
    /// Take the vector to inject now, if one may be delivered (a LAPIC
    /// moves it from its IRR to its ISR).
    fn acknowledge(&self) -> Option<u8>;
    /// Whether [`InterruptController::acknowledge`] would give a vector
    /// (a HLT with interrupts enabled must not halt then).
    fn deliverable(&self) -> bool;
    /// An NMI or a start-up IPI is waiting: it ends a halt whatever
    /// RFLAGS.IF says.
    fn must_wake(&self) -> bool {
        false
    }
    /// Take a pending NMI (injected with KVM_NMI).
    fn take_nmi(&self) -> bool {
        false
    }
    /// Whether the vCPU may run, waits for a start-up IPI, or starts in
    /// real mode at a SIPI's vector (handed over once).
    fn startup(&self) -> Startup {
        Startup::Run
    }
    /// The task priority as CR8 shows it (bits 7:4 of the TPR), where
    /// the controller has one (`None`: CR8 is the guest's alone).
    fn cr8(&self) -> Option<u8> {
        None
    }
    /// The guest wrote CR8 (only called where `cr8` is `Some`).
    fn set_cr8(&self, _cr8: u8) {}
}

/// A vCPU's start-up state (INIT/SIPI, SDM 8.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Startup {
    Run,
    WaitForSipi,
    Sipi(u8),
}

/// What happened to a vCPU's interrupts so far (statistics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterruptStats {
    /// `raise` calls.
    pub raised: u64,
    /// Raises that found their vector still pending (merged into it).
    pub coalesced: u64,
    /// Vectors handed to KVM_INTERRUPT.
    pub injected: u64,
    /// Sum and maximum, over injections, of the time from the raise to
    /// KVM_INTERRUPT: the latency brisk adds (exits, halts, idle tasks).
    pub latency_ns: u64,
    pub max_latency_ns: u64,
}

impl InterruptStats {
    /// Every statistic as (name, help, value), the one list both API
    /// renderings walk (a new field fails to compile until listed).
    pub fn fields(&self) -> [(&'static str, &'static str, u64); 5] {
        let InterruptStats {
            raised,
            coalesced,
            injected,
            latency_ns,
            max_latency_ns,
        } = *self;
        [
            ("raised", "Interrupts raised (user irqchip).", raised),
            (
                "coalesced",
                "Interrupts merged into one still pending.",
                coalesced,
            ),
            (
                "injected",
                "Interrupts injected with KVM_INTERRUPT.",
                injected,
            ),
            (
                "latency_ns",
                "Nanoseconds from raise to injection, summed.",
                latency_ns,
            ),
            (
                "max_latency_ns",
                "Longest raise-to-injection time, in nanoseconds.",
                max_latency_ns,
            ),
        ]
    }
}

/// The pending vectors of one vCPU and their statistics.
pub struct PendingInterrupts {
    bits: [AtomicU64; WORDS],
    /// When each pending vector was raised, in ns since `epoch`.
    raised_at: [AtomicU64; 256],
    epoch: Instant,
    raised: AtomicU64,
    coalesced: AtomicU64,
    injected: AtomicU64,
    latency_ns: AtomicU64,
    max_latency_ns: AtomicU64,
    /// Opt-in per-injection latencies (benchmarks), see `log_latencies`.
    logging: AtomicBool,
    log: Mutex<Vec<u64>>,
}

impl Default for PendingInterrupts {
    fn default() -> Self {
        PendingInterrupts {
            bits: Default::default(),
            raised_at: std::array::from_fn(|_| AtomicU64::new(0)),
            epoch: Instant::now(),
            raised: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            latency_ns: AtomicU64::new(0),
            max_latency_ns: AtomicU64::new(0),
            logging: AtomicBool::new(false),
            log: Mutex::new(Vec::new()),
        }
    }
}

impl PendingInterrupts {
    /// Mark `vector` pending. Returns false if it already was (coalesced).
    ///
    /// ```
    /// let p = brisk_kvm::PendingInterrupts::default();
    /// assert!(p.raise(0x20));
    /// assert!(!p.raise(0x20));
    /// assert!(p.any());
    /// assert_eq!(p.stats().coalesced, 1);
    /// ```
    pub fn raise(&self, vector: u8) -> bool {
        self.raised.fetch_add(1, Relaxed);
        let (word, mask) = Self::slot(vector);
        if self.bits[word].load(Relaxed) & mask == 0 {
            // Stamped before the bit is published (release below); a
            // racing injection may pair a bit with a neighbour's stamp,
            // which only blurs a statistic.
            self.raised_at[vector as usize].store(self.now_ns(), Relaxed);
        }
        let fresh = self.bits[word].fetch_or(mask, Release) & mask == 0;
        if !fresh {
            self.coalesced.fetch_add(1, Relaxed);
        }
        fresh
    }

    /// The pending vectors, lowest first (a snapshot's; none are taken).
    pub fn pending_vectors(&self) -> Vec<u8> {
        (0..=255u8)
            .filter(|&v| {
                let (word, mask) = Self::slot(v);
                self.bits[word].load(Acquire) & mask != 0
            })
            .collect()
    }

    /// Whether any vector is pending.
    #[inline]
    pub fn any(&self) -> bool {
        self.bits.iter().any(|w| w.load(Relaxed) != 0)
    }

    /// Remove and return the highest pending vector (the highest priority,
    /// as on an APIC), recording its latency.
    pub(crate) fn take_highest(&self) -> Option<u8> {
        for word in (0..WORDS).rev() {
            let mut bits = self.bits[word].load(Acquire);
            while bits != 0 {
                let bit = 63 - bits.leading_zeros() as usize;
                let prev = self.bits[word].fetch_and(!(1u64 << bit), Acquire);
                if prev & (1u64 << bit) != 0 {
                    let vector = (word * 64 + bit) as u8;
                    self.record_injection(vector);
                    return Some(vector);
                }
                bits = prev & !(1u64 << bit);
            }
        }
        None
    }

    fn record_injection(&self, vector: u8) {
        let at = self.raised_at[vector as usize].load(Relaxed);
        let ns = self.now_ns().saturating_sub(at);
        self.injected.fetch_add(1, Relaxed);
        self.latency_ns.fetch_add(ns, Relaxed);
        self.max_latency_ns.fetch_max(ns, Relaxed);
        if self.logging.load(Relaxed) {
            self.log.lock().unwrap_or_else(|p| p.into_inner()).push(ns);
        }
    }

    /// Start (or stop) keeping every injection's latency, for
    /// distributions; off by default (it takes a lock per injection).
    pub fn log_latencies(&self, on: bool) {
        self.logging.store(on, Relaxed);
    }

    /// The latencies logged so far (ns), emptying the log.
    pub fn take_latencies(&self) -> Vec<u64> {
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> InterruptStats {
        InterruptStats {
            raised: self.raised.load(Relaxed),
            coalesced: self.coalesced.load(Relaxed),
            injected: self.injected.load(Relaxed),
            latency_ns: self.latency_ns.load(Relaxed),
            max_latency_ns: self.max_latency_ns.load(Relaxed),
        }
    }

    fn slot(vector: u8) -> (usize, u64) {
        (vector as usize / 64, 1u64 << (vector % 64))
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

impl InterruptController for PendingInterrupts {
    fn acknowledge(&self) -> Option<u8> {
        self.take_highest()
    }

    fn deliverable(&self) -> bool {
        self.any()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_vector_goes_first_and_each_once() {
        let p = PendingInterrupts::default();
        for v in [0x20, 0xff, 0x41, 0x40] {
            assert!(p.raise(v));
        }
        let order: Vec<u8> = std::iter::from_fn(|| p.take_highest()).collect();
        assert_eq!(order, [0xff, 0x41, 0x40, 0x20]);
        assert!(!p.any());
        let s = p.stats();
        assert_eq!((s.raised, s.injected, s.coalesced), (4, 4, 0));
    }
}
