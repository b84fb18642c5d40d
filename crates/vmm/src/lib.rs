//! brisk's VMM: assemble a VM from a [`VmConfig`], run one thread per vCPU
//! on the control plane, dispatch exits to the devices, and report how the
//! VM ended ([`VmEnd`]).
//!
//! ```no_run
//! use brisk_vmm::{Output, Payload, Vm, VmConfig, VmEnd};
//! use std::time::Duration;
//!
//! let config = VmConfig { payload: Payload::builtin("hello"), cpus: 2, ..VmConfig::default() };
//! let vm = Vm::start(&config, Output::Stdout).unwrap();
//! let end = vm.wait(Some(Duration::from_secs(10)), None);
//! assert_eq!(end, VmEnd::PowerOff);
//! vm.shutdown().unwrap();
//! ```

mod config;
mod disk_lock;
mod end;
mod errors;
pub mod exits;
#[cfg(test)]
mod failpoint;
mod interrupts;
mod kernel;
mod lifecycle;
pub mod migration;
mod output;
mod payload;
pub mod platform;
pub mod seccomp;
pub mod snapshot;
mod vcpu_threads;
mod vm;

pub use brisk_devices::virtio::Mac;
pub use config::{ConfigError, DiskConfig, Limit, NetConfig, VmConfig, VsockConfig};
pub use end::VmEnd;
pub use errors::{DiskError, Interruption, KernelError, ReceiveError, RestoreError};
pub use interrupts::UserInterrupts;
pub use lifecycle::{Hold, VmState, Was};
pub use migration::{MigrationError, MigrationOptions, MigrationStatus, MigrationUrl};
pub use output::{Capture, Output};
pub use payload::{KernelConfig, Payload, Platform};
pub use snapshot::{LiveOptions, RestoreOptions, SnapshotError, SnapshotInfo};
pub use vcpu_threads::{PoolError, POOL_SLICE};
pub use vm::{ChangeError, Machine, PauseError, ShutdownError, StartError, Vm, SHUTDOWN_BOUND};

pub use brisk_control as control;
pub use brisk_kvm::{
    kick_signal, Error as KvmError, Exit, InterruptStats, Irqchip, KvmVcpu, Mwait,
};

/// A vCPU's control block as the VMM uses it.
pub type Vcpu = brisk_control::VcpuCtl<KvmVcpu>;

/// Whether `/dev/kvm` can be opened here: tests that need KVM skip, loudly,
/// only when it cannot.
pub fn kvm_available() -> Result<(), KvmUnavailable> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(KvmUnavailable)
}

/// `/dev/kvm` cannot be opened for reading and writing.
#[derive(Debug, thiserror::Error)]
#[error("/dev/kvm: {0}")]
pub struct KvmUnavailable(#[source] pub std::io::Error);

/// For tests: return early, with a loud SKIPPED line, when
/// [`kvm_available`] says `/dev/kvm` cannot be used.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if let Err(why) = $crate::kvm_available() {
            eprintln!("\n*** SKIPPED: this test needs KVM ({why}) ***\n");
            return;
        }
    };
}
