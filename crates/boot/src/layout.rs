//! Guest physical memory layout for built-in guests.

/// GDT: null, 64-bit code (0x8), data (0x10), TSS (0x18).
pub const GDT: u64 = 0x500;
/// Page tables: PML4, one PDPT, four PDs of 2 MiB pages (identity map of
/// the low 4 GiB, so MMIO above RAM is reachable).
pub const PML4: u64 = 0x1000;
pub const PDPT: u64 = 0x2000;
pub const PD: u64 = 0x3000;
pub const PD_COUNT: u64 = 4;
/// An IDT (256 gates, 4 KiB) for guests that take interrupts.
pub const IDT: u64 = 0x7000;
/// Per-vCPU data, one cache line each: `+0` progress counter the guest
/// increments, `+8` last value read from its counter device.
pub const VCPU_DATA: u64 = 0x8000;
pub const VCPU_DATA_STRIDE: u64 = 64;
/// Variables shared by all vCPUs of a guest (e.g. `hello`'s turn counter).
pub const SHARED: u64 = 0x9000;
/// Per-vCPU pvclock structures of the `kvmclock` guest (32 bytes each,
/// at the `VCPU_DATA_STRIDE` stride).
pub const PVCLOCK: u64 = 0xA000;
/// Stacks, one page per vCPU, growing down from `STACKS + (id + 1) * STACK_SIZE`.
pub const STACKS: u64 = 0x10000;
pub const STACK_SIZE: u64 = 0x1000;
/// Where guest code is loaded and every vCPU starts.
pub const CODE: u64 = 0x10_0000;
/// The most vCPUs this layout has room for.
pub const MAX_VCPUS: usize = 64;
/// The least RAM a built-in guest needs (code at 1 MiB, plus room).
pub const MIN_MEMORY: u64 = 2 << 20;

/// Address of vCPU `id`'s progress counter.
pub const fn progress(id: usize) -> u64 {
    VCPU_DATA + id as u64 * VCPU_DATA_STRIDE
}

/// Address of vCPU `id`'s last counter-device value.
pub const fn last_read(id: usize) -> u64 {
    progress(id) + 8
}

/// Top of vCPU `id`'s stack.
pub const fn stack_top(id: usize) -> u64 {
    STACKS + (id as u64 + 1) * STACK_SIZE
}
