//! Interrupts in `Irqchip::User` mode: devices raise a vector, the target
//! vCPU's pending set records it and the vCPU is kicked with
//! `Request::Interrupt`, so it leaves the guest (a signal) or its user-space
//! halt (a futex wake), and injects the vector before its next entry.

use std::sync::Arc;

use brisk_control::Request;
use brisk_devices::apic::Startup as ApicStartup;
use brisk_devices::{InterruptSink, Lapic};
use brisk_kvm::{InterruptController, PendingInterrupts, Startup};

use crate::Vcpu;

/// The VM's interrupt sink: one pending set per vCPU, and its control block.
pub struct UserInterrupts {
    pending: Vec<Arc<PendingInterrupts>>,
    vcpus: Vec<Arc<Vcpu>>,
}

impl UserInterrupts {
    pub(crate) fn new(pending: Vec<Arc<PendingInterrupts>>, vcpus: Vec<Arc<Vcpu>>) -> Self {
        UserInterrupts { pending, vcpus }
    }

    /// vCPU `id`'s pending set (and its statistics).
    pub fn pending(&self, id: usize) -> &PendingInterrupts {
        &self.pending[id]
    }
}

/// A vCPU's interrupts from brisk's LAPIC model (kernels under the user
/// irqchip): what the KVM adapter injects, and the vCPU's INIT/SIPI state.
pub(crate) struct LapicSource(pub(crate) Arc<Lapic>);

impl InterruptController for LapicSource {
    fn acknowledge(&self) -> Option<u8> {
        self.0.acknowledge()
    }

    fn deliverable(&self) -> bool {
        self.0.deliverable()
    }

    fn must_wake(&self) -> bool {
        self.0.must_wake()
    }

    fn take_nmi(&self) -> bool {
        self.0.take_nmi()
    }

    fn startup(&self) -> Startup {
        match self.0.startup() {
            ApicStartup::Run => Startup::Run,
            ApicStartup::WaitForSipi => Startup::WaitForSipi,
            ApicStartup::Sipi(v) => Startup::Sipi(v),
        }
    }

    fn cr8(&self) -> Option<u8> {
        Some(self.0.cr8())
    }

    fn set_cr8(&self, cr8: u8) {
        self.0.set_cr8(cr8)
    }
}

impl InterruptSink for UserInterrupts {
    fn raise(&self, vcpu: usize, vector: u8) -> bool {
        let (Some(pending), Some(ctl)) = (self.pending.get(vcpu), self.vcpus.get(vcpu)) else {
            return false;
        };
        // Pending first, then the kick (a SeqCst fetch_or the vCPU swaps
        // before entering): it cannot enter without seeing the vector. A
        // vector already pending was kicked for by whoever raised it first.
        if pending.raise(vector) {
            ctl.kick(Request::Interrupt);
        }
        true
    }
}
