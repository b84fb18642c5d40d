//! What to build: guest, vCPUs, memory, irqchip.

use std::path::PathBuf;

use brisk_boot::layout::{MAX_VCPUS, MIN_MEMORY};
use brisk_kvm::{Irqchip, Mwait};

/// A VM's configuration.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// A built-in guest (see `brisk guests`): `NAME`, or `NAME=N` for the
    /// counting guests (`tick=20000`).
    pub guest: String,
    /// Number of vCPUs.
    pub cpus: usize,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Where HLT and interrupts are handled.
    pub irqchip: Irqchip,
    /// What the guest gets for MONITOR/MWAIT.
    pub mwait: Mwait,
    /// Boot this multiboot kernel instead of the built-in `guest`.
    pub kernel: Option<KernelConfig>,
    /// The seccomp filters brisk's threads install (none by default in
    /// the library; `brisk run` traps by default).
    pub seccomp: crate::seccomp::Seccomp,
}

/// A kernel from a file, booted as a multiboot (v1) loader would.
#[derive(Clone, Debug, Default)]
pub struct KernelConfig {
    pub path: PathBuf,
    pub cmdline: String,
    /// Passed as multiboot module 0.
    pub initrd: Option<PathBuf>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            guest: "hello".into(),
            cpus: 2,
            memory: 64 << 20,
            irqchip: Irqchip::User,
            mwait: Mwait::Hide,
            kernel: None,
            seccomp: crate::seccomp::Seccomp::Off,
        }
    }
}

/// A configuration brisk cannot build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Guest(#[from] brisk_guests::ChoiceError),
    #[error("{0} vCPUs requested; brisk supports 1 to {MAX_VCPUS}")]
    Cpus(usize),
    #[error("{0} bytes of memory requested; need a multiple of 4 KiB from {min} MiB to 3 GiB", min = MIN_MEMORY >> 20)]
    Memory(u64),
    /// The guest's interrupts come from user-space devices.
    #[error("guest '{0}' takes interrupts from brisk's user-space timer and doorbell, which need --irqchip user")]
    NeedsUserIrqchip(&'static str),
    /// Kernels bring up APs through the in-kernel LAPIC.
    #[error("--kernel needs --irqchip kernel (the LAPICs, IOAPIC and PIT a multiboot kernel expects, and INIT/SIPI for its APs)")]
    KernelNeedsKernelIrqchip,
}

impl VmConfig {
    /// Check the configuration without touching KVM.
    pub fn validate(&self) -> Result<brisk_guests::Choice, ConfigError> {
        let choice = brisk_guests::choose(&self.guest).map_err(ConfigError::Guest)?;
        let guest = choice.guest;
        if self.cpus == 0 || self.cpus > MAX_VCPUS {
            return Err(ConfigError::Cpus(self.cpus));
        }
        if self.memory < MIN_MEMORY
            || self.memory > brisk_kvm::MAX_LOW_RAM
            || self.memory % 4096 != 0
        {
            return Err(ConfigError::Memory(self.memory));
        }
        if self.kernel.is_some() {
            if self.irqchip != Irqchip::Kernel {
                return Err(ConfigError::KernelNeedsKernelIrqchip);
            }
        } else if guest.user_irqchip && self.irqchip != Irqchip::User {
            return Err(ConfigError::NeedsUserIrqchip(guest.name));
        }
        Ok(choice)
    }
}
