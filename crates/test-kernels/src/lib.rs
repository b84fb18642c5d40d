//! Multiboot (v1) test kernels written for brisk, in C and assembly, built
//! with the machine's gcc and ld by `src/c/build.sh` (run by this crate's
//! build script; by hand: `sh crates/test-kernels/src/c/build.sh DIR`).
//!
//! Every kernel prints on COM1 and ends by writing its result to the
//! debug-exit port 0xf4: 0 means success, so brisk exits with status 1.
//!
//! ```
//! assert!(std::path::Path::new(brisk_test_kernels::HELLO).exists());
//! ```

/// Prints the multiboot magic, memory, command line and initrd; exits with
/// the status given as `status=N` on its command line.
pub const HELLO: &str = concat!(env!("OUT_DIR"), "/hello.elf");
/// Reads fw_cfg and the ACPI MADT, starts every AP with INIT/SIPI; each AP
/// prints its APIC id.
pub const SMP: &str = concat!(env!("OUT_DIR"), "/smp.elf");
/// Finds the PM timer through the FADT and checks its rate against PIT
/// channel 2 (within 5%).
pub const PMTIMER: &str = concat!(env!("OUT_DIR"), "/pmtimer.elf");
/// Times `inl` from an unassigned port and from the PM timer with rdtsc.
pub const INL: &str = concat!(env!("OUT_DIR"), "/inl.elf");
/// Takes the UART's IRQ 4 through KVM's IOAPIC (transmit-empty, then
/// received data: it waits for the host to type "ping"), and echoes it.
pub const UARTIRQ: &str = concat!(env!("OUT_DIR"), "/uartirq.elf");

/// Drives the first virtio-blk disk by polling its queue: writes a known
/// pattern (byte i of sector s is `(s * 31 + i * 7 + 1) & 0xff`) to the
/// first 64 sectors, flushes, reads it back; `bench=N` times N random and
/// N sequential 4 KiB reads instead.
pub const VIRTIOBLK: &str = concat!(env!("OUT_DIR"), "/virtioblk.elf");
/// Sectors the `VIRTIOBLK` kernel writes its pattern to.
pub const VIRTIOBLK_SECTORS: u64 = 64;

/// Byte `i` of sector `s` of the `VIRTIOBLK` pattern.
pub fn virtioblk_pattern(s: u64, i: u64) -> u8 {
    (s * 31 + i * 7 + 1) as u8
}

/// The debug-exit value every kernel writes on success (brisk status 1).
pub const PASS: u8 = 0;
