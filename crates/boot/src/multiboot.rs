//! Multiboot (v1) kernels: find and check the header, load the ELF
//! segments, build the multiboot information structure, and start the
//! boot vCPU in 32-bit protected mode as the specification says
//! (EAX = 0x2BADB002, EBX = the information's address, flat segments,
//! paging off, interrupts off).
//!
//! ```
//! // Not a kernel at all: refused with one sentence.
//! let err = brisk_boot::multiboot::Kernel::parse(b"hello").unwrap_err();
//! assert!(err.to_string().contains("not a multiboot kernel"));
//! ```

use std::fmt;

use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{layout, BootError};

/// The header's magic, and what the loader leaves in EAX.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie, 4-byte aligned, in the first 8 KiB.
const SEARCH: usize = 8192;
/// Header flags brisk honours: page-align modules (0), memory info (1).
/// Other bits 0-15 are requirements it cannot meet (e.g. video, 2).
const FLAGS_KNOWN: u32 = 0b11;

/// Where the boot data goes (below the kernel, which must not overlap it).
pub const INFO: u64 = 0x6000;
const MMAP: u64 = 0x6100;
const MODS: u64 = 0x6200;
const LOADER_NAME: u64 = 0x6240;
const MOD_NAME: u64 = 0x6260;
const CMDLINE: u64 = 0x6400;
const CMDLINE_MAX: usize = 0x7000 - CMDLINE as usize - 1;
/// Boot data, GDT, stack: [0, BOOT_DATA_END).
const BOOT_DATA_END: u64 = 0x8000;
const STACK_TOP: u64 = 0x7ff0;
/// The legacy hole: EBDA, VGA, option ROMs, BIOS (the ACPI tables live here).
pub const LOW_RAM_END: u64 = 0x9_fc00;
const HOLE_END: u64 = 0x10_0000;

/// A 32-bit flat GDT: null, code (0x08), data (0x10).
const GDT: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// Why a file is not a kernel brisk can boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    NotMultiboot { what: &'static str },
    BadChecksum { at: usize },
    UnsupportedFlags { flags: u32 },
    NotElf32,
    Truncated { what: &'static str },
    NoSegments,
    Outside { start: u64, end: u64, why: String },
    CmdlineTooLong { len: usize },
    Memory(String),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::NotMultiboot { what } => write!(
                f,
                "not a multiboot kernel: {what} (brisk boots multiboot v1 ELF kernels)"
            ),
            LoadError::BadChecksum { at } => write!(
                f,
                "the multiboot header at offset {at:#x} has a bad checksum (magic + flags + checksum must be 0)"
            ),
            LoadError::UnsupportedFlags { flags } => write!(
                f,
                "the multiboot header requires features brisk does not provide (flags {flags:#x}; supported: page-aligned modules, memory information)"
            ),
            LoadError::NotElf32 => write!(
                f,
                "the kernel has a multiboot header but is not a 32-bit x86 ELF executable, the only format brisk loads"
            ),
            LoadError::Truncated { what } => write!(f, "the kernel file is truncated: {what} lies past its end"),
            LoadError::NoSegments => write!(f, "the kernel ELF has no loadable segment"),
            LoadError::Outside { start, end, why } => {
                write!(f, "the kernel's segment [{start:#x}, {end:#x}) {why}")
            }
            LoadError::CmdlineTooLong { len } => write!(
                f,
                "the command line is {len} bytes; at most {CMDLINE_MAX} fit"
            ),
            LoadError::Memory(m) => write!(f, "writing the kernel to guest memory: {m}"),
        }
    }
}

impl std::error::Error for LoadError {}

/// One ELF program segment to load.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    paddr: u64,
    offset: usize,
    filesz: usize,
    memsz: u64,
}

/// A checked multiboot ELF kernel.
#[derive(Debug)]
pub struct Kernel<'a> {
    bytes: &'a [u8],
    entry: u32,
    segments: Vec<Segment>,
}

fn u16_at(b: &[u8], at: usize, what: &'static str) -> Result<u16, LoadError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(LoadError::Truncated { what })
}

fn u32_at(b: &[u8], at: usize, what: &'static str) -> Result<u32, LoadError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(LoadError::Truncated { what })
}

