//! Multiboot (v1) kernels: find and check the header, load the ELF
//! segments, build the multiboot information structure, and start the
//! boot vCPU in 32-bit protected mode as the specification says
//! (EAX = 0x2BADB002, EBX = the information's address, flat segments,
//! paging off, interrupts off).
//!
//! Loading is bounded by what is loaded, never by the file: the loader
//! reads the first 8 KiB (the header search), then the ELF program header
//! table (at most [`MAX_PROGRAM_HEADERS`] entries, by offset), checks every
//! segment against the file, each other and guest RAM before copying any,
//! and then copies each segment (and the initrd) by offset straight into
//! guest memory in [`CHUNK`]-sized pieces, asking its caller between
//! pieces whether to stop. No buffer is ever the size of the file.
//!
//! ```
//! // Not a kernel at all: refused with one sentence.
//! let err = brisk_boot::multiboot::Kernel::parse(b"hello".as_slice()).unwrap_err();
//! assert!(err.to_string().contains("not a multiboot kernel"));
//! ```

use std::fmt;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::bitmap::AtomicBitmap;
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

/// The size of an ELF32 program header (`e_phentsize` must be this).
const PHDR_SIZE: usize = 32;
/// The most program headers brisk reads. Kernels have a handful (a Linux
/// vmlinux has about 5, a multiboot kernel 2 to 4); 64 is generous, keeps
/// the table to 2 KiB read in one go and the pairwise overlap check
/// trivial, and refuses `PN_XNUM` (0xffff, "the count is elsewhere").
pub const MAX_PROGRAM_HEADERS: u16 = 64;
/// Segments and the initrd are copied in pieces of this size; the caller's
/// `abort` is asked before each.
pub const CHUNK: usize = 1 << 20;
static ZEROS: [u8; CHUNK] = [0; CHUNK];

/// Where the boot data goes (below the kernel, which must not overlap it).
pub const INFO: u64 = crate::layout::MULTIBOOT_INFO;
const MMAP: u64 = crate::layout::MULTIBOOT_MMAP;
const MODS: u64 = crate::layout::MULTIBOOT_MODS;
const LOADER_NAME: u64 = crate::layout::MULTIBOOT_LOADER_NAME;
const MOD_NAME: u64 = crate::layout::MULTIBOOT_MOD_NAME;
const CMDLINE: u64 = crate::layout::MULTIBOOT_CMDLINE;
const CMDLINE_MAX: usize = 0x7000 - CMDLINE as usize - 1;
/// Boot data, GDT, stack: [0, BOOT_DATA_END).
const BOOT_DATA_END: u64 = 0x8000;
const STACK_TOP: u64 = 0x7ff0;
use crate::layout::LEGACY_HOLE_END as HOLE_END;
/// The legacy hole: EBDA, VGA, option ROMs, BIOS (the ACPI tables live here).
pub use crate::layout::LOW_RAM_END;

/// A 32-bit flat GDT: null, code (0x08), data (0x10), a 32-bit busy TSS
/// (0x18, base 0, limit 0x67) for TR.
const GDT: [u64; 4] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0000_8b00_0000_0067,
];

