//! What a VM boots: a built-in guest or a multiboot kernel (and, next, a
//! Linux kernel). Each payload knows which irqchip it needs, how it loads
//! itself into guest memory and how its vCPUs start; `Machine::build`
//! asks it, and knows no payload by name.

use std::path::PathBuf;

use brisk_kvm::{Irqchip, KvmVcpu};

use crate::kernel::MultibootStart;
use crate::{ConfigError, StartError};

/// What the VM boots.
#[derive(Clone, Debug)]
pub enum Payload {
    /// A built-in guest (see `brisk guests`): `NAME`, or `NAME=N` for the
    /// counting guests (`tick=20000`).
    Builtin(String),
    /// A multiboot (v1) ELF kernel from a file, booted as GRUB or QEMU's
    /// `-kernel` would.
    Multiboot(KernelConfig),
}

/// A kernel from a file, with its command line and initrd.
#[derive(Clone, Debug, Default)]
pub struct KernelConfig {
    pub path: PathBuf,
    /// The arguments. The kernel sees them after its own file name, as
    /// GRUB and QEMU hand them over (`argv[0]` first).
    pub cmdline: String,
    /// Passed as multiboot module 0.
    pub initrd: Option<PathBuf>,
}

impl KernelConfig {
    /// The command line the kernel is given: its file name, then the
    /// arguments (the multiboot convention GRUB and QEMU follow).
    pub fn full_cmdline(&self) -> String {
        let argv0 = self.path.display().to_string();
        if self.cmdline.is_empty() {
            argv0
        } else {
            format!("{argv0} {}", self.cmdline)
        }
    }
}

/// Which set of devices a payload runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    /// The built-in guests' platform: the PC's serial port and power-off,
    /// plus brisk's test devices (per-vCPU counters; in user irqchip mode
    /// timers and the doorbell).
    Test,
    /// The PC a kernel expects: serial port, ACPI PM registers and timer,
    /// fw_cfg, debug-exit; no test devices.
    Pc,
}

/// A payload loaded into guest memory: how its vCPUs start.
pub(crate) enum Loaded {
    /// Every vCPU in 64-bit mode at the program's entry.
    LongMode,
    /// The boot vCPU at the multiboot entry; the APs wait for INIT/SIPI.
    Multiboot(MultibootStart),
}

impl Default for Payload {
    fn default() -> Self {
        Payload::builtin("hello")
    }
}

impl Payload {
    /// A built-in guest by its command-line spec (`spin`, `tick=20000`).
    pub fn builtin(spec: &str) -> Payload {
        Payload::Builtin(spec.to_string())
    }

    /// How the payload is named in reports and `vm.info`.
    pub fn name(&self) -> String {
        match self {
            Payload::Builtin(spec) => spec.split('=').next().unwrap_or(spec).to_string(),
            Payload::Multiboot(k) => k.path.display().to_string(),
        }
    }

    /// The devices it runs with.
    pub fn platform(&self) -> Platform {
        match self {
            Payload::Builtin(_) => Platform::Test,
            Payload::Multiboot(_) => Platform::Pc,
        }
    }

    /// The irqchip it runs on when the user chose none.
    pub fn default_irqchip(&self) -> Irqchip {
        match self {
            Payload::Builtin(_) => Irqchip::User,
            Payload::Multiboot(_) => Irqchip::Kernel,
        }
    }

    /// Check it against `irqchip` without touching KVM or files.
    pub(crate) fn validate(&self, irqchip: Irqchip) -> Result<(), ConfigError> {
        match self {
            Payload::Builtin(spec) => {
                let choice = brisk_guests::choose(spec)?;
                if choice.guest.user_irqchip && irqchip != Irqchip::User {
                    return Err(ConfigError::NeedsUserIrqchip(choice.guest.name));
                }
            }
            // Kernels bring up APs through the in-kernel LAPIC.
            Payload::Multiboot(_) if irqchip != Irqchip::Kernel => {
                return Err(ConfigError::KernelNeedsKernelIrqchip)
            }
            Payload::Multiboot(_) => {}
        }
        Ok(())
    }

    /// Load it into `kvm`'s memory, asking `abort` between chunks.
    pub(crate) fn load(
        &self,
        kvm: &brisk_kvm::Vm,
        memory: u64,
        cpus: usize,
        abort: &dyn Fn() -> bool,
    ) -> Result<Loaded, StartError> {
        use crate::vm::setup;
        match self {
            Payload::Builtin(spec) => {
                let choice = brisk_guests::choose(spec).map_err(ConfigError::from)?;
                let code = choice.assemble().map_err(setup("assembling the guest"))?;
                brisk_boot::write_page_tables(kvm.memory())
                    .map_err(setup("writing the boot tables"))?;
                brisk_boot::load_program(kvm.memory(), &code)
                    .map_err(setup("loading the guest"))?;
                Ok(Loaded::LongMode)
            }
            Payload::Multiboot(k) => {
                if !kvm.has_kvmclock_ctrl() {
                    log::warn!("this host's KVM lacks KVM_CAP_KVMCLOCK_CTRL: a kernel using kvmclock is not told when brisk pauses it");
                }
                let start = crate::kernel::load_bounded(kvm, k, memory, cpus, abort)?;
                Ok(Loaded::Multiboot(start))
            }
        }
    }
}

impl Loaded {
    /// Whether every vCPU starts runnable (else the APs wait for SIPI).
    pub(crate) fn start_aps(&self) -> bool {
        matches!(self, Loaded::LongMode)
    }

    /// Set vCPU `id`'s registers for its start.
    pub(crate) fn start_vcpu(
        &self,
        v: &KvmVcpu,
        kvm: &brisk_kvm::Vm,
        id: usize,
        cpus: usize,
    ) -> Result<(), brisk_boot::BootError> {
        match self {
            Loaded::LongMode => brisk_boot::start_vcpu_in_long_mode(v.fd(), id, cpus),
            Loaded::Multiboot(b) if id == 0 => {
                brisk_boot::multiboot::start_boot_vcpu(v.fd(), kvm.memory(), b.entry, b.info)
            }
            // APs wait for the kernel's INIT/SIPI.
            Loaded::Multiboot(_) => Ok(()),
        }
    }
}
