//! The memory file: guest RAM's regions one after another, as a file the
//! restore maps. Pages that read as zero are left as holes, so a guest
//! that never touched most of its RAM makes a small (sparse) file.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

pub(crate) const PAGE: usize = 4096;

/// One region of guest RAM as host memory.
pub(crate) struct HostRegion<'a> {
    pub(crate) ptr: *const u8,
    pub(crate) len: usize,
    /// The file it is mapped from and the region's offset there.
    file: Option<(&'a File, u64)>,
}

/// Every region of `kvm`'s RAM, in address order (the file's order).
pub(crate) fn regions(kvm: &brisk_kvm::Vm) -> Vec<HostRegion<'_>> {
    let mut offset = 0;
    kvm.memory()
        .iter()
        .map(|r| {
            let region = HostRegion {
                ptr: r.as_ptr() as *const u8,
                len: r.len() as usize,
                file: kvm.memory_file().map(|f| (f, offset)),
            };
            offset += r.len();
            region
        })
        .collect()
}

impl HostRegion<'_> {
    /// Page `i` of the region.
    ///
    /// # Safety
    /// Every vCPU is parked and no device writes guest RAM meanwhile, so
    /// nothing writes the page while the slice lives; the region is mapped
    /// for the VM's life.
    pub(crate) unsafe fn page(&self, i: usize) -> &[u8] {
        // SAFETY: `i * PAGE + PAGE <= len` (callers iterate below
        // len / PAGE) inside the live mapping; the caller guarantees no
        // concurrent writer.
        unsafe { std::slice::from_raw_parts(self.ptr.add(i * PAGE), PAGE) }
    }

    /// Which pages may hold data. A page neither present nor swapped in
    /// this process (`/proc/self/pagemap`) reads from the file behind the
    /// mapping, or as zero for anonymous memory: it can hold data only
    /// where that file has some (SEEK_DATA). If either cannot be read,
    /// every page is a candidate.
    pub(crate) fn touched(&self) -> Vec<bool> {
        let pages = self.len / PAGE;
        let mut touched = pagemap(self.ptr as usize, pages).unwrap_or_else(|e| {
            log::debug!("reading /proc/self/pagemap: {e}; scanning every page");
            vec![true; pages]
        });
        if let Some((file, offset)) = self.file {
            if let Err(e) = file_data(file, offset, &mut touched) {
                log::debug!("SEEK_DATA on guest memory's file: {e}; scanning every page");
                touched.fill(true);
            }
        }
        touched
    }
}

/// A run of pages set in a dirty or touched bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    /// Its first page's guest address.
    pub(crate) gpa: u64,
    /// Its first page's offset in the memory file (regions one after
    /// another).
    pub(crate) offset: u64,
    pub(crate) pages: usize,
}

/// The runs of pages set in `bitmaps` (one per region of `kvm`'s RAM, 64
/// pages a word), each at most `max` pages long.
pub(crate) fn runs(kvm: &brisk_kvm::Vm, bitmaps: &[Vec<u64>], max: usize) -> Vec<Run> {
    let mut out = Vec::new();
    let mut offset = 0u64;
    for (region, words) in kvm.memory().iter().zip(bitmaps) {
        let base = region.start_addr().0;
        let pages = region.len() as usize / PAGE;
        let set = |i: usize| words.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0);
        let mut i = 0;
        while i < pages {
            if !set(i) {
                i += 1;
                continue;
            }
            let first = i;
            while i < pages && set(i) && i - first < max {
                i += 1;
            }
            let at = (first * PAGE) as u64;
            out.push(Run {
                gpa: base + at,
                offset: offset + at,
                pages: i - first,
            });
        }
        offset += region.len();
    }
    out
}

/// Per region of `kvm`'s RAM, a bitmap (64 pages a word) of the pages
/// that may hold data ([`HostRegion::touched`]).
pub(crate) fn touched_bitmaps(kvm: &brisk_kvm::Vm) -> Vec<Vec<u64>> {
    regions(kvm)
        .iter()
        .map(|r| {
            let touched = r.touched();
            let mut words = vec![0u64; touched.len().div_ceil(64)];
            for (i, t) in touched.into_iter().enumerate() {
                if t {
                    words[i / 64] |= 1 << (i % 64);
                }
            }
            words
        })
        .collect()
}

/// Bit 63: present; bit 62: swapped.
fn pagemap(addr: usize, pages: usize) -> std::io::Result<Vec<bool>> {
    let mut f = File::open("/proc/self/pagemap")?;
    f.seek(SeekFrom::Start((addr / PAGE * 8) as u64))?;
    let mut buf = vec![0u8; pages * 8];
    f.read_exact(&mut buf)?;
    Ok(buf
        .chunks_exact(8)
        .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")) & (3 << 62) != 0)
        .collect())
}

