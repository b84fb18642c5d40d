//! Page tables, GDT and registers for starting a vCPU in 64-bit mode.

use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;

const CR0_PE: u64 = 1;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_2M: u64 = 0x80;

const GDT_ENTRIES: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff, // code: 64-bit, present, execute/read
    0x00cf_9300_0000_ffff, // data: present, read/write, 4 GiB
    0x0080_8b00_0000_0067, // TSS: present, 64-bit busy TSS, limit 0x67
];
const CODE_SEL: u16 = 0x8;
const DATA_SEL: u16 = 0x10;
const TSS_SEL: u16 = 0x18;

/// Set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Writing `what` at `addr` in guest memory failed.
    #[error("writing {what} at {addr:#x}: {source}")]
    Write {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A program of `len` bytes does not fit at `addr`.
    #[error("a {len}-byte program at {addr:#x} does not fit in guest memory")]
    DoesNotFit { len: usize, addr: u64 },
    /// KVM set only `set` of `of` boot MSRs.
    #[error("KVM_SET_MSRS set {set} of the {of} boot MSRs")]
    Msrs { set: usize, of: usize },
    /// A register ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap<AtomicBitmap>,
    addr: u64,
    v: T,
) -> Result<(), BootError> {
    mem.write_obj(v, GuestAddress(addr))
        .map_err(|source| BootError::Write {
            what: "the boot tables",
            addr,
            source,
        })
}

/// Write the GDT and identity-mapping page tables (shared by all vCPUs).
pub fn write_page_tables(mem: &GuestMemoryMmap<AtomicBitmap>) -> Result<(), BootError> {
    for (i, entry) in GDT_ENTRIES.iter().enumerate() {
        write(mem, GDT + 8 * i as u64, *entry)?;
    }
    write(mem, PML4, PDPT | PTE_PRESENT_RW)?;
    for g in 0..PD_COUNT {
        let pd = PD + g * 0x1000;
        write(mem, PDPT + 8 * g, pd | PTE_PRESENT_RW)?;
        for i in 0..512u64 {
            let phys = (g << 30) | (i << 21);
            write(mem, pd + 8 * i, phys | PTE_PRESENT_RW | PDE_2M)?;
        }
    }
    Ok(())
}

/// Copy a program to [`CODE`].
pub fn load_program(mem: &GuestMemoryMmap<AtomicBitmap>, code: &[u8]) -> Result<(), BootError> {
    mem.write_slice(code, GuestAddress(CODE))
        .map_err(|_| BootError::DoesNotFit {
            len: code.len(),
            addr: CODE,
        })
}

pub(crate) fn segment(selector: u16, type_: u8, l: u8, db: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Switch a vCPU's special registers to 64-bit mode on the identity page
/// tables at [`PML4`], with the GDT at `gdt` (`entries` long) and flat
/// 64-bit code at `code`, flat data at `data` (selectors).
pub(crate) fn enter_long_mode(
    fd: &VcpuFd,
    gdt: u64,
    entries: usize,
    code: u16,
    data: u16,
) -> Result<(), BootError> {
    let mut sregs = fd
        .get_sregs()
        .map_err(|e| BootError::Kvm("KVM_GET_SREGS", e))?;
    sregs.cs = segment(code, 0xb, 1, 0, 1);
    let data = segment(data, 0x3, 0, 1, 1);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.gdt.base = gdt;
    sregs.gdt.limit = (entries * 8 - 1) as u16;
    sregs.cr3 = PML4;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_PG) & !(CR0_CD | CR0_NW);
    sregs.efer |= EFER_LME | EFER_LMA;
    fd.set_sregs(&sregs)
        .map_err(|e| BootError::Kvm("KVM_SET_SREGS", e))
}

/// Put vCPU `id` in 64-bit mode at [`CODE`] with `rdi = id`,
/// `rsi = vcpu_count`, its own stack, and interrupts disabled.
pub fn start_vcpu_in_long_mode(fd: &VcpuFd, id: usize, vcpu_count: usize) -> Result<(), BootError> {
    enter_long_mode(fd, GDT, GDT_ENTRIES.len(), CODE_SEL, DATA_SEL)?;
    let mut sregs = fd
        .get_sregs()
        .map_err(|e| BootError::Kvm("KVM_GET_SREGS", e))?;
    sregs.tr = kvm_segment {
        limit: 0x67,
        g: 0,
        ..segment(TSS_SEL, 0xb, 0, 0, 0)
    };
    fd.set_sregs(&sregs)
        .map_err(|e| BootError::Kvm("KVM_SET_SREGS", e))?;

    let regs = kvm_regs {
        rip: CODE,
        rsp: stack_top(id),
        rdi: id as u64,
        rsi: vcpu_count as u64,
        rflags: 0x2, // IF = 0
        ..Default::default()
    };
    fd.set_regs(&regs)
        .map_err(|e| BootError::Kvm("KVM_SET_REGS", e))
}
