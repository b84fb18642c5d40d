//! Every guest-physical address brisk uses, in one place: the RAM map and
//! its holes, the built-in guests' tables and data, where a multiboot
//! kernel's information and the ACPI tables go, and the interrupt
//! controllers' MMIO.
//!
//! ```text
//! 0x0000_0000  low RAM: boot data (GDT, page tables, IDT, per-vCPU data,
//!              multiboot info), stacks
//! 0x0009_fc00  legacy hole (EBDA, VGA, BIOS; the ACPI tables at 0xE0000)
//! 0x0010_0000  RAM: built-in guest code / the kernel, initrd, ...
//! 0xC000_0000  32-bit MMIO hole (3 GiB - 4 GiB): IOAPIC 0xFEC00000,
//!              LAPIC 0xFEE00000
//! 0x1_0000_0000  RAM above 4 GiB (what does not fit below 3 GiB)
//! ```

/// The end of conventional memory (640 KiB less the EBDA).
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// The end of the legacy hole: RAM again from 1 MiB.
pub const LEGACY_HOLE_END: u64 = 0x10_0000;
/// The 32-bit MMIO hole: no RAM between these.
pub const MMIO_HOLE_START: u64 = 3 << 30;
pub const MMIO_HOLE_END: u64 = 4 << 30;
/// The most RAM brisk gives a guest.
pub const MAX_MEMORY: u64 = 256 << 30;

/// Guest RAM of `size` bytes as (start, length) regions: up to 3 GiB at
/// 0, the rest above the 32-bit hole at 4 GiB.
///
/// ```
/// use brisk_boot::layout::ram_regions;
/// assert_eq!(ram_regions(64 << 20), vec![(0, 64 << 20)]);
/// assert_eq!(ram_regions(16 << 30), vec![(0, 3 << 30), (4 << 30, 13 << 30)]);
/// ```
pub fn ram_regions(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut r = vec![(0, low)];
    if size > low {
        r.push((MMIO_HOLE_END, size - low));
    }
    r
}

/// RAM below the 32-bit hole (what a 32-bit kernel can reach).
pub const fn low_ram(size: u64) -> u64 {
    if size < MMIO_HOLE_START {
        size
    } else {
        MMIO_HOLE_START
    }
}

/// The ACPI tables, where a guest searches for the RSDP (16-byte aligned
/// in 0xE0000-0xFFFFF).
pub const ACPI_RSDP: u64 = 0xE_0000;
pub const ACPI_RSDT: u64 = 0xE_0040;
pub const ACPI_XSDT: u64 = 0xE_0080;
pub const ACPI_FACS: u64 = 0xE_0100;
pub const ACPI_FADT: u64 = 0xE_0200;
pub const ACPI_DSDT: u64 = 0xE_0400;
pub const ACPI_MADT: u64 = 0xE_0500;

/// The LAPIC and IOAPIC (the architectural defaults).
pub const LAPIC_BASE: u32 = 0xFEE0_0000;
pub const IOAPIC_BASE: u32 = 0xFEC0_0000;

/// The multiboot information and what it points at (in low RAM, below
/// the built-in guests' per-vCPU data).
pub const MULTIBOOT_INFO: u64 = 0x6000;
pub const MULTIBOOT_MMAP: u64 = 0x6100;
pub const MULTIBOOT_MODS: u64 = 0x6200;
pub const MULTIBOOT_MOD_NAME: u64 = 0x6260;
pub const MULTIBOOT_LOADER_NAME: u64 = 0x6240;
pub const MULTIBOOT_CMDLINE: u64 = 0x6400;

// The built-in guests' boot data.

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
/// The most vCPUs of a kernel (its MADT lists xAPIC entries), and of a
/// built-in guest in the low areas above (`VCPU_DATA`, `PVCLOCK`,
/// `STACKS`, and the low per-vCPU ports).
pub const MAX_VCPUS: usize = 64;
/// The most vCPUs of a built-in guest (KVM's `KVM_CAP_MAX_VCPUS` on
/// common hosts): vCPUs from [`MAX_VCPUS`] on have their data, pvclock
/// and stack in the high areas below (above the code), and their ports in
/// the high port ranges. The first 64 keep the low areas, so a built-in
/// guest of up to 64 vCPUs is laid out as it always was.
pub const MAX_BUILTIN_VCPUS: usize = 1024;
/// Per-vCPU data of vCPUs 64 and up (as `VCPU_DATA`).
pub const VCPU_DATA_HIGH: u64 = 0x18_0000;
/// Per-vCPU pvclock structures of vCPUs 64 and up (as `PVCLOCK`).
pub const PVCLOCK_HIGH: u64 = 0x19_0000;
/// Stacks of vCPUs 64 and up (as `STACKS`), up to 0x5c_0000.
pub const STACKS_HIGH: u64 = 0x20_0000;
/// The least RAM a built-in guest needs (code at 1 MiB, plus room).
pub const MIN_MEMORY: u64 = 2 << 20;
/// The least RAM of a built-in guest with more than [`MAX_VCPUS`] vCPUs
/// (the high stacks end below 6 MiB).
pub const MIN_MEMORY_HIGH_VCPUS: u64 = 8 << 20;

