//! The Linux loader on any bytes: detect the format, load the kernel
//! (bzImage or 64-bit ELF, through linux-loader) into 64 MiB of guest
//! RAM, place an initramfs made of the same bytes and write the zero page
//! or PVH start info. It must refuse or load, never panic, hang or touch
//! memory outside the guest's.

use std::fs::File;
use std::os::unix::fs::FileExt;

use brisk_boot::linux::{load_kernel, KernelFormat};
use brisk_boot::multiboot::FileImage;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const RAM: u64 = 64 << 20;

fn main() {
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), RAM as usize)])
        .expect("64 MiB of memory");
    let path = std::env::temp_dir().join(format!("brisk-fuzz-linux-{}", std::process::id()));
    afl::fuzz!(|data: &[u8]| {
        let format = match KernelFormat::detect(data) {
            Some(f @ (KernelFormat::BzImage | KernelFormat::Elf64)) => f,
            _ => return,
        };
        // The loader reads a file (its size is what linux-loader trusts).
        let file = File::create(&path).expect("scratch file");
        file.write_all_at(data, 0).expect("scratch file");
        drop(file);
        let mut file = File::open(&path).expect("scratch file");
        let Ok(kernel) = load_kernel(&mem, RAM, &mut file, format) else {
            return;
        };
        let initrd = File::open(&path)
            .and_then(FileImage::new)
            .ok()
            .and_then(|img| kernel.load_initrd(&mem, RAM, &img, &|| false).ok());
        let _ = kernel.write_boot_info(&mem, RAM, "console=ttyS0", initrd, 0xe0000);
    });
}
