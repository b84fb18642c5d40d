//! Linux's x86 boot protocols: a bzImage (or an ELF vmlinux without a PVH
//! note) entered in 64-bit mode with a zero page, or an ELF vmlinux
//! entered through its PVH note in 32-bit mode with an `hvm_start_info`.
//! Reading the kernel image is rust-vmm's `linux-loader`; this module adds
//! the checks brisk wants before it, the e820 map from [`ram_regions`],
//! the command line and initramfs placement the kernel's header allows,
//! and the vCPU state each entry expects.

use std::fs::File;

use kvm_bindings::{kvm_msr_entry, kvm_regs, Msrs};
use kvm_ioctls::VcpuFd;
use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{self, ram_regions};
use crate::multiboot::{FileImage, Image, LoadError};
use crate::BootError;

/// The boot protocol's "HdrS" at 0x202 and boot flag 0xAA55 at 0x1FE.
const HDRS: u32 = 0x5372_6448;
const BOOT_FLAG: u16 = 0xAA55;
/// xloadflags: the kernel has the 64-bit entry at `code32_start + 0x200`.
const XLF_KERNEL_64: u16 = 1;
/// `type_of_loader`: an unregistered boot loader.
const LOADER_UNKNOWN: u8 = 0xff;
/// loadflags: the kernel is loaded high (at 1 MiB); bit 7: can use heap.
const LOADED_HIGH: u8 = 1;
/// e820 types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// The x86 protected-mode kernel's default physical start (16 MiB):
/// where a vmlinux's segments go and a bzImage decompresses to.
const PHYSICAL_START: u64 = 0x100_0000;
/// initrd_addr_max for kernels whose header predates the field.
const OLD_INITRD_MAX: u32 = 0x37ff_ffff;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// What a kernel file is, from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// A Linux bzImage (boot protocol header at 0x1F1).
    BzImage,
    /// A 64-bit ELF: a Linux vmlinux.
    Elf64,
    /// A multiboot (v1) kernel: a header in the first 8 KiB.
    Multiboot,
}

impl KernelFormat {
    /// Detect the format from the file's first bytes (8 KiB or all of a
    /// shorter file); `None` when it is none brisk boots.
    pub fn detect(head: &[u8]) -> Option<KernelFormat> {
        let at = |o: usize, n: usize| head.get(o..o + n);
        if at(0x1fe, 2) == Some(&BOOT_FLAG.to_le_bytes()) && at(0x202, 4) == Some(b"HdrS") {
            return Some(KernelFormat::BzImage);
        }
        if crate::multiboot::find_header(head).is_some() {
            return Some(KernelFormat::Multiboot);
        }
        // ELFCLASS64, little-endian.
        if at(0, 6) == Some(b"\x7fELF\x02\x01") {
            return Some(KernelFormat::Elf64);
        }
        None
    }
}

