//! brisk's KVM plumbing: the VM and its memory, vCPU file descriptors, and
//! the kick signal that sets `kvm_run.immediate_exit`.
//!
//! [`KvmVcpu`] implements [`brisk_control::Guest`], so the control plane's
//! run loop drives it without knowing it is KVM.

mod dirty_ring;
mod error;
mod exact;
mod interrupts;
mod kick;
mod memory;
mod state;
mod vcpu;
mod vm;

pub use error::{Error, Result};
pub use interrupts::{InterruptController, InterruptStats, PendingInterrupts, Startup};
pub use kick::{kick_signal, SignalInterrupt};
pub use memory::{check_memfd_sealed, GuestRam, MemfdError, MemoryBacking, PAGE_SIZE};
pub use state::{VcpuSnapshot, VmSnapshot};
pub use vcpu::{Exit, KvmVcpu};
pub use vm::{Irqchip, Mwait, Vm};