impl<'a> Kernel<'a> {
    /// Find the multiboot header, check it, and read the ELF segments.
    pub fn parse(bytes: &'a [u8]) -> Result<Kernel<'a>, LoadError> {
        let is_elf = bytes.starts_with(b"\x7fELF");
        let header = (0..bytes.len().min(SEARCH).saturating_sub(11))
            .step_by(4)
            .find(|&at| u32_at(bytes, at, "header") == Ok(HEADER_MAGIC))
            .ok_or(LoadError::NotMultiboot {
                what: if is_elf {
                    "an ELF file with no multiboot header in its first 8 KiB"
                } else if bytes.get(0x202..0x206) == Some(b"HdrS") {
                    "a Linux bzImage, which brisk cannot boot yet"
                } else {
                    "no multiboot header in its first 8 KiB and not an ELF file"
                },
            })?;
        let flags = u32_at(bytes, header + 4, "multiboot header")?;
        let checksum = u32_at(bytes, header + 8, "multiboot header")?;
        if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) != 0 {
            return Err(LoadError::BadChecksum { at: header });
        }
        if flags & 0xffff & !FLAGS_KNOWN != 0 {
            return Err(LoadError::UnsupportedFlags { flags });
        }
        // ELF32, little-endian, executable, i386.
        if !is_elf
            || bytes.get(4) != Some(&1)
            || bytes.get(5) != Some(&1)
            || u16_at(bytes, 16, "ELF header")? != 2
            || u16_at(bytes, 18, "ELF header")? != 3
        {
            return Err(LoadError::NotElf32);
        }
        let entry = u32_at(bytes, 24, "ELF header")?;
        let phoff = u32_at(bytes, 28, "ELF header")? as usize;
        let phentsize = u16_at(bytes, 42, "ELF header")? as usize;
        let phnum = u16_at(bytes, 44, "ELF header")? as usize;
        let mut segments = Vec::new();
        for i in 0..phnum {
            let ph = phoff + i * phentsize;
            const PT_LOAD: u32 = 1;
            if u32_at(bytes, ph, "a program header")? != PT_LOAD {
                continue;
            }
            let seg = Segment {
                offset: u32_at(bytes, ph + 4, "a program header")? as usize,
                paddr: u32_at(bytes, ph + 12, "a program header")?.into(),
                filesz: u32_at(bytes, ph + 16, "a program header")? as usize,
                memsz: u32_at(bytes, ph + 20, "a program header")?.into(),
            };
            if seg
                .offset
                .checked_add(seg.filesz)
                .is_none_or(|e| e > bytes.len())
            {
                return Err(LoadError::Truncated {
                    what: "a segment's data",
                });
            }
            if seg.memsz < seg.filesz as u64 {
                return Err(LoadError::Truncated {
                    what: "a segment (memory size below file size)",
                });
            }
            segments.push(seg);
        }
        if segments.iter().all(|s| s.memsz == 0) {
            return Err(LoadError::NoSegments);
        }
        Ok(Kernel {
            bytes,
            entry,
            segments,
        })
    }

    /// The entry point (physical, 32-bit).
    pub fn entry(&self) -> u32 {
        self.entry
    }

