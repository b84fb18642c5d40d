//! What the control plane needs from "entering the guest".

use crate::ExitKind;

/// Sends the kick to a vCPU thread that may be inside the guest: for KVM, a
/// real-time signal whose handler sets `kvm_run.immediate_exit`.
pub trait Interrupt: Send + Sync {
    /// Make the thread's current or next guest entry return promptly.
    fn interrupt(&self);
}

/// Maps an exit to the counter it is recorded under.
pub trait Classify {
    fn kind(&self) -> ExitKind;
}

/// A vCPU as the run loop drives it. Implemented by brisk's KVM vCPU and by
/// stand-ins in tests.
pub trait Guest {
    /// What the guest stopped for.
    type Exit: Classify;
    type Error;

    /// Called once on the vCPU thread before the first entry: prepare
    /// whatever the interrupt needs on this thread (e.g. the signal
    /// handler's pointer to `immediate_exit`) and return the interrupt.
    fn bind_thread(&mut self) -> Box<dyn Interrupt>;

    /// M:N: called on the thread that ran the vCPU as it hands it on (or
    /// ends it there), once no kicker can signal that thread for it any
    /// more: undo what `bind_thread` prepared on this thread, so the
    /// vCPU can be bound to (and dropped on) another. A late signal that
    /// was already sent then finds nothing of this vCPU's to touch.
    fn unbind_thread(&mut self) {}

    /// Arm or disarm the flag the interrupt sets, which makes the next or
    /// current entry return at once.
    fn set_immediate_exit(&mut self, on: bool);

    /// Run the guest until it exits. `Ok(None)`: the entry was cut short by
    /// the interrupt (or `immediate_exit`), with no exit to handle.
    fn enter(&mut self) -> Result<Option<Self::Exit>, Self::Error>;

    /// Finish an instruction the guest has half-done (a PIO-in or MMIO-read
    /// completes on the next entry) without running further guest code, so
    /// that a parked vCPU's state is consistent. `Ok(Some(exit))`: finishing
    /// it produced another exit of the same instruction (KVM splits a wide
    /// or page-crossing MMIO access into fragments, string PIO into
    /// batches), which the run loop hands to the exit handler before it
    /// calls `settle` again; `Ok(None)`: nothing is left half-done.
    fn settle(&mut self) -> Result<Option<Self::Exit>, Self::Error>;

    /// Whether an interrupt is pending that the guest would take if it ran
    /// now (it has interrupts enabled). A [`crate::Request::Interrupt`] ends
    /// a halt only then: a masked interrupt leaves `cli; hlt` halted, as on
    /// hardware.
    fn interrupt_deliverable(&self) -> bool;

    /// Called on the vCPU thread as it parks for a controller (after
    /// `settle`): tell the guest that its clock is about to stop (for KVM,
    /// `KVM_KVMCLOCK_CTRL`), so a pause does not look like a lock-up.
    fn parking(&mut self);
}

/// What the exit handler tells the run loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Enter the guest again.
    Continue,
    /// The guest halted: block in user space until kicked, then continue.
    Halt,
    /// The guest is done (power-off, fatal exit): leave the loop.
    Exit,
}
