//! Per-vCPU counters that make the protocol's claims visible.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why the guest returned to user space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitKind {
    /// Port I/O.
    Io,
    /// Memory-mapped I/O.
    Mmio,
    /// HLT (or MWAIT treated as one) handled in user space.
    Halt,
    /// The guest shut down, reset or triple-faulted.
    Shutdown,
    /// Anything else (internal errors, unhandled exit reasons).
    Other,
}

impl ExitKind {
    /// Every kind, in counter order.
    pub const ALL: [ExitKind; 5] = [
        ExitKind::Io,
        ExitKind::Mmio,
        ExitKind::Halt,
        ExitKind::Shutdown,
        ExitKind::Other,
    ];

    /// Lower-case name, as shown by the CLI and API.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::Io => "io",
            ExitKind::Mmio => "mmio",
            ExitKind::Halt => "halt",
            ExitKind::Shutdown => "shutdown",
            ExitKind::Other => "other",
        }
    }
}

/// Live counters of one vCPU. Written with relaxed atomics: each is a
/// statistic, never used to synchronise.
#[derive(Debug, Default)]
pub struct Counters {
    exits: [AtomicU64; ExitKind::ALL.len()],
    pub(crate) entries: AtomicU64,
    pub(crate) cancelled_entries: AtomicU64,
    pub(crate) kicks: AtomicU64,
    pub(crate) signals_sent: AtomicU64,
    pub(crate) signals_elided: AtomicU64,
    pub(crate) wakeups: AtomicU64,
    pub(crate) kicked_exits: AtomicU64,
    pub(crate) spurious_exits: AtomicU64,
    pub(crate) work_run: AtomicU64,
    pub(crate) settle_exits: AtomicU64,
    pub(crate) parked_ns: AtomicU64,
    pub(crate) halted_ns: AtomicU64,
    pub(crate) idle_tasks: AtomicU64,
    pub(crate) idle_task_ns: AtomicU64,
}

impl Counters {
    /// Count an exit (vCPU thread only).
    pub(crate) fn exit(&self, kind: ExitKind) {
        Self::bump_own(&self.exits[kind as usize]);
    }

    /// Add one to a counter other threads may also add to (kicks, signals).
    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    /// Add one to a counter only the vCPU thread writes: a plain load and
    /// store, no locked instruction on the exit path. Readers see a value
    /// that is at worst one increment old.
    pub(crate) fn bump_own(c: &AtomicU64) {
        c.store(c.load(Relaxed) + 1, Relaxed);
    }

    /// A consistent-enough copy for reporting (each field read once).
    pub fn snapshot(&self) -> CounterSnapshot {
        let get = |c: &AtomicU64| c.load(Relaxed);
        CounterSnapshot {
            exits: ExitKind::ALL.map(|k| (k, get(&self.exits[k as usize]))),
            entries: get(&self.entries),
            cancelled_entries: get(&self.cancelled_entries),
            kicks: get(&self.kicks),
            signals_sent: get(&self.signals_sent),
            signals_elided: get(&self.signals_elided),
            wakeups: get(&self.wakeups),
            kicked_exits: get(&self.kicked_exits),
            spurious_exits: get(&self.spurious_exits),
            work_run: get(&self.work_run),
            settle_exits: get(&self.settle_exits),
            parked_ns: get(&self.parked_ns),
            halted_ns: get(&self.halted_ns),
            idle_tasks: get(&self.idle_tasks),
            idle_task_ns: get(&self.idle_task_ns),
        }
    }
}

/// A copy of [`Counters`] at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Guest exits handled in user space, by kind.
    pub exits: [(ExitKind, u64); ExitKind::ALL.len()],
    /// Guest entries (KVM_RUN calls that were not skipped).
    pub entries: u64,
    /// Entries abandoned after publishing InGuest because a request was
    /// already pending (Dekker step 3). A kicker may have signalled these
    /// too, so signals_sent <= entries + cancelled_entries.
    pub cancelled_entries: u64,
    /// Kicks requested (every `kick`, `stop`, `run_on`...).
    pub kicks: u64,
    /// Kick signals sent to the vCPU thread.
    pub signals_sent: u64,
    /// Kicks that needed no signal: the vCPU was outside the guest, parked,
    /// or another kicker had already signalled this entry.
    pub signals_elided: u64,
    /// Kicks that woke a vCPU blocked in user space (futex, no signal).
    pub wakeups: u64,
    /// Entries cut short by a kick that had a request to deliver.
    pub kicked_exits: u64,
    /// Entries cut short by a late signal with nothing to deliver.
    pub spurious_exits: u64,
    /// Work items (`run_on`) executed on the vCPU thread.
    pub work_run: u64,
    /// Exits served while completing a half-done access before a park or
    /// `run_on` (the second fragment of a split MMIO access, a string PIO
    /// batch).
    pub settle_exits: u64,
    /// Nanoseconds spent parked by controllers.
    pub parked_ns: u64,
    /// Nanoseconds spent halted in user space (idle time, including idle
    /// tasks).
    pub halted_ns: u64,
    /// Idle-time tasks (`run_when_idle`) run while halted.
    pub idle_tasks: u64,
    /// Nanoseconds spent in idle-time tasks.
    pub idle_task_ns: u64,
}

impl CounterSnapshot {
    /// Every counter but the exits by kind, as (name, help, value): the one
    /// list the API's JSON and Prometheus renderings both walk. The
    /// exhaustive destructuring makes a new field a compile error here
    /// until it is listed.
    pub fn fields(&self) -> [(&'static str, &'static str, u64); 14] {
        let CounterSnapshot {
            exits: _,
            entries,
            cancelled_entries,
            kicks,
            signals_sent,
            signals_elided,
            wakeups,
            kicked_exits,
            spurious_exits,
            work_run,
            settle_exits,
            parked_ns,
            halted_ns,
            idle_tasks,
            idle_task_ns,
        } = *self;
        [
            ("entries", "Guest entries (KVM_RUN calls).", entries),
            (
                "cancelled_entries",
                "Entries abandoned because a request was already pending.",
                cancelled_entries,
            ),
            ("kicks", "Kicks requested.", kicks),
            ("signals_sent", "Kick signals sent.", signals_sent),
            (
                "signals_elided",
                "Kicks that needed no signal.",
                signals_elided,
            ),
            (
                "wakeups",
                "Futex wake-ups of vCPUs blocked in user space.",
                wakeups,
            ),
            (
                "kicked_exits",
                "Entries cut short by a kick with a request to deliver.",
                kicked_exits,
            ),
            (
                "spurious_exits",
                "Entries cut short by a late signal with nothing to do.",
                spurious_exits,
            ),
            ("work_run", "run_on closures executed.", work_run),
            (
                "settle_exits",
                "Exits served while completing a half-done access before a park.",
                settle_exits,
            ),
            ("parked_ns", "Nanoseconds parked by controllers.", parked_ns),
            ("halted_ns", "Nanoseconds halted in user space.", halted_ns),
            ("idle_tasks", "Idle-time tasks run.", idle_tasks),
            (
                "idle_task_ns",
                "Nanoseconds spent in idle-time tasks.",
                idle_task_ns,
            ),
        ]
    }

    /// Exits of one kind.
    pub fn exits_of(&self, kind: ExitKind) -> u64 {
        self.exits[kind as usize].1
    }
}
