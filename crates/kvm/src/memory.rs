//! Guest RAM and what backs it.
//!
//! Every region carries vm-memory's dirty bitmap: KVM logs the guest's own
//! writes (KVM_MEM_LOG_DIRTY_PAGES), but not brisk's writes through
//! vm-memory (a virtio device filling a buffer), which the bitmap records.
//! A live migration needs both.

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::{Error, Result};

/// Guest RAM as brisk maps it: vm-memory regions with dirty bitmaps.
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// Bytes per page of the dirty bitmaps (and of KVM's dirty log).
pub const PAGE_SIZE: usize = 4096;

/// Where guest RAM comes from. The file backings hold the regions one
/// after another, in address order.
#[derive(Debug)]
pub enum MemoryBacking {
    /// Fresh anonymous memory, zero until written.
    Anonymous,
    /// A snapshot's memory file, mapped copy-on-write: the guest's writes
    /// stay in this process and never reach the file.
    SnapshotFile(File),
    /// A new memfd, mapped shared, so another process can be handed the
    /// same RAM (a local upgrade).
    NewMemfd,
    /// RAM handed over by another process (its memfd), mapped shared.
    Shared(File),
}

/// Guest RAM and, for shared backings, the file it lives in.
pub(crate) struct Ram {
    pub(crate) memory: GuestRam,
    /// The shared memfd (NewMemfd / Shared).
    pub(crate) shared: Option<File>,
    /// The file behind RAM (any backing but Anonymous): where pages not
    /// (yet) in this process's memory read from.
    pub(crate) file: Option<File>,
}

/// Map `regions` ((start, length) pairs) from `backing`.
pub(crate) fn map(regions: &[(u64, u64)], backing: MemoryBacking) -> Result<Ram> {
    let total: u64 = regions.iter().map(|r| r.1).sum();
    let map_err = |e: vm_memory::mmap::MmapRegionError| Error::MemoryMap(Box::new(e));
    let (file, flags) = match backing {
        MemoryBacking::Anonymous => (None, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS),
        MemoryBacking::SnapshotFile(f) => (Some(f), libc::MAP_PRIVATE),
        MemoryBacking::NewMemfd => (Some(memfd(total)?), libc::MAP_SHARED),
        MemoryBacking::Shared(f) => (Some(f), libc::MAP_SHARED),
    };
    if let Some(f) = &file {
        let len = f
            .metadata()
            .map_err(|e| Error::MemoryMap(Box::new(e)))?
            .len();
        if len != total {
            return Err(Error::State(format!(
                "the memory file holds {len} bytes; this VM's RAM is {total}"
            )));
        }
    }
    let page = NonZeroUsize::new(PAGE_SIZE).expect("non-zero");
    let mut out = Vec::new();
    let mut offset = 0u64;
    for &(start, len) in regions {
        let mut b =
            MmapRegionBuilder::new_with_bitmap(len as usize, AtomicBitmap::new(len as usize, page))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags | libc::MAP_NORESERVE);
        if let Some(f) = &file {
            let dup = f.try_clone().map_err(|e| Error::MemoryMap(Box::new(e)))?;
            b = b.with_file_offset(FileOffset::new(dup, offset));
        }
        let region = b.build().map_err(map_err)?;
        let region = GuestRegionMmap::new(region, GuestAddress(start))
            .ok_or_else(|| Error::MemorySize(total))?;
        out.push(region);
        offset += len;
    }
    let memory = GuestMemoryMmap::from_regions(out).map_err(|e| Error::MemoryMap(Box::new(e)))?;
    let shared = match flags & libc::MAP_SHARED {
        0 => None,
        _ => file
            .as_ref()
            .map(File::try_clone)
            .transpose()
            .map_err(|e| Error::MemoryMap(Box::new(e)))?,
    };
    Ok(Ram {
        memory,
        shared,
        file,
    })
}

/// A memfd of `len` bytes for shared guest RAM.
fn memfd(len: u64) -> Result<File> {
    use std::os::fd::FromRawFd;
    // SAFETY: a NUL-terminated name; memfd_create returns a new fd or -1.
    let fd = unsafe {
        libc::memfd_create(
            c"brisk-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(Error::Sys {
            what: "memfd_create",
            err: vmm_sys_util::errno::Error::last(),
        });
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)
        .map_err(|e| Error::MemoryMap(Box::new(e)))?;
    // Its size is fixed: a process it is handed to may rely on that (a
    // shrunk memfd would turn guest-RAM accesses into SIGBUS).
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own, with an integer argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(Error::Sys {
            what: "sealing the guest-RAM memfd",
            err: vmm_sys_util::errno::Error::last(),
        });
    }
    Ok(file)
}

/// Guest RAM handed over that may change size under the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the guest memory handed over is not a memfd sealed against resizing")]
pub struct MemfdError;

/// Whether `f` is a memfd whose size cannot change (sealed against
/// shrinking and growing), as guest RAM handed over must be.
pub fn check_memfd_sealed(f: &File) -> std::result::Result<(), MemfdError> {
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let seals = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) };
    let need = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    if seals < 0 || seals & need != need {
        return Err(MemfdError);
    }
    Ok(())
}