/// Why a Linux kernel or its initramfs cannot be booted.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error("linux-loader cannot load it: {0}")]
    Loader(#[source] linux_loader::loader::Error),
    #[error("a multiboot kernel, not Linux (brisk boots it as multiboot)")]
    NotLinux,
    #[error("the bzImage's boot protocol is {major}.{minor:02}; brisk needs 2.12 or later (a 64-bit entry)")]
    OldProtocol { major: u16, minor: u16 },
    #[error("the bzImage has no 64-bit entry point (xloadflags bit 0 is clear): brisk boots 64-bit kernels")]
    No64BitEntry,
    #[error("the bzImage is truncated: its header gives {expected} bytes of kernel after the setup code, the file has {loaded}")]
    Truncated { expected: u64, loaded: u64 },
    #[error("the kernel needs {need} MiB of RAM from its load address; the guest has {ram} MiB")]
    TooBig { need: u64, ram: u64 },
    #[error("the command line is {len} bytes; this kernel takes at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the command line contains a NUL byte")]
    CmdlineNul,
    #[error("the initramfs ({size} bytes) does not fit in guest RAM between the kernel's end ({low:#x}) and {high:#x}, the highest address the kernel reads it from")]
    InitrdDoesNotFit { size: u64, low: u64, high: u64 },
    #[error("{0}")]
    Initrd(#[source] LoadError),
    #[error(transparent)]
    Boot(#[from] BootError),
}

/// How a loaded kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// 64-bit mode at this address, RSI = the zero page.
    Long64(u64),
    /// 32-bit protected mode, paging off, at this address (the PVH note),
    /// EBX = the `hvm_start_info`.
    Pvh(u64),
}

/// A kernel loaded into guest memory.
#[derive(Clone, Copy)]
pub struct LinuxKernel {
    pub entry: Entry,
    /// Guest-physical end of what the kernel occupies (a bzImage: of what
    /// it decompresses into, from its header's `init_size`).
    pub end: u64,
    /// A bzImage's header, handed to the kernel in the zero page.
    header: Option<setup_header>,
}

impl std::fmt::Debug for LinuxKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxKernel")
            .field("entry", &self.entry)
            .field("end", &self.end)
            .finish()
    }
}

/// Check a bzImage's header against the file before linux-loader reads
/// it: the protocol version, the 64-bit entry, and that the setup code and
/// the kernel the header describes are all in the file.
fn check_bzimage(file: &File) -> Result<(), LinuxError> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut h = [0u8; 0x240];
    let got = file.read_at(&mut h, 0).unwrap_or(0) as u64;
    if got < 0x240 {
        return Err(LinuxError::Truncated {
            expected: 0x240,
            loaded: got,
        });
    }
    let u16_at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
    let version = u16_at(0x206);
    if version < 0x020c {
        return Err(LinuxError::OldProtocol {
            major: version >> 8,
            minor: version & 0xff,
        });
    }
    if u16_at(0x236) & XLF_KERNEL_64 == 0 {
        return Err(LinuxError::No64BitEntry);
    }
    let setup = (u64::from(h[0x1f1].max(4)) + 1) * 512;
    let syssize = u64::from(u32::from_le_bytes([h[0x1f4], h[0x1f5], h[0x1f6], h[0x1f7]])) * 16;
    if len < setup + syssize {
        return Err(LinuxError::Truncated {
            expected: syssize,
            loaded: len.saturating_sub(setup),
        });
    }
    Ok(())
}

/// Load `file` (of `format` BzImage or Elf64, checked to be at most the
/// guest's RAM by the caller) into `mem` of `ram` bytes.
pub fn load_kernel(
    mem: &GuestMemoryMmap<AtomicBitmap>,
    ram: u64,
    file: &mut File,
    format: KernelFormat,
) -> Result<LinuxKernel, LinuxError> {
    let high = Some(GuestAddress(layout::LEGACY_HOLE_END));
    match format {
        KernelFormat::BzImage => {
            check_bzimage(file)?;
            let r = BzImage::load(mem, Some(GuestAddress(layout::LINUX_KERNEL)), file, high)
                .map_err(LinuxError::Loader)?;
            // linux-loader always returns a bzImage's header (the one
            // check_bzimage read).
            let hdr = r.setup_header.ok_or(LinuxError::No64BitEntry)?;
            // linux-loader copies what the file has; the header says what
            // it should have (syssize: 16-byte units of protected-mode code).
            let loaded = r.kernel_end - r.kernel_load.0;
            let expected = u64::from(hdr.syssize) * 16;
            if loaded < expected {
                return Err(LinuxError::Truncated { expected, loaded });
            }
            // The decompressed kernel runs at max(pref_address, 16 MiB)
            // and needs init_size bytes from there.
            let runs_at = { hdr.pref_address }.max(PHYSICAL_START);
            // Saturating: pref_address is the file's word.
            let end = runs_at
                .saturating_add(u64::from(hdr.init_size))
                .max(r.kernel_end);
            if end > layout::low_ram(ram) {
                return Err(LinuxError::TooBig {
                    need: end.div_ceil(1 << 20),
                    ram: ram >> 20,
                });
            }
            Ok(LinuxKernel {
                entry: Entry::Long64(r.kernel_load.0 + 0x200),
                end,
                header: Some(hdr),
            })
        }
        KernelFormat::Multiboot => Err(LinuxError::NotLinux),
        KernelFormat::Elf64 => {
            let r = Elf::load(mem, None, file, high).map_err(LinuxError::Loader)?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(at) => Entry::Pvh(at.0),
                _ => Entry::Long64(r.kernel_load.0),
            };
            Ok(LinuxKernel {
                entry,
                end: r.kernel_end,
                header: None,
            })
        }
    }
}

