//! A KVM VM with one slot of guest RAM at guest physical address 0.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{self, GuestRam, MemoryBacking};
use crate::{Error, KvmVcpu, Result};

/// Where interrupts and HLT are handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Irqchip {
    /// No in-kernel irqchip: HLT exits to brisk, which halts the vCPU in
    /// user space until a kick.
    User,
    /// KVM's in-kernel PIC/IOAPIC/LAPIC: HLT blocks inside KVM_RUN.
    Kernel,
}

/// What the guest gets for MONITOR/MWAIT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Mwait {
    /// CPUID does not offer MONITOR/MWAIT, so guests idle with HLT (which
    /// brisk can halt in user space). If a guest uses them anyway, KVM
    /// traps them and runs them as NOPs.
    #[default]
    Hide,
    /// CPUID offers MONITOR/MWAIT; KVM traps them and runs MWAIT as a NOP
    /// (architecturally a legal early wake-up). KVM has no MWAIT exit to
    /// user space, so brisk cannot turn MWAIT into a HLT: a guest idling
    /// with MWAIT polls instead of sleeping.
    Exit,
    /// CPUID offers MONITOR/MWAIT and KVM lets the guest run them natively
    /// (KVM_CAP_X86_DISABLE_EXITS with MWAIT): a real low-power wait on
    /// the host CPU, invisible to brisk and to kicks until an interrupt.
    Passthrough,
}

/// CPUID.1:ECX bit 3: MONITOR/MWAIT.
const CPUID_MONITOR: u32 = 1 << 3;
/// KVM's feature leaf, and its PV send-IPI bit (KVM_FEATURE_PV_SEND_IPI).
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
/// KVM's PV features that work only through its in-kernel LAPIC (async
/// page faults (4, 10, 14), PV EOI (6), PV unhalt (7), PV send-IPI (11),
/// PV sched-yield (13), extended MSI destination ids (15)): hidden when
/// brisk's LAPIC is the guest's.
const KVM_FEATURES_NEEDING_KERNEL_LAPIC: u32 =
    (1 << 4) | (1 << 6) | (1 << 7) | (1 << 10) | (1 << 11) | (1 << 13) | (1 << 14) | (1 << 15);
/// CPUID.1: EDX[9] APIC; ECX[21] x2APIC, ECX[24] TSC-deadline timer.
const CPUID_APIC: u32 = 1 << 9;
const CPUID_X2APIC: u32 = 1 << 21;
const CPUID_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.6:EAX[2]: the APIC timer runs at a constant rate (ARAT).
const CPUID_ARAT: u32 = 1 << 2;
/// IA32_APIC_BASE and IA32_TSC_DEADLINE, which KVM would answer itself
/// (as if there were no APIC) unless filtered to user space.
const MSR_APIC_BASE: u32 = 0x1b;
const MSR_TSC_DEADLINE: u32 = 0x6e0;

/// A VM: the KVM handle, the VM fd and guest memory.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestRam,
    /// The memfd behind shared RAM ([`MemoryBacking::NewMemfd`] or
    /// [`MemoryBacking::Shared`]).
    shared_memory: Option<std::fs::File>,
    /// The file behind RAM, whatever the backing but anonymous.
    memory_file: Option<std::fs::File>,
    /// KVM logs the guest's writes (KVM_MEM_LOG_DIRTY_PAGES).
    dirty_log: std::sync::atomic::AtomicBool,
    /// The log comes from per-vCPU rings instead of per-slot bitmaps
    /// ([`Vm::enable_dirty_ring`]).
    dirty_rings: Option<std::sync::Arc<crate::dirty_ring::DirtyRings>>,
    irqchip: Irqchip,
    mwait: Mwait,
    /// Offer KVM's PV send-IPI hypercall in CPUID (as QEMU's kvm-pv-ipi).
    pv_ipi: bool,
    /// brisk models the LAPICs (user irqchip for a kernel): the APIC
    /// MSRs exit to user space and CPUID offers the APIC brisk models.
    user_apic: bool,
    /// Bytes of each vCPU's `kvm_run` mapping.
    run_size: usize,
    /// KVM_CAP_KVMCLOCK_CTRL: parked vCPUs tell kvmclock guests.
    kvmclock_ctrl: bool,
    /// The irqfds registered (a copy of each eventfd, and its GSI), so a
    /// save can flush the injections they have in flight.
    irqfds: std::sync::Mutex<Vec<(vmm_sys_util::eventfd::EventFd, u32)>>,
}

