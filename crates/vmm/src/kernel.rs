//! Booting a kernel from a file: open it (a regular file only, no bigger
//! than guest RAM), tell its format from its first 8 KiB (a Linux bzImage
//! or ELF vmlinux, or a multiboot kernel), load it, and lay out the
//! platform tables it looks for.
//!
//! Loading is bounded: the kernel and initrd are opened so that open never
//! blocks (a FIFO would) and refused unless they are regular files no
//! larger than guest RAM, before anything is read; the loader reads the
//! first 8 KiB, the program headers and the segments by offset straight
//! into guest memory, a chunk at a time, asking `abort` between chunks.

use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use brisk_boot::linux::{KernelFormat, LinuxError, LinuxKernel};
use brisk_boot::multiboot::{FileImage, Image, Kernel, LoadError};

use crate::{Interruption, KernelConfig, KernelError, StartError};

/// Where the boot vCPU starts.
pub(crate) struct MultibootStart {
    pub entry: u32,
    pub info: u64,
}

/// A kernel loaded and ready to start.
pub(crate) enum KernelStart {
    Multiboot(MultibootStart),
    /// `info`: the zero page or PVH start info.
    Linux {
        kernel: LinuxKernel,
        info: u64,
    },
}

/// The command line a Linux kernel gets when the user gives none: the
/// console on COM1, reboot through the keyboard controller (brisk's
/// reset line), reboot at once on a panic that pvpanic did not report.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

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
fn open(what: &'static str, path: &Path, ram: u64) -> Result<FileImage, KernelError> {
    let cannot = |source: std::io::Error| KernelError::Read {
        what,
        path: path.into(),
        source,
    };
    let refuse = |meta: &Metadata| {
        if let Some(kind) = not_regular(meta) {
            return Err(KernelError::NotRegular {
                what,
                path: path.into(),
                kind,
            });
        }
        if meta.len() > ram {
            return Err(KernelError::TooLarge {
                what,
                path: path.into(),
                size: meta.len(),
                ram,
            });
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

/// Load `k` into `vm`'s memory (`ram` bytes, `cpus` vCPUs), whatever its
/// format, with the ACPI tables; a Linux kernel's command line gets
/// `extra_cmdline` (the virtio-mmio devices) appended. `abort` is asked
/// before each chunk (1 MiB) of a multiboot kernel and of an initrd.
pub(crate) fn load_bounded(
    vm: &brisk_kvm::Vm,
    k: &KernelConfig,
    ram: u64,
    cpus: usize,
    extra_cmdline: &str,
    abort: &dyn Fn() -> bool,
) -> Result<KernelStart, StartError> {
    // Both files are checked before either is read.
    let image = open("kernel", &k.path, ram)?;
    let initrd = match &k.initrd {
        Some(path) => Some((path.as_path(), open("initrd", path, ram)?)),
        None => None,
    };
    let mut head = vec![0u8; image.size().min(8192) as usize];
    image
        .read_at(&mut head, 0)
        .map_err(|source| KernelError::Read {
            what: "kernel",
            path: k.path.clone(),
            source,
        })?;
    // A 32-bit ELF without a multiboot header goes to the multiboot
    // loader, whose sentence for it says what is missing.
    let format = KernelFormat::detect(&head).or_else(|| {
        head.starts_with(b"\x7fELF")
            .then_some(KernelFormat::Multiboot)
    });
    let start = match format {
        Some(f @ (KernelFormat::BzImage | KernelFormat::Elf64)) => {
            load_linux(vm, k, (f, image), initrd, (ram, cpus), extra_cmdline, abort)?
        }
        Some(KernelFormat::Multiboot) => {
            KernelStart::Multiboot(load_multiboot(vm, k, &image, initrd, (ram, cpus), abort)?)
        }
        None => {
            return Err(KernelError::UnknownFormat {
                path: k.path.clone(),
            }
            .into())
        }
    };
    Ok(start)
}

/// `map_err` for loading `what` (kernel, initrd) from `path`: an
/// interruption (signal, --timeout) becomes `Interrupted`, anything else
/// one sentence naming the file.
fn refusal<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
    path: &Path,
    interrupted: fn(&E) -> bool,
) -> impl FnOnce(E) -> StartError {
    let path = path.to_path_buf();
    move |e| {
        if interrupted(&e) {
            Interruption::Loading { what, path }.into()
        } else {
            KernelError::Refused {
                what,
                path,
                source: Box::new(e),
            }
            .into()
        }
    }
}

fn acpi_tables(vm: &brisk_kvm::Vm, cpus: usize) -> Result<u64, StartError> {
    brisk_boot::acpi::write_acpi_tables(vm.memory(), cpus).map_err(|e| StartError::Setup {
        what: "writing the ACPI tables",
        source: Box::new(e),
    })
}

/// A multiboot kernel: segments, multiboot information, initrd as module 0.
fn load_multiboot(
    vm: &brisk_kvm::Vm,
    k: &KernelConfig,
    image: &FileImage,
    initrd: Option<(&Path, FileImage)>,
    (ram, cpus): (u64, usize),
    abort: &dyn Fn() -> bool,
) -> Result<MultibootStart, StartError> {
    let refuse = |what, path| refusal(what, path, |e| matches!(e, LoadError::Interrupted));
    let kernel = Kernel::parse(image).map_err(refuse("kernel", &k.path))?;
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
    acpi_tables(vm, cpus)?;
    Ok(MultibootStart {
        entry: kernel.entry(),
        info,
    })
}

/// A Linux bzImage or vmlinux: the kernel (rust-vmm's linux-loader), the
/// initramfs as high as the kernel reads it, the command line, the e820
/// map in the zero page (or PVH start info), the ACPI tables.
fn load_linux(
    vm: &brisk_kvm::Vm,
    k: &KernelConfig,
    (format, image): (KernelFormat, FileImage),
    initrd: Option<(&Path, FileImage)>,
    (ram, cpus): (u64, usize),
    extra_cmdline: &str,
    abort: &dyn Fn() -> bool,
) -> Result<KernelStart, StartError> {
    let refuse = |what, path| {
        refusal(what, path, |e| {
            matches!(e, LinuxError::Initrd(LoadError::Interrupted))
        })
    };
    let mut file = image.into_file();
    let kernel = brisk_boot::linux::load_kernel(vm.memory(), ram, &mut file, format)
        .map_err(refuse("kernel", &k.path))?;
    let initrd = match &initrd {
        Some((path, initrd)) => Some(
            kernel
                .load_initrd(vm.memory(), ram, initrd, abort)
                .map_err(refuse("initramfs", path))?,
        ),
        None => None,
    };
    let mut cmdline = if k.cmdline.trim().is_empty() {
        DEFAULT_LINUX_CMDLINE.to_string()
    } else {
        k.cmdline.clone()
    };
    if !extra_cmdline.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(extra_cmdline);
    }
    let rsdp = acpi_tables(vm, cpus)?;
    let info = kernel
        .write_boot_info(vm.memory(), ram, &cmdline, initrd, rsdp)
        .map_err(refuse("kernel", &k.path))?;
    log::info!(
        "Linux {format:?} {}: entry {:?}, command line {cmdline:?}",
        k.path.display(),
        kernel.entry
    );
    Ok(KernelStart::Linux { kernel, info })
}