/// Where a kernel's (or an initrd's) bytes come from. The loader only
/// reads by offset what it needs: never the whole image at once.
pub trait Image {
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` with the bytes at `offset` (an error if the image ends first).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Copy the `len` bytes at `offset` into guest memory at `addr`.
    fn copy_to(
        &self,
        mem: &GuestMemoryMmap<AtomicBitmap>,
        addr: GuestAddress,
        offset: u64,
        len: usize,
    ) -> io::Result<()>;
}

fn slice_at(b: &[u8], offset: u64, len: usize) -> io::Result<&[u8]> {
    usize::try_from(offset)
        .ok()
        .and_then(|at| b.get(at..at.checked_add(len)?))
        .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))
}

/// An image already in memory (tests, built-in images).
impl Image for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        buf.copy_from_slice(slice_at(self, offset, buf.len())?);
        Ok(())
    }

    fn copy_to(
        &self,
        mem: &GuestMemoryMmap<AtomicBitmap>,
        addr: GuestAddress,
        offset: u64,
        len: usize,
    ) -> io::Result<()> {
        mem.write_slice(slice_at(self, offset, len)?, addr)
            .map_err(io::Error::other)
    }
}

/// An open file read by offset (pread), its segments read straight into
/// guest memory. The caller decides which files it accepts (brisk: regular
/// files only, opened so that open cannot block).
#[derive(Debug)]
pub struct FileImage {
    file: File,
    size: u64,
}

impl FileImage {
    /// `file`, whose size is taken now (fstat): every offset is checked
    /// against it before anything is read.
    pub fn new(file: File) -> io::Result<FileImage> {
        let size = file.metadata()?.len();
        Ok(FileImage { file, size })
    }

    /// The file, for a loader that reads it as a stream (linux-loader).
    pub fn into_file(self) -> File {
        self.file
    }
}

impl Image for FileImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn copy_to(
        &self,
        mem: &GuestMemoryMmap<AtomicBitmap>,
        addr: GuestAddress,
        offset: u64,
        len: usize,
    ) -> io::Result<()> {
        let mut file = &self.file;
        file.seek(SeekFrom::Start(offset))?;
        mem.read_exact_volatile_from(addr, &mut file, len)
            .map_err(io::Error::other)
    }
}

/// Why a file is not a kernel brisk can boot (or an initrd it cannot load).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    NotMultiboot {
        what: &'static str,
    },
    BadChecksum {
        at: usize,
    },
    UnsupportedFlags {
        flags: u32,
    },
    NotElf32,
    Truncated {
        what: &'static str,
    },
    NoSegments,
    /// `e_phentsize` is not the ELF32 program header size.
    ProgramHeaderSize {
        size: u16,
    },
    /// More than [`MAX_PROGRAM_HEADERS`] program headers.
    TooManyProgramHeaders {
        count: u16,
    },
    /// A loadable segment holds more file bytes than memory.
    MemoryBelowFileSize {
        filesz: u64,
        memsz: u64,
    },
    /// Two loadable segments share guest memory.
    Overlap {
        first: (u64, u64),
        second: (u64, u64),
    },
    Outside {
        start: u64,
        end: u64,
        why: String,
    },
    /// The initrd, placed page-aligned after the kernel, runs past RAM.
    InitrdOutside {
        size: u64,
        start: u64,
        ram: u64,
    },
    CmdlineTooLong {
        len: usize,
    },
    /// Reading the image (or copying it into guest memory) failed.
    Read {
        offset: u64,
        len: usize,
        error: String,
    },
    /// The caller's `abort` asked the load to stop.
    Interrupted,
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
            LoadError::ProgramHeaderSize { size } => write!(
                f,
                "the kernel ELF's program headers are {size} bytes each, not {PHDR_SIZE} (the ELF32 size)"
            ),
            LoadError::TooManyProgramHeaders { count } => write!(
                f,
                "the kernel ELF has {count} program headers; brisk reads at most {MAX_PROGRAM_HEADERS}"
            ),
            LoadError::MemoryBelowFileSize { filesz, memsz } => write!(
                f,
                "a segment of the kernel ELF has a memory size ({memsz:#x}) below its file size ({filesz:#x})"
            ),
            LoadError::Overlap { first, second } => write!(
                f,
                "the kernel's segments [{:#x}, {:#x}) and [{:#x}, {:#x}) overlap in guest memory",
                first.0, first.1, second.0, second.1
            ),
            LoadError::Outside { start, end, why } => {
                write!(f, "the kernel's segment [{start:#x}, {end:#x}) {why}")
            }
            LoadError::InitrdOutside { size, start, ram } => write!(
                f,
                "the initrd ({size} bytes, placed at {start:#x} after the kernel) does not fit in the guest's {} MiB of RAM",
                ram >> 20
            ),
            LoadError::CmdlineTooLong { len } => write!(
                f,
                "the command line is {len} bytes; at most {CMDLINE_MAX} fit"
            ),
            LoadError::Read { offset, len, error } => write!(
                f,
                "cannot read {len} bytes at offset {offset:#x}: {error}"
            ),
            LoadError::Interrupted => write!(f, "loading was interrupted"),
            LoadError::Memory(m) => write!(f, "writing guest memory: {m}"),
        }
    }
}

impl std::error::Error for LoadError {}

/// One ELF program segment to load (all in bytes; `memsz` > 0).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    paddr: u64,
    offset: u64,
    filesz: u64,
    memsz: u64,
}

/// A checked multiboot ELF kernel, read from `image`.
pub struct Kernel<'a, I: Image + ?Sized> {
    image: &'a I,
    entry: u32,
    /// By guest address, none overlapping another.
    segments: Vec<Segment>,
}

impl<I: Image + ?Sized> fmt::Debug for Kernel<'_, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kernel")
            .field("size", &self.image.size())
            .field("entry", &self.entry)
            .field("segments", &self.segments)
            .finish()
    }
}

/// Where [`Kernel::load_initrd`] put the initrd: multiboot module 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Module {
    start: u64,
    end: u64,
}

impl Module {
    /// Its guest-physical range, [start, end).
    pub fn range(&self) -> (u64, u64) {
        (self.start, self.end)
    }
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

fn read_error(offset: u64, len: usize) -> impl Fn(io::Error) -> LoadError {
    move |e| LoadError::Read {
        offset,
        len,
        error: e.to_string(),
    }
}

/// Walk `len` bytes a [`CHUNK`] at a time, asking `abort` before each:
/// `step(done, n)` handles bytes `done .. done + n`.
fn in_chunks(
    len: u64,
    abort: &dyn Fn() -> bool,
    mut step: impl FnMut(u64, usize) -> Result<(), LoadError>,
) -> Result<(), LoadError> {
    let mut done = 0;
    while done < len {
        if abort() {
            return Err(LoadError::Interrupted);
        }
        let n = (len - done).min(CHUNK as u64) as usize;
        step(done, n)?;
        done += n as u64;
    }
    Ok(())
}

/// Copy `len` bytes of `image` at `offset` to guest `addr`.
pub(crate) fn copy<I: Image + ?Sized>(
    image: &I,
    mem: &GuestMemoryMmap<AtomicBitmap>,
    addr: u64,
    offset: u64,
    len: u64,
    abort: &dyn Fn() -> bool,
) -> Result<(), LoadError> {
    in_chunks(len, abort, |done, n| {
        image
            .copy_to(mem, GuestAddress(addr + done), offset + done, n)
            .map_err(read_error(offset + done, n))
    })
}

/// Zero `len` bytes of guest memory at `addr`.
fn zero(
    mem: &GuestMemoryMmap<AtomicBitmap>,
    addr: u64,
    len: u64,
    abort: &dyn Fn() -> bool,
) -> Result<(), LoadError> {
    in_chunks(len, abort, |done, n| {
        mem.write_slice(&ZEROS[..n], GuestAddress(addr + done))
            .map_err(|e| LoadError::Memory(e.to_string()))
    })
}

/// The offset of the multiboot header's magic in `head` (the file's
/// first 8 KiB), 4-byte aligned with room for magic, flags and checksum.
pub(crate) fn find_header(head: &[u8]) -> Option<usize> {
    let head = &head[..head.len().min(SEARCH)];
    (0..head.len().saturating_sub(11))
        .step_by(4)
        .find(|&at| u32_at(head, at, "header") == Ok(HEADER_MAGIC))
}

impl<'a, I: Image + ?Sized> Kernel<'a, I> {
    /// Find the multiboot header, check it, and read and check the ELF
    /// program headers. Reads the first 8 KiB and the program header
    /// table, nothing else.
    pub fn parse(image: &'a I) -> Result<Kernel<'a, I>, LoadError> {
        let size = image.size();
        let mut head = vec![0u8; size.min(SEARCH as u64) as usize];
        image
            .read_at(&mut head, 0)
            .map_err(read_error(0, head.len()))?;
        let bytes = &head[..];
        let is_elf = bytes.starts_with(b"\x7fELF");
        let header = find_header(bytes).ok_or(LoadError::NotMultiboot {
            what: if is_elf {
                "an ELF file with no multiboot header in its first 8 KiB"
            } else if bytes.get(0x202..0x206) == Some(b"HdrS") {
                "a Linux bzImage (boot it as Linux, not multiboot)"
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
        let phoff = u64::from(u32_at(bytes, 28, "ELF header")?);
        let phentsize = u16_at(bytes, 42, "ELF header")?;
        let phnum = u16_at(bytes, 44, "ELF header")?;
        if phnum == 0 {
            return Err(LoadError::NoSegments);
        }
        if usize::from(phentsize) != PHDR_SIZE {
            return Err(LoadError::ProgramHeaderSize { size: phentsize });
        }
        if phnum > MAX_PROGRAM_HEADERS {
            return Err(LoadError::TooManyProgramHeaders { count: phnum });
        }
        let table_len = usize::from(phnum) * PHDR_SIZE;
        if phoff + table_len as u64 > size {
            return Err(LoadError::Truncated {
                what: "the program header table",
            });
        }
        let mut table = vec![0u8; table_len];
        image
            .read_at(&mut table, phoff)
            .map_err(read_error(phoff, table_len))?;
        let mut segments = Vec::new();
        for ph in table.chunks_exact(PHDR_SIZE) {
            const PT_LOAD: u32 = 1;
            let field = |at: usize| u32_at(ph, at, "a program header").map(u64::from);
            if field(0)? != u64::from(PT_LOAD) {
                continue;
            }
            let seg = Segment {
                offset: field(4)?,
                paddr: field(12)?,
                filesz: field(16)?,
                memsz: field(20)?,
            };
            if seg.offset + seg.filesz > size {
                return Err(LoadError::Truncated {
                    what: "a segment's data",
                });
            }
            if seg.memsz < seg.filesz {
                return Err(LoadError::MemoryBelowFileSize {
                    filesz: seg.filesz,
                    memsz: seg.memsz,
                });
            }
            if seg.memsz > 0 {
                segments.push(seg);
            }
        }
        if segments.is_empty() {
            return Err(LoadError::NoSegments);
        }
        // No two segments may share memory: each byte of guest memory is
        // written once, and (with each segment inside RAM, which `load`
        // checks) their total is at most the guest's RAM.
        segments.sort_by_key(|s| s.paddr);
        for w in segments.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            if a.paddr + a.memsz > b.paddr {
                return Err(LoadError::Overlap {
                    first: (a.paddr, a.paddr + a.memsz),
                    second: (b.paddr, b.paddr + b.memsz),
                });
            }
        }
        Ok(Kernel {
            image,
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
    /// data and the legacy hole, then (all checked) copy each from the
    /// image and zero-fill the rest, a [`CHUNK`] at a time, stopping with
    /// [`LoadError::Interrupted`] when `abort` says so.
    pub fn load(
        &self,
        mem: &GuestMemoryMmap<AtomicBitmap>,
        ram: u64,
        abort: &dyn Fn() -> bool,
    ) -> Result<(), LoadError> {
        // A 32-bit kernel lives below the 32-bit hole.
        let ram = crate::layout::low_ram(ram);
        for s in &self.segments {
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
        }
        for s in &self.segments {
            copy(self.image, mem, s.paddr, s.offset, s.filesz, abort)?;
            zero(mem, s.paddr + s.filesz, s.memsz - s.filesz, abort)?;
        }
        Ok(())
    }

    /// Place `initrd` page-aligned after the kernel, check it ends inside
    /// RAM of `ram` bytes, and copy it there a [`CHUNK`] at a time (asking
    /// `abort` before each).
    pub fn load_initrd<J: Image + ?Sized>(
        &self,
        mem: &GuestMemoryMmap<AtomicBitmap>,
        ram: u64,
        initrd: &J,
        abort: &dyn Fn() -> bool,
    ) -> Result<Module, LoadError> {
        let ram = crate::layout::low_ram(ram);
        let size = initrd.size();
        // After the kernel and never below 1 MiB: the legacy hole holds the
        // ACPI tables, written after the initrd.
        let start = self.end().max(HOLE_END).next_multiple_of(4096);
        let end = start
            .checked_add(size)
            .filter(|&end| end <= ram)
            .ok_or(LoadError::InitrdOutside { size, start, ram })?;
        copy(initrd, mem, start, 0, size, abort)?;
        Ok(Module { start, end })
    }

    /// Write the multiboot information (memory map of `ram` bytes, the
    /// command line, `initrd` as module 0) and return its address.
    pub fn write_info(
        &self,
        mem: &GuestMemoryMmap<AtomicBitmap>,
        ram: u64,
        cmdline: &str,
        initrd: Option<Module>,
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
        // mem_upper: KiB from 1 MiB to the first hole (the 32-bit one).
        let low = crate::layout::low_ram(ram);
        info[1] = (LOW_RAM_END >> 10) as u32;
        info[2] = ((low - HOLE_END) >> 10) as u32;
        w(CMDLINE, cmdline.as_bytes())?;
        w(CMDLINE + cmdline.len() as u64, &[0])?;
        info[4] = CMDLINE as u32;
        if let Some(Module { start, end }) = initrd {
            w(MOD_NAME, b"initrd\0")?;
            let module = [start as u32, end as u32, MOD_NAME as u32, 0];
            w(MODS, &words(&module))?;
            info[5] = 1;
        }
        info[6] = MODS as u32;
        // Memory map: entries of (size = 20, base, length, type).
        // Type 1 is RAM, 2 reserved: the same regions the VM maps
        // (crate::layout::ram_regions), with the legacy hole carved out.
        let mut ranges = vec![
            (0, LOW_RAM_END, 1u32),
            (LOW_RAM_END, HOLE_END - LOW_RAM_END, 2),
            (HOLE_END, low - HOLE_END, 1),
        ];
        if let Some(&(start, len)) = crate::layout::ram_regions(ram).get(1) {
            ranges.push((start, len, 1));
        }
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
    mem: &GuestMemoryMmap<AtomicBitmap>,
    entry: u32,
    info: u64,
) -> Result<(), BootError> {
    start_protected_mode(fd, mem, entry, BOOTLOADER_MAGIC, info)
}

/// Put a vCPU at `entry` in 32-bit protected mode with flat segments
/// (code 0x08, data 0x10, a 32-bit TSS), paging off, interrupts off, and
/// EAX, EBX as given: the state multiboot and PVH both specify.
pub(crate) fn start_protected_mode(
    fd: &VcpuFd,
    mem: &GuestMemoryMmap<AtomicBitmap>,
    entry: u32,
    eax: u32,
    ebx: u64,
) -> Result<(), BootError> {
    for (i, e) in GDT.iter().enumerate() {
        let addr = layout::GDT + 8 * i as u64;
        mem.write_obj(*e, GuestAddress(addr))
            .map_err(|source| BootError::Write {
                what: "the GDT",
                addr,
                source,
            })?;
    }
    let mut sregs = fd
        .get_sregs()
        .map_err(|e| BootError::Kvm("KVM_GET_SREGS", e))?;
    sregs.cs = flat(0x08, 0xb);
    let data = flat(0x10, 0x3);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        limit: 0x67,
        g: 0,
        ..flat(0x18, 0xb)
    };
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.cr0 = (sregs.cr0 | 1) & !(1 << 31); // PE on, PG off
    sregs.cr4 = 0;
    sregs.efer = 0;
    fd.set_sregs(&sregs)
        .map_err(|e| BootError::Kvm("KVM_SET_SREGS", e))?;
    let regs = kvm_regs {
        rip: entry.into(),
        rax: eax.into(),
        rbx: ebx,
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
    use std::cell::Cell;

    fn never() -> bool {
        false
    }

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

    /// Where [`elf`] puts its multiboot header (and the data its segments
    /// usually point at).
    const DATA: u32 = 0x1800;

    /// An 8 KiB ELF32 whose header claims `phnum` program headers of
    /// `phentsize` bytes at offset 52, where `phdrs` are written (32 bytes
    /// each), with a valid multiboot header at [`DATA`].
    fn elf(phentsize: u16, phnum: u16, phdrs: &[[u32; 8]]) -> Vec<u8> {
        let mut b = vec![0u8; 0x2000];
        b[..4].copy_from_slice(b"\x7fELF");
        (b[4], b[5], b[6]) = (1, 1, 1);
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&3u16.to_le_bytes());
        b[24..28].copy_from_slice(&0x10_0010u32.to_le_bytes());
        b[28..32].copy_from_slice(&52u32.to_le_bytes());
        b[42..44].copy_from_slice(&phentsize.to_le_bytes());
        b[44..46].copy_from_slice(&phnum.to_le_bytes());
        for (i, ph) in phdrs.iter().enumerate() {
            b[52 + 32 * i..84 + 32 * i].copy_from_slice(&words(ph));
        }
        let at = DATA as usize;
        let sum = 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(3);
        b[at..at + 12].copy_from_slice(&words(&[HEADER_MAGIC, 3, sum]));
        b
    }

    /// A PT_LOAD program header.
    fn load(paddr: u32, offset: u32, filesz: u32, memsz: u32) -> [u32; 8] {
        [1, offset, paddr, paddr, filesz, memsz, 7, 0x1000]
    }

    /// An in-memory image that counts what the loader takes from it.
    struct Counting<'a> {
        bytes: &'a [u8],
        read: Cell<u64>,
        copied: Cell<u64>,
    }

    impl<'a> Counting<'a> {
        fn new(bytes: &'a [u8]) -> Self {
            Counting {
                bytes,
                read: Cell::new(0),
                copied: Cell::new(0),
            }
        }
    }

    impl Image for Counting<'_> {
        fn size(&self) -> u64 {
            self.bytes.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.read.set(self.read.get() + buf.len() as u64);
            self.bytes.read_at(buf, offset)
        }
        fn copy_to(
            &self,
            mem: &GuestMemoryMmap<AtomicBitmap>,
            addr: GuestAddress,
            offset: u64,
            len: usize,
        ) -> io::Result<()> {
            self.copied.set(self.copied.get() + len as u64);
            self.bytes.copy_to(mem, addr, offset, len)
        }
    }

    fn memory(size: u64) -> GuestMemoryMmap<AtomicBitmap> {
        GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    #[test]
    fn a_good_image_loads_and_its_info_describes_memory_cmdline_and_initrd() {
        let bytes = image(0x10_0000, 3, true);
        let k = Kernel::parse(&bytes[..]).unwrap();
        assert_eq!(k.entry(), 0x10_0090);
        assert_eq!(k.end(), 0x10_1000);
        let mem = memory(16 << 20);
        k.load(&mem, 16 << 20, &never).unwrap();
        let hdr: u32 = mem.read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(hdr, HEADER_MAGIC);
        let bss: u8 = mem.read_obj(GuestAddress(0x10_0fff)).unwrap();
        assert_eq!(bss, 0);
        let module = k
            .load_initrd(&mem, 16 << 20, b"INITRD".as_slice(), &never)
            .unwrap();
        assert_eq!(module.range(), (0x10_1000, 0x10_1006));
        let info = k
            .write_info(&mem, 16 << 20, "console=ttyS0", Some(module))
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
        let mut initrd = [0u8; 6];
        mem.read_slice(&mut initrd, GuestAddress(0x10_1000))
            .unwrap();
        assert_eq!(&initrd, b"INITRD");
        assert_eq!(at(44), 3 * 24, "three memory map entries");
    }

    #[test]
    fn malformed_images_are_refused_with_a_reason() {
        let bad_sum = image(0x10_0000, 3, false);
        assert!(matches!(
            Kernel::parse(&bad_sum[..]),
            Err(LoadError::BadChecksum { at: 0x80 })
        ));
        let video = image(0x10_0000, 4, true);
        assert!(matches!(
            Kernel::parse(&video[..]),
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
        assert_eq!(
            Kernel::parse(&not_elf[..]).unwrap_err(),
            LoadError::NotElf32
        );
        let mut no_header = full.clone();
        no_header[0x80..0x84].fill(0);
        assert!(Kernel::parse(&no_header[..])
            .unwrap_err()
            .to_string()
            .contains("ELF file with no multiboot header"));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(Kernel::parse(&bz[..])
            .unwrap_err()
            .to_string()
            .contains("bzImage"));
    }

    /// D9 of the hostile-input review: 7 KB, e_phentsize 0, e_phnum 65535
    /// and one 60 MiB PT_LOAD used to be "loaded" 65535 times (26 min).
    #[test]
    fn the_d9_loader_hang_elf_is_refused_after_reading_its_first_8_kib() {
        let mut d9 = elf(0, 65535, &[load(0x10_0000, DATA, 0x100, 60 << 20)]);
        d9.truncate(7 * 1024);
        let image = Counting::new(&d9);
        let err = Kernel::parse(&image).unwrap_err();
        assert_eq!(err, LoadError::ProgramHeaderSize { size: 0 });
        assert_eq!(
            err.to_string(),
            "the kernel ELF's program headers are 0 bytes each, not 32 (the ELF32 size)"
        );
        assert_eq!(image.read.get(), 7 * 1024, "read the file's head only");
        assert_eq!(image.copied.get(), 0);
        // The same with the right entry size: too many headers.
        let mut many = elf(32, 65535, &[load(0x10_0000, DATA, 0x100, 60 << 20)]);
        many.truncate(7 * 1024);
        let err = Kernel::parse(&many[..]).unwrap_err();
        assert_eq!(err, LoadError::TooManyProgramHeaders { count: 65535 });
        assert!(err.to_string().contains("at most 64"), "{err}");
    }

    #[test]
    fn program_headers_of_another_size_or_number_are_refused() {
        let seg = load(0x10_0000, DATA, 0x100, 0x1000);
        for size in [0u16, 31, 33, 56] {
            assert_eq!(
                Kernel::parse(&elf(size, 1, &[seg])[..]).unwrap_err(),
                LoadError::ProgramHeaderSize { size }
            );
        }
        assert!(
            Kernel::parse(&elf(32, 64, &[seg])[..]).is_ok(),
            "64 is fine"
        );
        assert_eq!(
            Kernel::parse(&elf(32, 65, &[seg])[..]).unwrap_err(),
            LoadError::TooManyProgramHeaders { count: 65 }
        );
        assert_eq!(
            Kernel::parse(&elf(32, 0, &[seg])[..]).unwrap_err(),
            LoadError::NoSegments
        );
    }

    #[test]
    fn a_program_header_table_past_the_end_of_the_file_is_refused() {
        let seg = load(0x10_0000, DATA, 0x100, 0x1000);
        let truncated = LoadError::Truncated {
            what: "the program header table",
        };
        for phoff in [0x2000u32 - 31, 0xffff_ffff] {
            let mut b = elf(32, 1, &[seg]);
            b[28..32].copy_from_slice(&phoff.to_le_bytes());
            assert_eq!(Kernel::parse(&b[..]).unwrap_err(), truncated, "{phoff:#x}");
        }
        // Two headers claimed, the file ends within the second.
        let mut b = elf(32, 2, &[seg]);
        b[28..32].copy_from_slice(&(0x2000u32 - 40).to_le_bytes());
        assert_eq!(Kernel::parse(&b[..]).unwrap_err(), truncated);
    }

    #[test]
    fn segments_whose_data_lies_outside_the_file_or_exceeds_their_memory_are_refused() {
        let past_end = LoadError::Truncated {
            what: "a segment's data",
        };
        for (offset, filesz) in [(0x1f00, 0x101), (0xffff_fff0, 0x100), (DATA, 0xffff_ffff)] {
            let b = elf(32, 1, &[load(0x10_0000, offset, filesz, 0xffff_ffff)]);
            assert_eq!(Kernel::parse(&b[..]).unwrap_err(), past_end, "{offset:#x}");
        }
        let b = elf(32, 1, &[load(0x10_0000, DATA, 0x100, 0xff)]);
        let err = Kernel::parse(&b[..]).unwrap_err();
        assert_eq!(
            err,
            LoadError::MemoryBelowFileSize {
                filesz: 0x100,
                memsz: 0xff
            }
        );
        assert!(err.to_string().contains("below its file size"), "{err}");
        // Only empty segments: nothing to load.
        let b = elf(
            32,
            2,
            &[load(0x10_0000, DATA, 0, 0), load(0x20_0000, 0, 0, 0)],
        );
        assert_eq!(Kernel::parse(&b[..]).unwrap_err(), LoadError::NoSegments);
    }

    #[test]
    fn segments_that_overlap_in_guest_memory_are_refused() {
        let b = elf(
            32,
            3,
            &[
                load(0x30_0000, DATA, 0x100, 0x1000),
                load(0x10_0000, DATA, 0x100, 0x10_0001),
                load(0x20_0000, DATA, 0x100, 0x1000),
            ],
        );
        let err = Kernel::parse(&b[..]).unwrap_err();
        assert_eq!(
            err,
            LoadError::Overlap {
                first: (0x10_0000, 0x20_0001),
                second: (0x20_0000, 0x20_1000)
            }
        );
        assert_eq!(
            err.to_string(),
            "the kernel's segments [0x100000, 0x200001) and [0x200000, 0x201000) overlap in guest memory"
        );
        // The same segment 64 times (D9's trick with a valid entry size).
        let seg = load(0x10_0000, DATA, 0x100, 60 << 20);
        let b = elf(32, 64, &[seg; 64]);
        assert!(matches!(
            Kernel::parse(&b[..]),
            Err(LoadError::Overlap { .. })
        ));
        // Touching is not overlapping.
        let b = elf(
            32,
            2,
            &[
                load(0x10_0000, DATA, 0x100, 0x1000),
                load(0x10_1000, DATA, 0x100, 0x1000),
            ],
        );
        assert!(Kernel::parse(&b[..]).is_ok());
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
            let err = Kernel::parse(&bytes[..])
                .unwrap()
                .load(&mem, 16 << 20, &never)
                .unwrap_err();
            assert!(err.to_string().contains(why), "{paddr:#x}: {err}");
        }
        let bytes = image(0x10_0000, 3, true);
        let k = Kernel::parse(&bytes[..]).unwrap();
        let long = "x".repeat(CMDLINE_MAX + 1);
        assert!(matches!(
            k.write_info(&mem, 16 << 20, &long, None),
            Err(LoadError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn every_segment_is_checked_before_any_is_copied() {
        let b = elf(
            32,
            2,
            &[
                load(0x10_0000, DATA, 0x100, 0x1000),
                load(0x0200_0000, DATA, 0x100, 0x1000),
            ],
        );
        let image = Counting::new(&b);
        let k = Kernel::parse(&image).unwrap();
        let mem = memory(16 << 20);
        let err = k.load(&mem, 16 << 20, &never).unwrap_err();
        assert!(
            err.to_string().contains("outside the guest's 16 MiB"),
            "{err}"
        );
        assert_eq!(image.copied.get(), 0, "nothing copied");
        let first: u32 = mem.read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(first, 0);
    }

    #[test]
    fn loading_reads_the_head_the_table_and_each_segment_once() {
        let b = elf(
            32,
            3,
            &[
                load(0x10_0000, DATA, 0x100, 0x1000),
                [6, 0, 0, 0, 0, 0, 4, 4], // PT_PHDR: not loaded
                load(0x20_0000, 0, 0x40, 0x40),
            ],
        );
        let image = Counting::new(&b);
        let k = Kernel::parse(&image).unwrap();
        assert_eq!(image.read.get(), 0x2000 + 3 * 32);
        k.load(&memory(16 << 20), 16 << 20, &never).unwrap();
        assert_eq!(image.copied.get(), 0x140);
        assert_eq!(image.read.get(), 0x2000 + 3 * 32, "no further reads");
    }

    #[test]
    fn an_initrd_too_big_for_ram_is_refused_naming_the_initrd() {
        let bytes = image(0x10_0000, 3, true);
        let k = Kernel::parse(&bytes[..]).unwrap();
        let mem = memory(16 << 20);
        let huge = Counting::new(&[0u8; 15 << 20]);
        let err = k.load_initrd(&mem, 16 << 20, &huge, &never).unwrap_err();
        assert_eq!(
            err,
            LoadError::InitrdOutside {
                size: 15 << 20,
                start: 0x10_1000,
                ram: 16 << 20
            }
        );
        assert_eq!(
            err.to_string(),
            "the initrd (15728640 bytes, placed at 0x101000 after the kernel) does not fit in the guest's 16 MiB of RAM"
        );
        assert_eq!(huge.copied.get() + huge.read.get(), 0, "not read");
    }

    #[test]
    fn abort_stops_a_load_between_chunks() {
        let size = 2 * CHUNK + 5;
        let mut b = elf(
            32,
            1,
            &[load(
                0x10_0000,
                0,
                size as u32,
                size as u32 + 3 * CHUNK as u32,
            )],
        );
        b.resize(size, 0xaa);
        let mem = memory(16 << 20);
        for stop_after in [0, 1, 2, 3, 4] {
            let image = Counting::new(&b);
            let k = Kernel::parse(&image).unwrap();
            let asked = Cell::new(0);
            let abort = || {
                asked.set(asked.get() + 1);
                asked.get() > stop_after
            };
            assert_eq!(k.load(&mem, 16 << 20, &abort), Err(LoadError::Interrupted));
            assert_eq!(
                image.copied.get(),
                (stop_after.min(3) as u64 * CHUNK as u64).min(size as u64)
            );
        }
        // The initrd too.
        let k = Kernel::parse(&b[..]).unwrap();
        let initrd = vec![1u8; 3 * CHUNK];
        assert_eq!(
            k.load_initrd(&mem, 16 << 20, &initrd[..], &|| true),
            Err(LoadError::Interrupted)
        );
    }

    #[test]
    fn a_file_image_is_read_by_offset_straight_into_guest_memory() {
        let dir =
            std::env::temp_dir().join(format!("brisk-boot-file-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let size = CHUNK + 0x1234;
        let mut b = elf(
            32,
            1,
            &[load(0x10_0000, 0, size as u32, size as u32 + 0x10)],
        );
        b.resize(size, 0);
        for (i, x) in b.iter_mut().enumerate().skip(0x2000) {
            *x = (i % 251) as u8;
        }
        let kernel = dir.join("kernel");
        std::fs::write(&kernel, &b).unwrap();
        let initrd = dir.join("initrd");
        let initrd_bytes: Vec<u8> = (0..2 * CHUNK + 7).map(|i| (i % 253) as u8).collect();
        std::fs::write(&initrd, &initrd_bytes).unwrap();

        let image = FileImage::new(File::open(&kernel).unwrap()).unwrap();
        assert_eq!(image.size(), size as u64);
        let k = Kernel::parse(&image).unwrap();
        let mem = memory(16 << 20);
        k.load(&mem, 16 << 20, &never).unwrap();
        let mut back = vec![0u8; size + 0x10];
        mem.read_slice(&mut back, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&back[..size], &b[..]);
        assert_eq!(&back[size..], &[0; 0x10]);

        let initrd = FileImage::new(File::open(&initrd).unwrap()).unwrap();
        let module = k.load_initrd(&mem, 16 << 20, &initrd, &never).unwrap();
        let (start, end) = module.range();
        assert_eq!(
            start,
            (0x10_0000 + size as u64 + 0x10).next_multiple_of(4096)
        );
        let mut back = vec![0u8; (end - start) as usize];
        mem.read_slice(&mut back, GuestAddress(start)).unwrap();
        assert!(back == initrd_bytes, "initrd copied intact");

        // A file that shrank after it was opened: a read error, not a panic.
        let shrunk = dir.join("shrunk");
        std::fs::write(&shrunk, &b).unwrap();
        let image = FileImage::new(File::open(&shrunk).unwrap()).unwrap();
        let k = Kernel::parse(&image).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&shrunk)
            .unwrap()
            .set_len(0x3000)
            .unwrap();
        let err = k.load(&mem, 16 << 20, &never).unwrap_err();
        assert!(matches!(err, LoadError::Read { .. }), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_memory_map_splits_ram_around_the_32_bit_hole() {
        let img = image(0x20_0000, 0x3, true);
        let k = Kernel::parse(&img[..]).unwrap();
        // 64 MiB of guest memory is enough to hold the info; the map
        // describes the 16 GiB the VM would have.
        let mem =
            GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let info = k.write_info(&mem, 16 << 30, "x", None).unwrap();
        let word = |at: u64| mem.read_obj::<u32>(GuestAddress(at)).unwrap();
        assert_eq!(word(info + 8), ((3u64 << 30) - (1 << 20)) as u32 >> 10);
        let (len, addr) = (word(info + 44) as u64, word(info + 48) as u64);
        let mut entries = Vec::new();
        let mut at = addr;
        while at < addr + len {
            let base = mem.read_obj::<u64>(GuestAddress(at + 4)).unwrap();
            let size = mem.read_obj::<u64>(GuestAddress(at + 12)).unwrap();
            entries.push((base, size, word(at + 20)));
            at += 24;
        }
        assert_eq!(entries.last(), Some(&(4 << 30, 13 << 30, 1)));
        assert_eq!(entries[2], (1 << 20, (3 << 30) - (1 << 20), 1));
    }
}