impl Vm {
    /// Open `/dev/kvm`, create a VM with RAM in `regions` ((start,
    /// length) pairs, page-aligned; brisk_boot::layout::ram_regions).
    pub fn new(regions: &[(u64, u64)], irqchip: Irqchip) -> Result<Vm> {
        Self::with_backing(regions, irqchip, MemoryBacking::Anonymous)
    }

    /// As [`Vm::new`], with RAM from `backing`.
    pub fn with_backing(
        regions: &[(u64, u64)],
        irqchip: Irqchip,
        backing: MemoryBacking,
    ) -> Result<Vm> {
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
        let total: u64 = regions.iter().map(|r| r.1).sum();
        if total == 0 || regions.iter().any(|&(a, l)| a % 4096 != 0 || l % 4096 != 0) {
            return Err(Error::MemorySize(total));
        }
        crate::kick::install_handler()?;
        let run_size = kvm
            .get_vcpu_mmap_size()
            .map_err(Error::sys("KVM_GET_VCPU_MMAP_SIZE"))?;
        let kvmclock_ctrl = kvm.check_extension(Cap::KvmclockCtrl);
        let fd = kvm.create_vm().map_err(Error::sys("KVM_CREATE_VM"))?;
        let ram = memory::map(regions, backing)?;
        register_slots(&fd, &ram.memory, 0)?;
        if irqchip == Irqchip::Kernel {
            // PIC, IOAPIC, LAPICs, and the PIT (with port 0x61 handled by
            // KVM, so guests can calibrate with PIT channel 2).
            fd.create_irq_chip()
                .map_err(Error::sys("KVM_CREATE_IRQCHIP"))?;
            let pit = kvm_bindings::kvm_pit_config {
                flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit).map_err(Error::sys("KVM_CREATE_PIT2"))?;
        }
        Ok(Vm {
            kvm,
            fd,
            memory: ram.memory,
            shared_memory: ram.shared,
            memory_file: ram.file,
            dirty_log: std::sync::atomic::AtomicBool::new(false),
            dirty_rings: None,
            irqchip,
            mwait: Mwait::default(),
            pv_ipi: true,
            user_apic: false,
            run_size,
            kvmclock_ctrl,
            irqfds: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Route writes of `evt` to GSI `gsi` of the in-kernel irqchip
    /// (KVM_IRQFD).
    pub fn register_irqfd(&self, evt: &vmm_sys_util::eventfd::EventFd, gsi: u32) -> Result<()> {
        let kept = evt.try_clone().map_err(|e| Error::Sys {
            what: "duplicating an irqfd",
            err: vmm_sys_util::errno::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(Error::sys("KVM_IRQFD"))?;
        self.irqfds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((kept, gsi));
        Ok(())
    }

    /// Have KVM signal `evt` when the guest writes the 32-bit value
    /// `value` to the MMIO address `addr` (KVM_IOEVENTFD with a data
    /// match): the write completes inside KVM, without an exit to the
    /// vCPU loop. A virtio QueueNotify is served this way, off the vCPU
    /// thread.
    pub fn register_ioeventfd(
        &self,
        evt: &vmm_sys_util::eventfd::EventFd,
        addr: u64,
        value: u32,
    ) -> Result<()> {
        self.fd
            .register_ioevent(evt, &kvm_ioctls::IoEventAddress::Mmio(addr), value)
            .map_err(Error::sys("KVM_IOEVENTFD"))
    }

    /// Deliver the interrupts irqfds have in flight. A write to an irqfd
    /// routed to the IOAPIC or PIC is injected later, by a kernel worker:
    /// one pulled just before a pause could land after the irqchip was
    /// read, in neither the saved device nor the saved irqchip.
    /// Deassigning an irqfd waits for that work. Assigning it again
    /// schedules anything written meanwhile (KVM checks the eventfd as it
    /// assigns), which may still land after the read: the devices' own
    /// state, pulled again after a restore, covers that.
    pub(crate) fn flush_irqfds(&self) -> Result<()> {
        for (evt, gsi) in self.irqfds.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            self.fd
                .unregister_irqfd(evt, *gsi)
                .map_err(Error::sys("KVM_IRQFD (deassign)"))?;
            // Assigned again, or the line is gone: try twice, then say so
            // loudly (the device can no longer interrupt).
            let again = self.fd.register_irqfd(evt, *gsi);
            if let Err(e) = again.or_else(|_| self.fd.register_irqfd(evt, *gsi)) {
                log::error!("GSI {gsi}: its irqfd could not be assigned again ({e}); the device on it can no longer interrupt");
                return Err(Error::sys("KVM_IRQFD")(e));
            }
        }
        Ok(())
    }

    /// Offer KVM_FEATURE_PV_SEND_IPI to the guest (the default) or hide
    /// it, as QEMU's `kvm-pv-ipi=off`: a guest then sends IPIs through its
    /// LAPIC. For hosts whose KVM advertises the hypercall but never
    /// completes it (PVM: a Linux AP stops at its first PV IPI). Call
    /// before creating vCPUs.
    pub fn set_pv_ipi(&mut self, offer: bool) {
        self.pv_ipi = offer;
    }

    /// Choose the MWAIT policy; call before creating vCPUs. `Passthrough`
    /// fails with [`Error::Unavailable`] where KVM cannot disable MWAIT exits.
    pub fn set_mwait(&mut self, policy: Mwait) -> Result<()> {
        if policy == Mwait::Passthrough {
            let can = self
                .fd
                .check_extension_raw(kvm_bindings::KVM_CAP_X86_DISABLE_EXITS.into());
            if can < 0 || can as u32 & kvm_bindings::KVM_X86_DISABLE_EXITS_MWAIT == 0 {
                return Err(Error::Unavailable {
                    what: "--mwait passthrough",
                    why: "this host's KVM cannot disable MWAIT exits (KVM_CAP_X86_DISABLE_EXITS lacks KVM_X86_DISABLE_EXITS_MWAIT); use --mwait hide or exit",
                });
            }
            let mut cap = kvm_bindings::kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_X86_DISABLE_EXITS,
                ..Default::default()
            };
            cap.args[0] = kvm_bindings::KVM_X86_DISABLE_EXITS_MWAIT.into();
            self.fd
                .enable_cap(&cap)
                .map_err(Error::sys("KVM_ENABLE_CAP(KVM_CAP_X86_DISABLE_EXITS)"))?;
        }
        self.mwait = policy;
        Ok(())
    }

    /// The MWAIT policy.
    pub fn mwait(&self) -> Mwait {
        self.mwait
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestRam {
        &self.memory
    }

    /// The memfd behind shared guest RAM, if it is shared.
    pub fn shared_memory(&self) -> Option<&std::fs::File> {
        self.shared_memory.as_ref()
    }

    /// The file guest RAM is mapped from (a snapshot's memory file, a
    /// memfd), its regions one after another; `None` for anonymous RAM.
    pub fn memory_file(&self) -> Option<&std::fs::File> {
        self.memory_file.as_ref()
    }

    /// Make guest RAM in `[gpa, gpa + len)` read as zero again and give
    /// its pages back to the host (page-aligned, within one region): a
    /// migration receiver's Zero message, which must never fault in the
    /// range it names. Anonymous RAM drops the pages (`MADV_DONTNEED`);
    /// shared memfd RAM punches a hole in the file (`MADV_REMOVE`). RAM
    /// mapped copy-on-write from a snapshot file would read the file's
    /// bytes back, so it is refused.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<()> {
        use vm_memory::GuestAddress;
        let page = memory::PAGE_SIZE as u64;
        let bad = |why: &str| Error::State(format!("discarding {len:#x} bytes at {gpa:#x}: {why}"));
        if gpa % page != 0 || len % page != 0 || len == 0 {
            return Err(bad("not whole pages"));
        }
        let advice = match (&self.shared_memory, &self.memory_file) {
            (Some(_), _) => libc::MADV_REMOVE,
            (None, None) => libc::MADV_DONTNEED,
            (None, Some(_)) => return Err(bad("RAM is mapped from a snapshot file")),
        };
        let inside = self.memory.iter().any(|r| {
            gpa >= r.start_addr().raw_value()
                && gpa
                    .checked_add(len)
                    .is_some_and(|end| end <= r.start_addr().raw_value() + r.len())
        });
        if !inside {
            return Err(bad("outside guest RAM"));
        }
        let host = self
            .memory
            .get_host_address(GuestAddress(gpa))
            .map_err(|e| bad(&e.to_string()))?;
        // SAFETY: the range lies inside one mapping of guest RAM that this
        // VM owns (checked above); dropping its pages only makes the guest
        // (or brisk) read zeros there next, which is what was asked.
        if unsafe { libc::madvise(host.cast(), len as usize, advice) } != 0 {
            return Err(Error::Sys {
                what: "madvise (discarding guest RAM)",
                err: vmm_sys_util::errno::Error::last(),
            });
        }
        Ok(())
    }

    /// The `/dev/kvm` handle, for system ioctls this crate does not wrap.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Start or stop KVM's log of the pages the guest writes
    /// (KVM_MEM_LOG_DIRTY_PAGES on every slot). Starting also clears
    /// vm-memory's bitmaps of brisk's own writes.
    pub fn set_dirty_log(&self, on: bool) -> Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        if on == self.dirty_log.load(SeqCst) {
            return Ok(());
        }
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        register_slots(&self.fd, &self.memory, flags)?;
        if on {
            for region in self.memory.iter() {
                vm_memory::MmapRegion::bitmap(region).reset();
            }
            // Pages pushed by an earlier log are no news to this one.
            if let Some(rings) = &self.dirty_rings {
                rings.take()?;
            }
        }
        self.dirty_log.store(on, SeqCst);
        Ok(())
    }

    /// For each region (slot) in address order: the pages written since
    /// the last call (or since logging started), by the guest (KVM's log)
    /// or by brisk (vm-memory's bitmap), one bit per 4 KiB page; both are
    /// reset. Needs [`Vm::set_dirty_log`] on.
    pub fn take_dirty_pages(&self) -> Result<Vec<Vec<u64>>> {
        if !self.dirty_log.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::State("dirty logging is off".into()));
        }
        // KVM's log, a bitmap per slot (the rings keep one per slot too).
        let mut log = match &self.dirty_rings {
            Some(rings) => rings.take()?,
            None => self
                .memory
                .iter()
                .enumerate()
                .map(|(slot, region)| {
                    self.fd
                        .get_dirty_log(slot as u32, region.len() as usize)
                        .map_err(Error::sys("KVM_GET_DIRTY_LOG"))
                })
                .collect::<Result<Vec<_>>>()?,
        };
        for (kvm, region) in log.iter_mut().zip(self.memory.iter()) {
            let ours = vm_memory::MmapRegion::bitmap(region).get_and_reset();
            for (k, o) in kvm.iter_mut().zip(ours) {
                *k |= o;
            }
        }
        Ok(log)
    }

