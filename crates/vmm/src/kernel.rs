//! Booting a kernel from a file: open it (a regular file only, no bigger
//! than guest RAM), load it as multiboot reading only what it needs, and
//! lay out the platform tables it looks for.
//!
//! Loading is bounded: the kernel and initrd are opened so that open never
//! blocks (a FIFO would) and refused unless they are regular files no
//! larger than guest RAM, before anything is read; the loader reads the
//! first 8 KiB, the program headers and the segments by offset straight
//! into guest memory, a chunk at a time, asking `abort` between chunks.

use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use brisk_boot::multiboot::{FileImage, Kernel, LoadError};

use crate::{KernelConfig, StartError};

/// Where the boot vCPU starts.
pub(crate) struct MultibootStart {
    pub entry: u32,
    pub info: u64,
}

/// What `meta` is when it is not a regular file ("a FIFO", ...).
fn not_regular(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() {
        None
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("not a regular file")
    }
}

/// Open `path` (the `what`: "kernel" or "initrd") for reading, if it is a
/// regular file of at most `ram` bytes. Nothing is read.
///
/// The type is checked with stat before opening, so that no device is
/// ever opened (opening some has effects: a tape rewinds, a watchdog
/// starts) and a socket is named rather than failing with ENXIO; and again
/// with fstat on what was opened, in case the path changed in between.
/// O_NONBLOCK keeps a FIFO that appeared in between from blocking open;
/// O_NOCTTY keeps a terminal from becoming brisk's.
fn open(what: &str, path: &Path, ram: u64) -> Result<FileImage, StartError> {
    let shown = path.display();
    let cannot = |e: std::io::Error| StartError::Kernel(format!("cannot read {what} {shown}: {e}"));
    let refuse = |meta: &Metadata| {
        if let Some(kind) = not_regular(meta) {
            return Err(StartError::Kernel(format!(
                "{what} {shown} is {kind}, not a regular file"
            )));
        }
        if meta.len() > ram {
            return Err(StartError::Kernel(format!(
                "{what} {shown} is {} bytes, larger than the guest's {} MiB of RAM",
                meta.len(),
                ram >> 20
            )));
        }
        Ok(())
    };
    refuse(&std::fs::metadata(path).map_err(cannot)?)?;
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(cannot)?;
    refuse(&file.metadata().map_err(cannot)?)?;
    FileImage::new(file).map_err(cannot)
}

/// Load `k` into `vm`'s memory (`ram` bytes, `cpus` vCPUs): segments,
/// multiboot information, initrd, ACPI tables; asking `abort` before each
/// chunk (1 MiB) it copies: when it says true, loading stops with
/// [`StartError::Interrupted`].
pub(crate) fn load_bounded(
    vm: &brisk_kvm::Vm,
    k: &KernelConfig,
    ram: u64,
    cpus: usize,
    abort: &dyn Fn() -> bool,
) -> Result<MultibootStart, StartError> {
    // Both files are checked before either is read.
    let image = open("kernel", &k.path, ram)?;
    let initrd = match &k.initrd {
        Some(path) => Some((path, open("initrd", path, ram)?)),
        None => None,
    };
    let refuse = |what: &str, path: &Path| {
        let shown = path.display().to_string();
        let what = what.to_string();
        move |e: LoadError| match e {
            LoadError::Interrupted => {
                StartError::Interrupted(format!("loading {what} {shown} was interrupted"))
            }
            e => StartError::Kernel(format!("{what} {shown}: {e}")),
        }
    };
    let kernel = Kernel::parse(&image).map_err(refuse("kernel", &k.path))?;
    kernel
        .load(vm.memory(), ram, abort)
        .map_err(refuse("kernel", &k.path))?;
    let module = match &initrd {
        Some((path, initrd)) => Some(
            kernel
                .load_initrd(vm.memory(), ram, initrd, abort)
                .map_err(refuse("initrd", path))?,
        ),
        None => None,
    };
    let info = kernel
        .write_info(vm.memory(), ram, &k.full_cmdline(), module)
        .map_err(refuse("kernel", &k.path))?;
    brisk_boot::acpi::write_acpi_tables(vm.memory(), cpus).map_err(|e| StartError::Setup {
        what: "writing the ACPI tables",
        source: Box::new(e),
    })?;
    Ok(MultibootStart {
        entry: kernel.entry(),
        info,
    })
}
