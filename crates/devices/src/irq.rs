//! How devices raise interrupts without knowing the irqchip.

/// Where devices send interrupts. The VMM implements it (for the user
/// irqchip: mark the vector pending, kick the vCPU); it must not block.
pub trait InterruptSink: Send + Sync {
    /// Raise `vector` on vCPU `vcpu`. Returns false if there is no such vCPU.
    fn raise(&self, vcpu: usize, vector: u8) -> bool;
}