    /// One past the highest byte the kernel occupies.
    pub fn end(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.paddr + s.memsz)
            .max()
            .unwrap_or(0)
    }

    /// Check every segment lies in RAM of `ram` bytes and clear of the boot
    /// data and the legacy hole, then copy it (zero-filling the rest).
    pub fn load(&self, mem: &GuestMemoryMmap, ram: u64) -> Result<(), LoadError> {
        for s in self.segments.iter().filter(|s| s.memsz > 0) {
            let (start, end) = (s.paddr, s.paddr + s.memsz);
            let outside = |why: String| LoadError::Outside { start, end, why };
            if end > ram {
                return Err(outside(format!(
                    "lies outside the guest's {} MiB of RAM",
                    ram >> 20
                )));
            }
            if start < BOOT_DATA_END {
                return Err(outside(format!(
                    "overlaps brisk's boot data below {BOOT_DATA_END:#x}"
                )));
            }
            if start < HOLE_END && end > LOW_RAM_END {
                return Err(outside(format!(
                    "overlaps the legacy hole [{LOW_RAM_END:#x}, {HOLE_END:#x}) (BIOS area, ACPI tables)"
                )));
            }
            let data = &self.bytes[s.offset..s.offset + s.filesz];
            let map = |e: vm_memory::GuestMemoryError| LoadError::Memory(e.to_string());
            mem.write_slice(data, GuestAddress(start)).map_err(map)?;
            let zeros = vec![0u8; (s.memsz - s.filesz as u64) as usize];
            mem.write_slice(&zeros, GuestAddress(start + s.filesz as u64))
                .map_err(map)?;
        }
        Ok(())
    }

    /// Write the multiboot information (memory map of `ram` bytes, the
    /// command line, the initrd as module 0 placed after the kernel) and
    /// return its address.
    pub fn write_info(
        &self,
        mem: &GuestMemoryMmap,
        ram: u64,
        cmdline: &str,
        initrd: Option<&[u8]>,
    ) -> Result<u64, LoadError> {
        if cmdline.len() > CMDLINE_MAX {
            return Err(LoadError::CmdlineTooLong { len: cmdline.len() });
        }
        let w = |addr: u64, data: &[u8]| {
            mem.write_slice(data, GuestAddress(addr))
                .map_err(|e| LoadError::Memory(e.to_string()))
        };
        let mut info = [0u32; 29];
        // flags: mem_* (0), cmdline (2), mods (3), mmap (6), loader name (9).
        info[0] = 1 | 1 << 2 | 1 << 3 | 1 << 6 | 1 << 9;
        info[1] = (LOW_RAM_END >> 10) as u32;
        info[2] = ((ram - HOLE_END) >> 10) as u32;
        w(CMDLINE, cmdline.as_bytes())?;
        w(CMDLINE + cmdline.len() as u64, &[0])?;
        info[4] = CMDLINE as u32;
        if let Some(initrd) = initrd {
            let start = self.end().next_multiple_of(4096);
            let end = start + initrd.len() as u64;
            if end > ram {
                return Err(LoadError::Outside {
                    start,
                    end,
                    why: format!(
                        "(the initrd, placed after the kernel) lies outside the guest's {} MiB of RAM",
                        ram >> 20
                    ),
                });
            }
            w(start, initrd)?;
            w(MOD_NAME, b"initrd\0")?;
            let module = [start as u32, end as u32, MOD_NAME as u32, 0];
            w(MODS, &words(&module))?;
            info[5] = 1;
        }
        info[6] = MODS as u32;
        // Memory map: entries of (size = 20, base, length, type).
        let ranges = [
            (0, LOW_RAM_END, 1u32),
            (LOW_RAM_END, HOLE_END - LOW_RAM_END, 2),
            (HOLE_END, ram - HOLE_END, 1),
        ];
        let mut mmap = Vec::new();
        for (base, len, kind) in ranges {
            mmap.extend_from_slice(&20u32.to_le_bytes());
            mmap.extend_from_slice(&base.to_le_bytes());
            mmap.extend_from_slice(&len.to_le_bytes());
            mmap.extend_from_slice(&kind.to_le_bytes());
        }
        w(MMAP, &mmap)?;
        info[11] = mmap.len() as u32;
        info[12] = MMAP as u32;
        w(LOADER_NAME, b"brisk\0")?;
        info[16] = LOADER_NAME as u32;
        w(INFO, &words(&info))?;
        Ok(INFO)
    }
}

