//! What a VM boots: a built-in guest or a kernel from a file (Linux or
//! multiboot, told apart by the file's first bytes). Each payload knows
//! which irqchip it needs, how it loads itself into guest memory and how
//! its vCPUs start; `Machine::build` asks it, and knows no payload by name.

use std::path::PathBuf;

use brisk_kvm::{Irqchip, KvmVcpu};

use crate::kernel::{KernelStart, MultibootStart};
use crate::{ConfigError, StartError};

/// What the VM boots.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum Payload {
    /// A built-in guest (see `brisk guests`): `NAME`, or `NAME=N` for the
    /// counting guests (`tick=20000`).
    Builtin(String),
    /// A kernel from a file: a Linux bzImage or ELF vmlinux (64-bit boot
    /// protocol, or PVH when the vmlinux has the note), or a multiboot
    /// (v1) ELF kernel booted as GRUB or QEMU's `-kernel` would.
    Kernel(KernelConfig),
}

/// A kernel from a file, with its command line and initrd.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct KernelConfig {
    pub path: PathBuf,
    /// The arguments. A multiboot kernel sees them after its own file
    /// name, as GRUB and QEMU hand them over (`argv[0]` first); a Linux
    /// kernel sees them as given, or `DEFAULT_LINUX_CMDLINE` when empty,
    /// with the virtio-mmio devices appended.
    pub cmdline: String,
    /// Linux: the initramfs; multiboot: module 0.
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
    /// The boot vCPU at the Linux entry; the APs wait for INIT/SIPI.
    Linux {
        kernel: brisk_boot::linux::LinuxKernel,
        info: u64,
    },
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
            Payload::Kernel(k) => k.path.display().to_string(),
        }
    }

    /// The devices it runs with.
    pub fn platform(&self) -> Platform {
        match self {
            Payload::Builtin(_) => Platform::Test,
            Payload::Kernel(_) => Platform::Pc,
        }
    }

    /// The irqchip it runs on when the user chose none.
    pub fn default_irqchip(&self) -> Irqchip {
        match self {
            Payload::Builtin(_) => Irqchip::User,
            Payload::Kernel(_) => Irqchip::Kernel,
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
            // Either irqchip has the LAPICs and IOAPIC a kernel expects
            // (KVM's, or brisk's own: `brisk_devices::apic`).
            Payload::Kernel(_) => {}
        }
        Ok(())
    }

    /// Load it into `kvm`'s memory, asking `abort` between chunks; a Linux
    /// kernel's command line gets `extra_cmdline` (the platform's devices).
    pub(crate) fn load(
        &self,
        kvm: &brisk_kvm::Vm,
        (memory, cpus): (u64, usize),
        extra_cmdline: &str,
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
            Payload::Kernel(k) => {
                if !kvm.has_kvmclock_ctrl() {
                    log::warn!("this host's KVM lacks KVM_CAP_KVMCLOCK_CTRL: a kernel using kvmclock is not told when brisk pauses it");
                }
                match crate::kernel::load_bounded(kvm, k, memory, cpus, extra_cmdline, abort)? {
                    KernelStart::Multiboot(start) => Ok(Loaded::Multiboot(start)),
                    KernelStart::Linux { kernel, info } => Ok(Loaded::Linux { kernel, info }),
                }
            }
        }
    }
}

impl Loaded {
    /// Whether every vCPU starts runnable (else the APs wait for SIPI).
    /// With brisk's LAPICs, the waiting is theirs; KVM's vCPUs are
    /// runnable.
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
            Loaded::Linux { kernel, info } if id == 0 => {
                brisk_boot::linux::start_boot_vcpu(v.fd(), kvm.memory(), kernel, *info)
            }
            // APs get the same reset MSRs, then wait for INIT/SIPI.
            Loaded::Linux { .. } => brisk_boot::linux::set_boot_msrs(v.fd()),
        }
    }
}