/// Mark the pages of `touched` (a region at `offset` in `file`) that the
/// file has data for.
fn file_data(file: &File, offset: u64, touched: &mut [bool]) -> std::io::Result<()> {
    let mut extents = Vec::new();
    data_extents(file, offset, (touched.len() * PAGE) as u64, &mut extents)?;
    for (data, hole) in extents {
        let first = ((data - offset) as usize) / PAGE;
        let last = ((hole - offset) as usize).div_ceil(PAGE);
        touched[first..last].fill(true);
    }
    Ok(())
}

/// The extents (start, end) of `file` between `offset` and `offset +
/// len` that hold data (SEEK_DATA / SEEK_HOLE), appended to `out`.
pub(crate) fn data_extents(
    file: &File,
    offset: u64,
    len: u64,
    out: &mut Vec<(u64, u64)>,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let end = offset + len;
    let seek = |at: u64, whence| {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let r = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data at or after `at`.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(r as u64))
    };
    let mut at = offset;
    while at < end {
        let Some(data) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        out.push((data, hole));
        at = hole;
    }
    Ok(())
}

/// Whether every byte of `page` (any length) is zero.
pub(crate) fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to splits off any
        // unaligned ends.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// What writing the memory file did.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryWritten {
    /// Bytes of RAM (the file's length).
    pub ram: u64,
    /// Bytes written (the rest are holes).
    pub data: u64,
}

/// Write guest RAM into a new temporary file beside `path`, for the
/// caller to install (synced and renamed) once the VM runs again: the
/// guest is stopped for the writing, not for the disk's write-back.
///
/// # Safety
/// As [`HostRegion::page`]: every vCPU parked, no device writing RAM.
pub(crate) unsafe fn write(
    kvm: &brisk_kvm::Vm,
    path: &Path,
) -> std::io::Result<(TempFile, MemoryWritten)> {
    let mut t = TempFile::create(path)?;
    // SAFETY: the caller's guarantee, passed on.
    let written = unsafe { write_ram(kvm, t.file()) }?;
    Ok((t, written))
}

/// A file being written under a hidden temporary name beside its final
/// one (created exclusively: never an existing file, nor through a
/// symlink someone put there). Removed when dropped unless installed, so
/// a failure, or a panic, leaves nothing behind.
pub(crate) struct TempFile {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    installed: bool,
}

impl TempFile {
    pub(crate) fn create(path: &Path) -> std::io::Result<TempFile> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        Ok(TempFile {
            file,
            tmp,
            path: path.to_path_buf(),
            installed: false,
        })
    }

    /// Where it goes once installed.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Sync its data, then rename it into place: the name never points at
    /// bytes a host crash could lose. (Sync the directory after, for the
    /// name itself: [`sync_dir`].)
    pub(crate) fn install(mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        std::fs::rename(&self.tmp, &self.path)?;
        self.installed = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.installed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Create `path` through a [`TempFile`] filled by `fill`, synced and
/// renamed into place.
pub(crate) fn replace(
    path: &Path,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut t = TempFile::create(path)?;
    fill(t.file())?;
    t.install()
}

/// Sync the directory holding `path` (its entries: a new name, a rename).
/// A file system that cannot sync a directory (EINVAL) has nothing more
/// to make durable there.
pub(crate) fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match File::open(dir)?.sync_all() {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        r => r,
    }
}

/// # Safety
/// As [`write`].
unsafe fn write_ram(kvm: &brisk_kvm::Vm, f: &mut File) -> std::io::Result<MemoryWritten> {
    let regions = regions(kvm);
    let total: u64 = regions.iter().map(|r| r.len as u64).sum();
    f.set_len(total)?;
    let mut written = 0u64;
    let mut offset = 0u64;
    let started = std::time::Instant::now();
    for r in &regions {
        let touched = r.touched();
        let mut run: Option<usize> = None; // first page of a run of data
        for i in 0..=touched.len() {
            // SAFETY: the caller's guarantee; i < pages.
            let data = i < touched.len() && touched[i] && !is_zero(unsafe { r.page(i) });
            match (data, run) {
                (true, None) => run = Some(i),
                (false, Some(start)) => {
                    // SAFETY: pages start..i lie inside the region; the
                    // caller's guarantee holds for all of them.
                    let bytes = unsafe {
                        std::slice::from_raw_parts(r.ptr.add(start * PAGE), (i - start) * PAGE)
                    };
                    f.write_all_at(bytes, offset + (start * PAGE) as u64)?;
                    written += bytes.len() as u64;
                    run = None;
                }
                _ => {}
            }
        }
        offset += r.len as u64;
    }
    log::debug!("memory file: {written} bytes in {:?}", started.elapsed());
    Ok(MemoryWritten {
        ram: total,
        data: written,
    })
}