fn words(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A flat 4 GiB 32-bit segment.
fn flat(selector: u16, type_: u8) -> kvm_segment {
    crate::long_mode::segment(selector, type_, 0, 1, 1)
}

/// Put the boot vCPU at `entry` in 32-bit protected mode, paging off,
/// interrupts off, EAX = [`BOOTLOADER_MAGIC`], EBX = `info`.
pub fn start_boot_vcpu(
    fd: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: u32,
    info: u64,
) -> Result<(), BootError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT + 8 * i as u64))
            .map_err(|e| BootError::Memory(format!("writing the GDT: {e}")))?;
    }
    let mut sregs = fd
        .get_sregs()
        .map_err(|e| BootError::Kvm("KVM_GET_SREGS", e))?;
    sregs.cs = flat(0x08, 0xb);
    let data = flat(0x10, 0x3);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.cr0 = (sregs.cr0 | 1) & !(1 << 31); // PE on, PG off
    sregs.cr4 = 0;
    sregs.efer = 0;
    fd.set_sregs(&sregs)
        .map_err(|e| BootError::Kvm("KVM_SET_SREGS", e))?;
    let regs = kvm_regs {
        rip: entry.into(),
        rax: BOOTLOADER_MAGIC.into(),
        rbx: info,
        rsp: STACK_TOP,
        rflags: 0x2,
        ..Default::default()
    };
    fd.set_regs(&regs)
        .map_err(|e| BootError::Kvm("KVM_SET_REGS", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF32 with one segment of `code` at `paddr` and a
    /// multiboot header (flags `flags`) at offset 0x80 in that segment.
    fn image(paddr: u32, flags: u32, checksum_ok: bool) -> Vec<u8> {
        let mut b = vec![0u8; 0x100];
        b[..4].copy_from_slice(b"\x7fELF");
        (b[4], b[5], b[6]) = (1, 1, 1);
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&3u16.to_le_bytes());
        b[24..28].copy_from_slice(&(paddr + 0x90).to_le_bytes()); // entry
        b[28..32].copy_from_slice(&52u32.to_le_bytes()); // phoff
        b[42..44].copy_from_slice(&32u16.to_le_bytes());
        b[44..46].copy_from_slice(&1u16.to_le_bytes());
        let ph = [1u32, 0x80, paddr, paddr, 0x80, 0x1000, 5, 4];
        b[52..84].copy_from_slice(&words(&ph));
        let sum = 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags);
        let sum = if checksum_ok { sum } else { sum ^ 1 };
        b[0x80..0x8c].copy_from_slice(&words(&[HEADER_MAGIC, flags, sum]));
        b[0x90] = 0xf4; // hlt
        b
    }

    fn memory(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    #[test]
    fn a_good_image_loads_and_its_info_describes_memory_cmdline_and_initrd() {
        let bytes = image(0x10_0000, 3, true);
        let k = Kernel::parse(&bytes).unwrap();
        assert_eq!(k.entry(), 0x10_0090);
        assert_eq!(k.end(), 0x10_1000);
        let mem = memory(16 << 20);
        k.load(&mem, 16 << 20).unwrap();
        let hdr: u32 = mem.read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(hdr, HEADER_MAGIC);
        let bss: u8 = mem.read_obj(GuestAddress(0x10_0fff)).unwrap();
        assert_eq!(bss, 0);
        let info = k
            .write_info(&mem, 16 << 20, "console=ttyS0", Some(b"INITRD"))
            .unwrap();
        let at = |off: u64| mem.read_obj::<u32>(GuestAddress(info + off)).unwrap();
        assert_eq!(at(4), 639, "mem_lower in KiB");
        assert_eq!(at(8), 15 << 10, "mem_upper in KiB");
        let mut cmd = [0u8; 14];
        mem.read_slice(&mut cmd, GuestAddress(at(16).into()))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0\0");
        assert_eq!(at(20), 1, "one module");
        let module: [u32; 2] = mem.read_obj(GuestAddress(at(24).into())).unwrap();
        assert_eq!(
            module,
            [0x10_1000, 0x10_1006],
            "initrd page-aligned after the kernel"
        );
        assert_eq!(at(44), 3 * 24, "three memory map entries");
    }

    #[test]
    fn malformed_images_are_refused_with_a_reason() {
        let bad_sum = image(0x10_0000, 3, false);
        assert!(matches!(
            Kernel::parse(&bad_sum),
            Err(LoadError::BadChecksum { at: 0x80 })
        ));
        let video = image(0x10_0000, 4, true);
        assert!(matches!(
            Kernel::parse(&video),
            Err(LoadError::UnsupportedFlags { flags: 4 })
        ));
        let full = image(0x10_0000, 3, true);
        assert_eq!(
            Kernel::parse(&full[..0xa0]).unwrap_err(),
            LoadError::Truncated {
                what: "a segment's data"
            }
        );
        let mut not_elf = full.clone();
        not_elf[..4].copy_from_slice(b"\x7fXXX");
        assert_eq!(Kernel::parse(&not_elf).unwrap_err(), LoadError::NotElf32);
        let mut no_header = full.clone();
        no_header[0x80..0x84].fill(0);
        assert!(Kernel::parse(&no_header)
            .unwrap_err()
            .to_string()
            .contains("ELF file with no multiboot header"));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(Kernel::parse(&bz)
            .unwrap_err()
            .to_string()
            .contains("bzImage"));
    }

    #[test]
    fn segments_outside_ram_or_over_boot_data_are_refused() {
        let mem = memory(16 << 20);
        for (paddr, why) in [
            (0x0100_0000u32, "outside the guest's 16 MiB"),
            (0x6000, "boot data"),
            (0xe_0000, "legacy hole"),
        ] {
            let bytes = image(paddr, 3, true);
            let err = Kernel::parse(&bytes)
                .unwrap()
                .load(&mem, 16 << 20)
                .unwrap_err();
            assert!(err.to_string().contains(why), "{paddr:#x}: {err}");
        }
        let bytes = image(0x10_0000, 3, true);
        let k = Kernel::parse(&bytes).unwrap();
        let long = "x".repeat(CMDLINE_MAX + 1);
        assert!(matches!(
            k.write_info(&mem, 16 << 20, &long, None),
            Err(LoadError::CmdlineTooLong { .. })
        ));
        let huge = vec![0u8; 16 << 20];
        assert!(k
            .write_info(&mem, 16 << 20, "", Some(&huge))
            .unwrap_err()
            .to_string()
            .contains("initrd"));
    }
}