    /// Learn the guest's writes from per-vCPU dirty rings instead of
    /// per-slot bitmaps (`dirty_ring.rs`). Call before creating vCPUs.
    pub fn enable_dirty_ring(&mut self) -> Result<()> {
        let pages: Vec<u64> = self.memory.iter().map(|r| r.len() / 4096).collect();
        let rings = crate::dirty_ring::DirtyRings::enable(&self.fd, &pages)?;
        self.dirty_rings = Some(std::sync::Arc::new(rings));
        Ok(())
    }

    /// Whether the dirty log comes from rings ([`Vm::enable_dirty_ring`]).
    pub fn has_dirty_ring(&self) -> bool {
        self.dirty_rings.is_some()
    }

    /// The VM fd, for ioctls this crate does not wrap.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Whether parked vCPUs can tell a kvmclock guest that its clock
    /// stopped (KVM_CAP_KVMCLOCK_CTRL).
    pub fn has_kvmclock_ctrl(&self) -> bool {
        self.kvmclock_ctrl
    }

    /// With the user irqchip, have brisk's LAPIC model be the guest's:
    /// RDMSR/WRMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE and (with no
    /// in-kernel LAPIC, KVM faults them) the x2APIC MSRs exit to user
    /// space, as do MSRs KVM does not know (brisk answers those with the
    /// #GP KVM would have injected). Call before creating vCPUs.
    pub fn enable_user_apic(&mut self) -> Result<()> {
        use kvm_ioctls::{
            MsrExitReason, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags,
        };
        if self.irqchip != Irqchip::User {
            return Err(Error::MissingCapability("a VM without KVM's irqchip"));
        }
        for (cap, name) in [
            (Cap::X86UserSpaceMsr, "KVM_CAP_X86_USER_SPACE_MSR"),
            (Cap::X86MsrFilter, "KVM_CAP_X86_MSR_FILTER"),
        ] {
            if !self.kvm.check_extension(cap) {
                return Err(Error::MissingCapability(name));
            }
        }
        let mut cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
            ..Default::default()
        };
        cap.args[0] = u64::from(
            (MsrExitReason::Inval | MsrExitReason::Unknown | MsrExitReason::Filter).bits(),
        );
        self.fd
            .enable_cap(&cap)
            .map_err(Error::sys("enabling KVM_CAP_X86_USER_SPACE_MSR"))?;
        // One bit per MSR, 0 = denied: the access exits to user space.
        let deny = [0u8];
        let both = MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE;
        let ranges = [MSR_APIC_BASE, MSR_TSC_DEADLINE].map(|base| MsrFilterRange {
            flags: both,
            base,
            msr_count: 1,
            bitmap: &deny,
        });
        self.fd
            .set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
            .map_err(Error::sys("KVM_X86_SET_MSR_FILTER"))?;
        self.user_apic = true;
        Ok(())
    }

    /// Whether brisk's LAPIC model is the guest's ([`Vm::enable_user_apic`]).
    pub fn user_apic(&self) -> bool {
        self.user_apic
    }

    /// The irqchip mode chosen at creation.
    pub fn irqchip(&self) -> Irqchip {
        self.irqchip
    }

    /// Create vCPU `id` with the host's supported CPUID (its APIC id set
    /// to `id`, `count` logical processors in the package). With the
    /// kernel irqchip, vCPUs other than 0 wait for INIT/SIPI unless
    /// `start_aps` makes them runnable at once (built-in guests).
    pub fn create_vcpu(&self, id: usize, count: usize, start_aps: bool) -> Result<KvmVcpu> {
        let fd = self
            .fd
            .create_vcpu(id as u64)
            .map_err(Error::sys("KVM_CREATE_VCPU"))?;
        let mut cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::sys("KVM_GET_SUPPORTED_CPUID"))?;
        let offer_mwait = self.mwait != Mwait::Hide;
        for entry in cpuid.as_mut_slice() {
            match entry.function {
                // Initial APIC id in EBX[31:24]; MONITOR/MWAIT in ECX[3].
                1 => {
                    // EBX[23:16]: logical processors per package; EDX[28]: HTT.
                    let count = (count as u32).min(255) << 16;
                    entry.ebx = (entry.ebx & 0x0000_ffff) | ((id as u32) << 24) | count;
                    entry.edx |= 1 << 28;
                    entry.ecx = (entry.ecx & !CPUID_MONITOR) | (offer_mwait as u32 * CPUID_MONITOR);
                    if self.user_apic {
                        // What brisk's LAPIC models.
                        entry.edx |= CPUID_APIC;
                        entry.ecx |= CPUID_X2APIC | CPUID_TSC_DEADLINE;
                    }
                }
                6 if self.user_apic => entry.eax |= CPUID_ARAT,
                // The MONITOR/MWAIT leaf: line sizes, MWAIT extensions.
                5 if offer_mwait => {
                    (entry.eax, entry.ebx) = (64, 64);
                    entry.ecx = 0b11; // enumerates extensions; interrupts break MWAIT
                    entry.edx = 0;
                }
                5 => (entry.eax, entry.ebx, entry.ecx, entry.edx) = (0, 0, 0, 0),
                // x2APIC id.
                0xb | 0x1f => entry.edx = id as u32,
                KVM_CPUID_FEATURES if self.user_apic => {
                    entry.eax &= !KVM_FEATURES_NEEDING_KERNEL_LAPIC
                }
                KVM_CPUID_FEATURES if !self.pv_ipi => entry.eax &= !KVM_FEATURE_PV_SEND_IPI,
                _ => {}
            }
        }
        if self.user_apic {
            // KVM shows CPUID's APIC bit only while its copy of
            // IA32_APIC_BASE says enabled (set before the CPUID, which
            // KVM fixes up from it). The guest's own writes go to brisk.
            let base = 0xfee0_0000 | (1 << 11) | if id == 0 { 1 << 8 } else { 0 };
            let msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
                index: MSR_APIC_BASE,
                data: base,
                ..Default::default()
            }])
            .map_err(|_| Error::MissingCapability("an MSR list"))?;
            fd.set_msrs(&msrs)
                .map_err(Error::sys("KVM_SET_MSRS(IA32_APIC_BASE)"))?;
        }
        fd.set_cpuid2(&cpuid)
            .map_err(Error::sys("KVM_SET_CPUID2"))?;
        if self.irqchip == Irqchip::Kernel && id != 0 && start_aps {
            // With an in-kernel LAPIC, KVM parks APs waiting for SIPI;
            // built-in guests start every vCPU at the entry instead.
            let state = kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            };
            fd.set_mp_state(state)
                .map_err(Error::sys("KVM_SET_MP_STATE"))?;
        }
        if let Some(rings) = &self.dirty_rings {
            rings.add_vcpu(&fd)?;
        }
        let mut vcpu = KvmVcpu::new(
            id,
            fd,
            self.run_size,
            self.kvmclock_ctrl,
            self.irqchip == Irqchip::Kernel,
        );
        vcpu.dirty_rings = self.dirty_rings.clone();
        Ok(vcpu)
    }
}

/// Tell KVM where each region of `memory` is (slot i = region i), with
/// `flags` (0, or KVM_MEM_LOG_DIRTY_PAGES).
fn register_slots(fd: &VmFd, memory: &GuestRam, flags: u32) -> Result<()> {
    for (slot, region) in memory.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags,
        };
        // SAFETY: the region is a live mapping owned by `memory`, which
        // the Vm keeps for as long as the VM fd exists.
        unsafe { fd.set_user_memory_region(region_desc) }
            .map_err(Error::sys("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}