/// `low + id * stride` for the first [`MAX_VCPUS`] vCPUs, `high + (id -
/// MAX_VCPUS) * stride` for the rest: where each per-vCPU area is.
pub const fn per_vcpu(id: usize, low: u64, high: u64, stride: u64) -> u64 {
    if id < MAX_VCPUS {
        low + id as u64 * stride
    } else {
        high + (id - MAX_VCPUS) as u64 * stride
    }
}

/// Address of vCPU `id`'s progress counter.
pub const fn progress(id: usize) -> u64 {
    per_vcpu(id, VCPU_DATA, VCPU_DATA_HIGH, VCPU_DATA_STRIDE)
}

/// Address of vCPU `id`'s pvclock structure (the `kvmclock` guest).
pub const fn pvclock(id: usize) -> u64 {
    per_vcpu(id, PVCLOCK, PVCLOCK_HIGH, VCPU_DATA_STRIDE)
}

/// Address of vCPU `id`'s last counter-device value.
pub const fn last_read(id: usize) -> u64 {
    progress(id) + 8
}

/// Top of vCPU `id`'s stack.
pub const fn stack_top(id: usize) -> u64 {
    per_vcpu(id, STACKS, STACKS_HIGH, STACK_SIZE) + STACK_SIZE
}

// A Linux kernel's boot data (the 64-bit boot protocol and PVH). The
// 64-bit entry uses the identity page tables at `PML4` and a GDT at `GDT`.

/// The zero page (`struct boot_params`, 4 KiB).
pub const LINUX_ZERO_PAGE: u64 = 0x7000;
/// PVH: `struct hvm_start_info`, its memory map and module list.
pub const PVH_START_INFO: u64 = 0x8000;
pub const PVH_MEMMAP: u64 = 0x8040;
pub const PVH_MEMMAP_MAX: usize = 8;
pub const PVH_MODLIST: u64 = 0x8100;
/// The boot stack (the kernel switches to its own at once).
pub const LINUX_STACK_TOP: u64 = 0x1_0000;
/// The kernel command line, at most `LINUX_CMDLINE_MAX` bytes with its NUL
/// (and at most what the kernel's header says it takes).
pub const LINUX_CMDLINE: u64 = 0x2_0000;
pub const LINUX_CMDLINE_MAX: usize = 0x1_0000;
/// Where a bzImage's protected-mode kernel is loaded (the boot protocol's
/// default; it decompresses itself to its own load address).
pub const LINUX_KERNEL: u64 = 0x10_0000;

/// virtio-mmio devices: device `i`'s 0x200-byte register window at
/// `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_STRIDE` (in the 32-bit MMIO hole),
/// its interrupt on ISA IRQ (IOAPIC pin) `VIRTIO_IRQS[i]`: the PC's free
/// ISA lines (4 is COM1, 8 the RTC, 9 the SCI, 13 the FPU).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
pub const VIRTIO_IRQS: [u32; 8] = [5, 6, 7, 10, 11, 12, 14, 15];
/// The most virtio-mmio devices (one per free IRQ).
pub const MAX_VIRTIO_DEVICES: usize = VIRTIO_IRQS.len();

/// The register window of virtio-mmio device `i`.
pub const fn virtio_mmio(i: usize) -> u64 {
    VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_STRIDE
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports;

    /// The first 64 vCPUs keep the low areas; the rest, up to 1024, get
    /// places of their own that touch nothing else.
    #[test]
    fn every_vcpu_up_to_the_builtin_limit_has_its_own_places() {
        assert_eq!(progress(63), VCPU_DATA + 63 * 64);
        assert_eq!(stack_top(0), STACKS + STACK_SIZE);
        assert_eq!(ports::counter(1), ports::COUNTER + 4);
        assert_eq!(ports::timer(2), ports::TIMER + 16);
        let last = MAX_BUILTIN_VCPUS - 1;
        assert_eq!(progress(MAX_VCPUS), VCPU_DATA_HIGH);
        assert!(progress(last) + VCPU_DATA_STRIDE <= PVCLOCK_HIGH);
        assert!(pvclock(last) + VCPU_DATA_STRIDE <= STACKS_HIGH);
        assert!(stack_top(last) <= MIN_MEMORY_HIGH_VCPUS - (2 << 20));
        let counters = ports::counter(MAX_VCPUS)..ports::counter(last) + 4;
        let timers = ports::timer(MAX_VCPUS)..ports::timer(last) + 8;
        assert!(counters.end <= timers.start);
        assert!(timers.end <= ports::DOORBELL || ports::DOORBELL < counters.start);
        assert!(ports::counter(MAX_VCPUS - 1) + 4 <= ports::TIMER);
        for id in 1..MAX_BUILTIN_VCPUS {
            assert!(progress(id) >= progress(id - 1) + VCPU_DATA_STRIDE);
            assert!(stack_top(id) >= stack_top(id - 1) + STACK_SIZE);
        }
    }
}
