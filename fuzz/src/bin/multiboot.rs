//! The multiboot/ELF loader on any bytes: parse, then load into 16 MiB of
//! guest RAM (with an initrd made of the same bytes). It must refuse or
//! load, never panic, hang or touch memory outside the guest's.

use brisk_boot::multiboot::Kernel;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const RAM: u64 = 16 << 20;

fn main() {
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), RAM as usize)])
        .expect("16 MiB of memory");
    afl::fuzz!(|data: &[u8]| {
        let Ok(kernel) = Kernel::parse(data) else {
            return;
        };
        if kernel.load(&mem, RAM, &|| false).is_err() {
            return;
        }
        let module = kernel.load_initrd(&mem, RAM, data, &|| false).ok();
        let _ = kernel.write_info(&mem, RAM, "fuzz", module);
    });
}
