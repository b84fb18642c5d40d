//! Request bits: what the vCPU must do before its next guest entry.

/// One request bit. Requests are a set: several kicks of the same bit before
/// the vCPU looks coalesce into one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Request {
    /// Leave the guest once, do nothing else (latency probes, re-evaluation).
    Kick = 1 << 0,
    /// Park outside guest mode until resumed.
    Stop = 1 << 1,
    /// Run the queued work items.
    Work = 1 << 2,
    /// Leave the run loop for good.
    Exit = 1 << 3,
    /// An interrupt is pending for the guest: leave the guest (or the halt)
    /// so the next entry can inject it.
    Interrupt = 1 << 4,
    /// M:N: the vCPU's time slice is over and another vCPU waits for a
    /// thread: leave this one (a no-op if nobody waits by then).
    Preempt = 1 << 5,
}

impl Request {
    pub(crate) const fn bit(self) -> u32 {
        self as u32
    }
}

/// Bits that must wake a vCPU parked by a controller (a stop does not: it
/// is already stopped).
pub(crate) const WAKES_PARKED: u32 = Request::Work.bit() | Request::Exit.bit();
