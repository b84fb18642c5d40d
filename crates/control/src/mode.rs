//! Where a vCPU thread is, published for requesters to read.

use std::sync::atomic::Ordering;

use crate::sync::AtomicU8;

/// The vCPU thread's position, as requesters see it.
///
/// Only the vCPU thread stores a mode, except for the one transition a
/// kicker makes: `InGuest -> Exiting` by compare-and-swap, which elects the
/// single kicker that sends a signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Mode {
    /// In user space handling an exit or requests; will check requests
    /// before it enters the guest again. Kicks need no signal.
    Outside = 0,
    /// About to enter or inside the guest; a kick must signal.
    InGuest = 1,
    /// A kicker has signalled this entry; later kickers need not.
    Exiting = 2,
    /// Blocked in user space because the guest executed HLT; a kick wakes
    /// it with a futex, never a signal.
    Halted = 3,
    /// Blocked in user space because a controller stopped it; a kick wakes
    /// it with a futex, never a signal.
    Parked = 4,
    /// The vCPU thread has left its loop for good.
    Exited = 5,
}

impl Mode {
    fn from_u8(v: u8) -> Mode {
        match v {
            0 => Mode::Outside,
            1 => Mode::InGuest,
            2 => Mode::Exiting,
            3 => Mode::Halted,
            4 => Mode::Parked,
            _ => Mode::Exited,
        }
    }

    /// Lower-case name, as shown by the CLI and API.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Outside => "outside",
            Mode::InGuest => "in-guest",
            Mode::Exiting => "exiting",
            Mode::Halted => "halted",
            Mode::Parked => "parked",
            Mode::Exited => "exited",
        }
    }
}

/// A [`Mode`] in an atomic byte. Every access is SeqCst: the protocol's
/// store-then-load pairs (Dekker) need a total order, not acquire/release.
#[derive(Debug)]
pub(crate) struct AtomicMode(AtomicU8);

impl AtomicMode {
    pub(crate) fn new(m: Mode) -> Self {
        AtomicMode(AtomicU8::new(m as u8))
    }

    pub(crate) fn load(&self) -> Mode {
        Mode::from_u8(self.0.load(Ordering::SeqCst))
    }

    pub(crate) fn store(&self, m: Mode) {
        // loom 0.7 lets a plain store slip between the read and the write
        // of a concurrent compare-exchange (tokio-rs/loom#254, #389): an
        // execution C11 forbids, reported as a lost wake-up. In the model
        // the store is a release swap, an RMW loom orders correctly, with no
        // acquire edge the real store lacks.
        #[cfg(loom)]
        self.0.swap(m as u8, Ordering::Release);
        #[cfg(not(loom))]
        self.0.store(m as u8, Ordering::SeqCst)
    }

    /// Store `m` with release order only (a plain `mov` on x86, no locked
    /// instruction): for the `Outside` the vCPU publishes after each guest
    /// entry. It pairs with no load: a kicker that still reads the stale
    /// `InGuest` (or `Exiting`) signals or elides as for that entry, which
    /// costs at most one cancelled or spurious entry, and one that reads
    /// `Outside` has published its request before the vCPU's next SeqCst
    /// `InGuest` store, whose following load of `requests` sees it.
    pub(crate) fn store_release(&self, m: Mode) {
        #[cfg(loom)]
        self.0.swap(m as u8, Ordering::Release);
        #[cfg(not(loom))]
        self.0.store(m as u8, Ordering::Release)
    }

    /// `InGuest -> Exiting`; on failure returns the mode seen.
    pub(crate) fn claim_exit(&self) -> Result<(), Mode> {
        self.0
            .compare_exchange(
                Mode::InGuest as u8,
                Mode::Exiting as u8,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .map(|_| ())
            .map_err(Mode::from_u8)
    }
}