impl LinuxKernel {
    /// The longest command line (without its NUL) the kernel takes.
    pub fn cmdline_max(&self) -> usize {
        let theirs = match self.header {
            Some(h) if h.version >= 0x0206 => h.cmdline_size as usize,
            Some(_) => 255,
            // A vmlinux's COMMAND_LINE_SIZE is 2048 on x86.
            None => 2047,
        };
        theirs.min(layout::LINUX_CMDLINE_MAX - 1)
    }

    /// The highest address (exclusive) the initramfs may end at.
    fn initrd_limit(&self, ram: u64) -> u64 {
        let max = match self.header {
            Some(h) if h.version >= 0x0203 => h.initrd_addr_max,
            Some(_) => OLD_INITRD_MAX,
            None => 0x7fff_ffff,
        };
        (u64::from(max) + 1).min(layout::low_ram(ram))
    }

    /// Place `initrd` page-aligned as high as the kernel allows, above
    /// the kernel, and copy it there a chunk at a time, asking `abort`
    /// before each. Returns (address, size).
    pub fn load_initrd(
        &self,
        mem: &GuestMemoryMmap<AtomicBitmap>,
        ram: u64,
        initrd: &FileImage,
        abort: &dyn Fn() -> bool,
    ) -> Result<(u64, u64), LinuxError> {
        let size = initrd.size();
        let high = self.initrd_limit(ram);
        let low = self.end.next_multiple_of(4096);
        let start = high
            .checked_sub(size)
            .map(|s| s & !0xfff)
            .filter(|&s| s >= low)
            .ok_or(LinuxError::InitrdDoesNotFit { size, low, high })?;
        crate::multiboot::copy(initrd, mem, start, 0, size, abort).map_err(LinuxError::Initrd)?;
        Ok((start, size))
    }

