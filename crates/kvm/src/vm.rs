//! A KVM VM with one slot of guest RAM at guest physical address 0.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::{Error, KvmVcpu, Result};

/// Where interrupts and HLT are handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Irqchip {
    /// No in-kernel irqchip: HLT exits to brisk, which halts the vCPU in
    /// user space until a kick.
    User,
    /// KVM's in-kernel PIC/IOAPIC/LAPIC: HLT blocks inside KVM_RUN.
    Kernel,
}

/// Guest RAM below this address (the 32-bit MMIO hole starts here).
pub const MAX_LOW_RAM: u64 = 3 << 30;

/// A VM: the KVM handle, the VM fd and guest memory.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestMemoryMmap,
    irqchip: Irqchip,
}

impl Vm {
    /// Open `/dev/kvm`, create a VM with `mem_size` bytes of RAM at 0.
    pub fn new(mem_size: u64, irqchip: Irqchip) -> Result<Vm> {
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT => Error::NoKvm,
            libc::EACCES | libc::EPERM => Error::KvmPermission,
            _ => Error::Sys {
                what: "opening /dev/kvm",
                err: e,
            },
        })?;
        if !kvm.check_extension(Cap::ImmediateExit) {
            return Err(Error::MissingCapability("KVM_CAP_IMMEDIATE_EXIT"));
        }
        if mem_size == 0 || mem_size > MAX_LOW_RAM || mem_size % 4096 != 0 {
            return Err(Error::Memory(format!(
                "size must be a non-zero multiple of 4 KiB up to 3 GiB, not {mem_size} bytes"
            )));
        }
        crate::kick::install_handler()?;
        let fd = kvm.create_vm().map_err(Error::sys("KVM_CREATE_VM"))?;
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size as usize)])
            .map_err(|e| Error::Memory(e.to_string()))?;
        for (slot, region) in memory.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `memory`, which
            // the Vm keeps for as long as the VM fd exists.
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(Error::sys("KVM_SET_USER_MEMORY_REGION"))?;
        }
        if irqchip == Irqchip::Kernel {
            fd.create_irq_chip()
                .map_err(Error::sys("KVM_CREATE_IRQCHIP"))?;
        }
        Ok(Vm {
            kvm,
            fd,
            memory,
            irqchip,
        })
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The VM fd, for ioctls this crate does not wrap.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The irqchip mode chosen at creation.
    pub fn irqchip(&self) -> Irqchip {
        self.irqchip
    }

    /// Create vCPU `id` with the host's supported CPUID (its APIC id set
    /// to `id`), runnable at once (no INIT/SIPI needed).
    pub fn create_vcpu(&self, id: usize) -> Result<KvmVcpu> {
        let fd = self
            .fd
            .create_vcpu(id as u64)
            .map_err(Error::sys("KVM_CREATE_VCPU"))?;
        let mut cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::sys("KVM_GET_SUPPORTED_CPUID"))?;
        for entry in cpuid.as_mut_slice() {
            match entry.function {
                // Initial APIC id in EBX[31:24].
                1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | ((id as u32) << 24),
                // x2APIC id.
                0xb | 0x1f => entry.edx = id as u32,
                _ => {}
            }
        }
        fd.set_cpuid2(&cpuid)
            .map_err(Error::sys("KVM_SET_CPUID2"))?;
        if self.irqchip == Irqchip::Kernel && id != 0 {
            // With an in-kernel LAPIC, KVM parks APs waiting for SIPI;
            // built-in guests start every vCPU at the entry instead.
            let state = kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            };
            fd.set_mp_state(state)
                .map_err(Error::sys("KVM_SET_MP_STATE"))?;
        }
        Ok(KvmVcpu::new(id, fd))
    }
}
