//! The Linux loader on any bytes: detect the format, load the kernel
//! (bzImage or 64-bit ELF, through linux-loader) into 64 MiB of guest
//! RAM, place an initramfs made of the same bytes and write the zero page
//! or PVH start info. It must refuse or load, never panic, hang or touch
//! memory outside the guest's.

use std::os::unix::fs::FileExt;

use brisk_boot::linux::{load_kernel, KernelFormat};
use brisk_boot::multiboot::FileImage;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const RAM: u64 = 64 << 20;

fn main() {
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), RAM as usize)])
        .expect("64 MiB of memory");
    // The loader reads a file (its size is what linux-loader trusts): one
    // scratch file, its name removed at once, so nothing is left behind
    // when AFL ends this process.
    let path = std::env::temp_dir().join(format!("brisk-fuzz-linux-{}", std::process::id()));
    let scratch = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("scratch file");
    std::fs::remove_file(&path).expect("scratch file's name");
    afl::fuzz!(|data: &[u8]| {
        let format = match KernelFormat::detect(data) {
            Some(f @ (KernelFormat::BzImage | KernelFormat::Elf64)) => f,
            _ => return,
        };
        scratch.set_len(0).expect("scratch file");
        scratch.write_all_at(data, 0).expect("scratch file");
        let mut file = scratch.try_clone().expect("scratch file");
        std::io::Seek::rewind(&mut file).expect("scratch file");
        let Ok(kernel) = load_kernel(&mem, RAM, &mut file, format) else {
            return;
        };
        let initrd = scratch
            .try_clone()
            .and_then(FileImage::new)
            .ok()
            .and_then(|img| kernel.load_initrd(&mem, RAM, &img, &|| false).ok());
        let _ = kernel.write_boot_info(&mem, RAM, "console=ttyS0", initrd, 0xe0000);
    });
}