    /// Write the boot information the entry expects: the command line,
    /// the e820 map of `ram` bytes, the initramfs and the RSDP's address,
    /// in a zero page (64-bit entry) or an `hvm_start_info` (PVH). Returns
    /// the address to hand the kernel in RSI / EBX.
    pub fn write_boot_info(
        &self,
        mem: &GuestMemoryMmap<AtomicBitmap>,
        ram: u64,
        cmdline: &str,
        initrd: Option<(u64, u64)>,
        rsdp: u64,
    ) -> Result<u64, LinuxError> {
        if cmdline.len() > self.cmdline_max() {
            return Err(LinuxError::CmdlineTooLong {
                len: cmdline.len(),
                max: self.cmdline_max(),
            });
        }
        if cmdline.contains('\0') {
            return Err(LinuxError::CmdlineNul);
        }
        let mut bytes = cmdline.as_bytes().to_vec();
        bytes.push(0);
        write_bytes(mem, layout::LINUX_CMDLINE, &bytes, "the command line")?;
        let e820 = e820_map(ram);
        match self.entry {
            Entry::Long64(_) => {
                let mut p = boot_params::default();
                if let Some(h) = self.header {
                    p.hdr = h;
                } else {
                    p.hdr.boot_flag = BOOT_FLAG;
                    p.hdr.header = HDRS;
                    p.hdr.kernel_alignment = PHYSICAL_START as u32;
                }
                p.hdr.type_of_loader = LOADER_UNKNOWN;
                p.hdr.loadflags |= LOADED_HIGH;
                p.hdr.cmd_line_ptr = layout::LINUX_CMDLINE as u32;
                p.hdr.cmdline_size = bytes.len() as u32;
                if let Some((at, size)) = initrd {
                    p.hdr.ramdisk_image = at as u32;
                    p.hdr.ramdisk_size = size as u32;
                }
                p.acpi_rsdp_addr = rsdp;
                for (i, &(addr, size, kind)) in e820.iter().enumerate() {
                    p.e820_table[i] = boot_e820_entry {
                        addr,
                        size,
                        r#type: kind,
                    };
                }
                p.e820_entries = e820.len() as u8;
                write_obj(mem, layout::LINUX_ZERO_PAGE, p, "the zero page")?;
                Ok(layout::LINUX_ZERO_PAGE)
            }
            Entry::Pvh(_) => {
                for (i, &(addr, size, kind)) in e820.iter().enumerate() {
                    let e = hvm_memmap_table_entry {
                        addr,
                        size,
                        type_: kind,
                        reserved: 0,
                    };
                    write_obj(
                        mem,
                        layout::PVH_MEMMAP + 24 * i as u64,
                        e,
                        "the PVH memory map",
                    )?;
                }
                let mut info = hvm_start_info {
                    magic: XEN_HVM_START_MAGIC,
                    version: 1,
                    cmdline_paddr: layout::LINUX_CMDLINE,
                    rsdp_paddr: rsdp,
                    memmap_paddr: layout::PVH_MEMMAP,
                    memmap_entries: e820.len() as u32,
                    ..Default::default()
                };
                if let Some((paddr, size)) = initrd {
                    let m = hvm_modlist_entry {
                        paddr,
                        size,
                        ..Default::default()
                    };
                    write_obj(mem, layout::PVH_MODLIST, m, "the PVH module list")?;
                    info.nr_modules = 1;
                    info.modlist_paddr = layout::PVH_MODLIST;
                }
                write_obj(mem, layout::PVH_START_INFO, info, "the PVH start info")?;
                Ok(layout::PVH_START_INFO)
            }
        }
    }
}

/// The e820 map of a guest with `ram` bytes: conventional memory, the
/// legacy hole reserved (the ACPI tables are there), RAM from 1 MiB to
/// the 32-bit hole, RAM above 4 GiB.
pub fn e820_map(ram: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, layout::LOW_RAM_END, E820_RAM),
        (
            layout::LOW_RAM_END,
            layout::LEGACY_HOLE_END - layout::LOW_RAM_END,
            E820_RESERVED,
        ),
    ];
    for (start, len) in ram_regions(ram) {
        let start = start.max(layout::LEGACY_HOLE_END);
        let end = if start == layout::LEGACY_HOLE_END {
            len
        } else {
            start + len
        };
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

fn write_obj<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap<AtomicBitmap>,
    addr: u64,
    v: T,
    what: &'static str,
) -> Result<(), BootError> {
    mem.write_obj(v, GuestAddress(addr))
        .map_err(|source| BootError::Write { what, addr, source })
}

fn write_bytes(
    mem: &GuestMemoryMmap<AtomicBitmap>,
    addr: u64,
    b: &[u8],
    what: &'static str,
) -> Result<(), BootError> {
    mem.write_slice(b, GuestAddress(addr))
        .map_err(|source| BootError::Write { what, addr, source })
}

