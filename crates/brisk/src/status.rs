//! brisk's process exit statuses: the guest's when it chose one, distinct
//! even numbers for VMM failures.

use brisk_vmm::{StartError, VmEnd};

/// Guest powered off cleanly.
pub const OK: i32 = 0;
/// Command-line error (clap's own code).
pub const USAGE: i32 = 2;
/// /dev/kvm missing, not accessible, or lacking a capability (or an option).
pub const NO_KVM: i32 = 4;
/// Bad configuration: unknown guest, bad vCPU count or memory size.
pub const CONFIG: i32 = 6;
/// The guest crashed: triple fault, emulation failure, unhandled exit.
pub const GUEST_CRASH: i32 = 8;
/// --timeout passed with the guest still running.
pub const TIMEOUT: i32 = 10;
/// Internal VMM failure: a KVM call or a vCPU thread failed.
pub const INTERNAL: i32 = 12;
/// `brisk stress` found a violated property.
pub const STRESS_FAILED: i32 = 14;
/// `brisk ctl`: the API answered with an error.
pub const API_ERROR: i32 = 16;
/// `brisk ctl`: the API socket could not be reached.
pub const API_UNREACHABLE: i32 = 18;
/// The guest reset the machine (a Linux `reboot`).
pub const REBOOT: i32 = 20;
/// The guest kernel panicked (pvpanic).
pub const PANICKED: i32 = 22;

/// The text `brisk run --help` shows.
pub const HELP: &str = "\
Exit status:
  0      the guest powered off (ACPI PM1a_CNT at port 0x604), the API shut it down,
         or it was migrated away (the destination runs it now)
  odd    the guest wrote v to the debug-exit port 0xf4: (v << 1) | 1, as QEMU's isa-debug-exit
  2      bad command line
  4      /dev/kvm is missing, not accessible, or lacks a needed capability
         (e.g. --mwait passthrough on a host that cannot disable MWAIT exits)
  6      bad configuration (unknown guest, vCPU count, memory size, API socket in
         use; a --kernel, --initramfs or --disk that cannot be read or booted: not a
         bzImage, ELF vmlinux or multiboot kernel, truncated, too big for the RAM; a
         --restore snapshot that is missing, of another format version, truncated or
         corrupt, or whose state KVM refuses)
  8      the guest crashed (triple fault, emulation failure, unhandled exit)
  20     the guest rebooted (keyboard-controller reset, Linux's reboot=k); brisk
         ends the VM rather than booting it again
  22     the guest kernel panicked (reported through pvpanic, ACPI QEMU0001)
  10     --timeout passed with the guest still running
  12     internal VMM failure (a KVM call or a vCPU thread failed)
  128+n  stopped by signal n, cleanly (vCPUs stopped, API socket removed): 130 SIGINT
         (Ctrl-C), 143 SIGTERM, 129 SIGHUP, 131 SIGQUIT; a second signal ends brisk at once";

/// Status for a VM that ran and ended.
pub fn for_end(end: &VmEnd, signal: i32) -> i32 {
    match end {
        VmEnd::PowerOff | VmEnd::ShutdownRequested | VmEnd::Migrated { .. } => OK,
        VmEnd::DebugExit(v) => (((v << 1) | 1) & 0xff) as i32,
        VmEnd::Crash { .. } => GUEST_CRASH,
        VmEnd::Reboot => REBOOT,
        VmEnd::Panicked => PANICKED,
        VmEnd::VcpuFailed { .. } | VmEnd::PoolThreadFailed { .. } => INTERNAL,
        VmEnd::Timeout => TIMEOUT,
        VmEnd::Interrupted => 128 + signal,
    }
}

/// Status for a VM that could not start (`signal`: the last one received).
pub fn for_start_error(e: &StartError, signal: i32) -> i32 {
    use brisk_vmm::KvmError::{KvmPermission, MissingCapability, NoKvm, Unavailable};
    match e {
        StartError::Interrupted(_) if signal != 0 => 128 + signal,
        StartError::Interrupted(_) => TIMEOUT,
        StartError::Config(_)
        | StartError::Kernel(_)
        | StartError::Disk(_)
        | StartError::Snapshot(_)
        | StartError::Receive(_)
        | StartError::SnapshotFile(_)
        | StartError::Tap(_)
        | StartError::Vsock(_) => CONFIG,
        StartError::Kvm(NoKvm | KvmPermission | MissingCapability(_) | Unavailable { .. }) => {
            NO_KVM
        }
        // A host kernel too old for a pool is a configuration this host
        // cannot run, as a missing capability is.
        StartError::Threads(brisk_vmm::PoolError::OldKernel { .. }) => CONFIG,
        StartError::Kvm(_) | StartError::Setup { .. } | StartError::Threads(_) => INTERNAL,
    }
}
