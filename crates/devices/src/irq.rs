//! How devices raise interrupts without knowing the irqchip.

/// Where devices that choose their target send interrupts (the user
/// irqchip's timers and doorbell: `(vcpu, vector)` is theirs to pick). The
/// VMM implements it (mark the vector pending, kick the vCPU); it must not
/// block.
pub trait InterruptSink: Send + Sync {
    /// Raise `vector` on vCPU `vcpu`. Returns false if there is no such vCPU.
    fn raise(&self, vcpu: usize, vector: u8) -> bool;
}

/// A device's interrupt line, wired once by the platform: under the kernel
/// irqchip an IOAPIC GSI (through an irqfd) or an MSI; under the user
/// irqchip a vector on a vCPU. The device only pulls it.
pub trait IrqLine: Send + Sync {
    /// Signal the interrupt (an edge). Must not block.
    fn trigger(&self);
}
