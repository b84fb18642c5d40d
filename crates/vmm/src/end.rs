//! How a VM ended (recorded by `lifecycle`, as its last state).

use std::fmt;

/// Why the VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest powered off.
    PowerOff,
    /// The guest wrote this value to the debug-exit port.
    DebugExit(u32),
    /// The guest reset the machine (the keyboard controller's reset line:
    /// Linux's `reboot`, with `reboot=k`). brisk ends the VM, as
    /// Firecracker does, rather than booting it again.
    Reboot,
    /// The guest kernel panicked (reported through pvpanic).
    Panicked,
    /// A vCPU hit something the guest cannot continue from.
    Crash { vcpu: usize, what: String, rip: u64 },
    /// A vCPU thread failed (KVM error or panic).
    VcpuFailed { vcpu: usize, error: String },
    /// A thread of the vCPU pool could not start (M:N).
    PoolThreadFailed { thread: usize, error: String },
    /// The wait's timeout passed with the guest still running.
    Timeout,
    /// The caller's interrupt fd became readable (e.g. Ctrl-C).
    Interrupted,
    /// A controller asked for it (e.g. `PUT /api/v1/vm.shutdown`).
    ShutdownRequested,
    /// The VM was migrated: it runs at `to` now.
    Migrated { to: String },
}

impl fmt::Display for VmEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmEnd::PowerOff => write!(f, "guest powered off"),
            VmEnd::DebugExit(v) => write!(f, "guest wrote {v:#x} to the debug-exit port"),
            VmEnd::Reboot => write!(f, "guest rebooted (reset through the keyboard controller)"),
            VmEnd::Panicked => write!(f, "guest kernel panicked"),
            VmEnd::Crash { vcpu, what, rip } => {
                write!(f, "guest crashed: vCPU {vcpu}: {what} at RIP {rip:#x}")
            }
            VmEnd::VcpuFailed { vcpu, error } => write!(f, "vCPU {vcpu} failed: {error}"),
            VmEnd::PoolThreadFailed { thread, error } => {
                write!(f, "vCPU pool thread {thread} failed: {error}")
            }
            VmEnd::Timeout => write!(f, "timed out with the guest still running"),
            VmEnd::Interrupted => write!(f, "interrupted"),
            VmEnd::ShutdownRequested => write!(f, "shut down on request"),
            VmEnd::Migrated { to } => write!(f, "migrated to {to}"),
        }
    }
}