/// The MSRs brisk sets on every vCPU of a Linux guest, as a PC's firmware
/// leaves them: fast strings on, MTRRs on with write-back by default, the
/// SYSCALL/SYSENTER MSRs and TSC at zero.
pub fn set_boot_msrs(fd: &VcpuFd) -> Result<(), BootError> {
    const IA32_SYSENTER_CS: u32 = 0x174;
    const IA32_SYSENTER_ESP: u32 = 0x175;
    const IA32_SYSENTER_EIP: u32 = 0x176;
    const IA32_MISC_ENABLE: u32 = 0x1a0;
    const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
    const STAR: u32 = 0xc000_0081;
    const LSTAR: u32 = 0xc000_0082;
    const CSTAR: u32 = 0xc000_0083;
    const SYSCALL_MASK: u32 = 0xc000_0084;
    const KERNEL_GS_BASE: u32 = 0xc000_0102;
    const FAST_STRING: u64 = 1;
    const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(IA32_SYSENTER_CS, 0),
        entry(IA32_SYSENTER_ESP, 0),
        entry(IA32_SYSENTER_EIP, 0),
        entry(STAR, 0),
        entry(LSTAR, 0),
        entry(CSTAR, 0),
        entry(SYSCALL_MASK, 0),
        entry(KERNEL_GS_BASE, 0),
        entry(IA32_MISC_ENABLE, FAST_STRING),
        entry(IA32_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| BootError::Msrs {
        set: 0,
        of: entries.len(),
    })?;
    let set = fd
        .set_msrs(&msrs)
        .map_err(|e| BootError::Kvm("KVM_SET_MSRS", e))?;
    if set != entries.len() {
        return Err(BootError::Msrs {
            set,
            of: entries.len(),
        });
    }
    Ok(())
}

/// A 64-bit GDT as the boot protocol wants it: code at `__BOOT_CS`
/// (0x10), data at `__BOOT_DS` (0x18).
const LINUX_GDT: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// Start the boot vCPU at `kernel`'s entry with `info` (from
/// [`LinuxKernel::write_boot_info`]); APs wait for INIT/SIPI.
pub fn start_boot_vcpu(
    fd: &VcpuFd,
    mem: &GuestMemoryMmap<AtomicBitmap>,
    kernel: &LinuxKernel,
    info: u64,
) -> Result<(), BootError> {
    set_boot_msrs(fd)?;
    match kernel.entry {
        Entry::Pvh(entry) => crate::multiboot::start_protected_mode(fd, mem, entry as u32, 0, info),
        Entry::Long64(entry) => {
            crate::write_page_tables(mem)?;
            for (i, e) in LINUX_GDT.iter().enumerate() {
                write_obj(mem, layout::GDT + 8 * i as u64, *e, "the GDT")?;
            }
            crate::long_mode::enter_long_mode(fd, layout::GDT, LINUX_GDT.len(), 0x10, 0x18)?;
            let regs = kvm_regs {
                rip: entry,
                rsi: info,
                rsp: layout::LINUX_STACK_TOP,
                rbp: layout::LINUX_STACK_TOP,
                rflags: 0x2,
                ..Default::default()
            };
            fd.set_regs(&regs)
                .map_err(|e| BootError::Kvm("KVM_SET_REGS", e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_apart_by_their_first_bytes() {
        let mut bz = vec![0u8; 0x400];
        bz[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(KernelFormat::detect(&bz), Some(KernelFormat::BzImage));
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        assert_eq!(KernelFormat::detect(&elf), Some(KernelFormat::Elf64));
        assert_eq!(KernelFormat::detect(b"\x7fELF\x01\x01"), None);
        assert_eq!(KernelFormat::detect(b"hello"), None);
        assert_eq!(KernelFormat::detect(&[]), None);
    }

    #[test]
    fn the_e820_map_covers_ram_around_both_holes() {
        assert_eq!(
            e820_map(64 << 20),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x60400, E820_RESERVED),
                (0x10_0000, (64 << 20) - 0x10_0000, E820_RAM),
            ]
        );
        let big = e820_map(5 << 30);
        assert_eq!(big[2], (0x10_0000, (3 << 30) - 0x10_0000, E820_RAM));
        assert_eq!(big[3], (4 << 30, 2 << 30, E820_RAM));
        let ram: u64 = big.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (5 << 30) - (0x10_0000 - 0x9fc00));
    }
}
