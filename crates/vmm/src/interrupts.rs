//! Interrupts in `Irqchip::User` mode: devices raise a vector, the target
//! vCPU's pending set records it and the vCPU is kicked with
//! `Request::Interrupt`, so it leaves the guest (a signal) or its user-space
//! halt (a futex wake), and injects the vector before its next entry.

use std::sync::Arc;

use brisk_control::Request;
use brisk_devices::InterruptSink;
use brisk_kvm::PendingInterrupts;

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
