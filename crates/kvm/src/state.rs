//! Saving and restoring what KVM holds of a VM: each vCPU's registers and
//! in-kernel state, and the VM's irqchip, PIT and clock.
//!
//! The structures are KVM's own (`kvm-bindings`, serialised as their bytes
//! through its `serde` feature), so a field KVM adds is carried without a
//! change here; each is read back only at exactly its size (`exact.rs`). The order of the ioctls is KVM's, not ours to choose: see
//! the comments on [`KvmVcpu::save_state`] and [`KvmVcpu::restore_state`].

use kvm_bindings::*;
use kvm_ioctls::Cap;
use serde::{Deserialize, Serialize};

use crate::exact;
use crate::{Error, Irqchip, KvmVcpu, Result, Vm};

/// The most MSRs one vCPU's state may carry (KVM's index list is ~100).
const MAX_MSRS: usize = 1024;

/// One vCPU as KVM holds it. The FPU and SSE state are the legacy area of
/// the XSAVE image.
#[derive(Serialize, Deserialize)]
pub struct VcpuSnapshot {
    /// The CPUID the guest saw (restored as it was, not recomputed).
    #[serde(with = "exact::many")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    #[serde(with = "exact::one")]
    pub mp_state: kvm_mp_state,
    #[serde(with = "exact::one")]
    pub regs: kvm_regs,
    #[serde(with = "exact::one")]
    pub sregs: kvm_sregs,
    #[serde(with = "exact::one")]
    pub xsave: kvm_xsave,
    #[serde(with = "exact::one")]
    pub xcrs: kvm_xcrs,
    #[serde(with = "exact::one")]
    pub debugregs: kvm_debugregs,
    /// With the in-kernel irqchip only.
    #[serde(with = "exact::maybe")]
    pub lapic: Option<kvm_lapic_state>,
    /// Every MSR of KVM's index list this vCPU could read.
    #[serde(with = "exact::many")]
    pub msrs: Vec<kvm_msr_entry>,
    #[serde(with = "exact::one")]
    pub events: kvm_vcpu_events,
    /// The guest TSC frequency, where KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// The VM-wide state KVM holds: the in-kernel PIC and IOAPIC, the PIT, and
/// the clock kvmclock reads.
#[derive(Serialize, Deserialize)]
pub struct VmSnapshot {
    /// PIC master, PIC slave, IOAPIC (kernel irqchip only).
    #[serde(with = "exact::many")]
    pub irqchips: Vec<kvm_irqchip>,
    #[serde(with = "exact::maybe")]
    pub pit: Option<kvm_pit_state2>,
    #[serde(with = "exact::one")]
    pub clock: kvm_clock_data,
    /// The host's wall clock (CLOCK_REALTIME, ns) at the save. A restore
    /// moves every guest clock on by the time since, together: kvmclock,
    /// the TSC and the PM timer. (A host that ignores TSC writes, PVM,
    /// lets the TSC run on from the host's anyway: the other clocks must
    /// follow it, or the guest sees them disagree by the time the VM
    /// spent saved.) 0 in older states: nothing moves on.
    #[serde(default)]
    pub saved_at_ns: u64,
}

/// The host's wall clock in ns (CLOCK_REALTIME: it means the same in
/// another process, or on another host with a synchronised clock).
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
}

/// IA32_TSC.
const MSR_IA32_TSC: u32 = 0x10;
/// The LAPIC timer's deadline, a TSC value: KVM arms it against the
/// TSC as it is when written.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Order saved MSRs for writing: the TSC first and the TSC deadline
/// last, whatever order KVM listed them in, so the deadline is armed
/// against the restored TSC (written after, against the old one, it
/// would fire at once or far too late). Others keep their order.
fn tsc_before_deadline(msrs: &mut [kvm_msr_entry]) {
    msrs.sort_by_key(|m| match m.index {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
}

/// The chips KVM_GET_IRQCHIP knows, in the order they are saved.
const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// The MTRRs, which KVM_GET_MSR_INDEX_LIST leaves out (QEMU saves them by
/// name): the default type, the fixed ranges, and KVM's 8 variable-range
/// pairs. One a vCPU cannot read is skipped like any other.
const MTRR_MSRS: [u32; 28] = [
    0x2ff, // IA32_MTRR_DEF_TYPE
    0x250, 0x258, 0x259, // fixed: 64K, 16K x 2
    0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f, // fixed: 4K x 8
    0x200, 0x201, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207, // variable base/mask
    0x208, 0x209, 0x20a, 0x20b, 0x20c, 0x20d, 0x20e, 0x20f,
];

impl Vm {
    /// The MSRs to save for a vCPU: KVM's list (KVM_GET_MSR_INDEX_LIST)
    /// and the MTRRs it leaves out.
    pub fn msr_index_list(&self) -> Result<Vec<u32>> {
        let list = self
            .kvm()
            .get_msr_index_list()
            .map_err(Error::sys("KVM_GET_MSR_INDEX_LIST"))?;
        let mut all = list.as_slice().to_vec();
        for m in MTRR_MSRS {
            if !all.contains(&m) {
                all.push(m);
            }
        }
        Ok(all)
    }

    /// Refuse what a 4 KiB `kvm_xsave` cannot hold (AMX tile state).
    pub fn check_xsave_fits(&self) -> Result<()> {
        let size = self.fd().check_extension_int(Cap::Xsave2);
        if size as usize > std::mem::size_of::<kvm_xsave>() {
            return Err(Error::Unavailable {
                what: "saving vCPU state",
                why:
                    "this host's XSAVE state is larger than 4 KiB (AMX), which brisk does not save",
            });
        }
        Ok(())
    }

    /// Save the irqchip, PIT and clock (every vCPU paused). Interrupts
    /// irqfds have in flight are delivered first, so the irqchip read
    /// holds every one a device pulled before the call.
    pub fn save_state(&self) -> Result<VmSnapshot> {
        let mut irqchips = Vec::new();
        let mut pit = None;
        if self.irqchip() == Irqchip::Kernel {
            self.flush_irqfds()?;
            for chip_id in CHIPS {
                let mut chip = kvm_irqchip {
                    chip_id,
                    ..Default::default()
                };
                self.fd()
                    .get_irqchip(&mut chip)
                    .map_err(Error::sys("KVM_GET_IRQCHIP"))?;
                irqchips.push(chip);
            }
            pit = Some(self.fd().get_pit2().map_err(Error::sys("KVM_GET_PIT2"))?);
        }
        let clock = self.fd().get_clock().map_err(Error::sys("KVM_GET_CLOCK"))?;
        Ok(VmSnapshot {
            irqchips,
            pit,
            clock,
            saved_at_ns: realtime_ns(),
        })
    }

    /// Put the VM-wide state back, before any vCPU is restored or runs.
    /// Returns how far the guest's clocks were moved on (the time since
    /// the save): the vCPUs' TSCs move on as far
    /// ([`KvmVcpu::restore_state`]).
    pub fn restore_state(&self, s: &VmSnapshot) -> Result<std::time::Duration> {
        let kernel = self.irqchip() == Irqchip::Kernel;
        if kernel != (s.irqchips.len() == CHIPS.len() && s.pit.is_some())
            || (!kernel && !s.irqchips.is_empty())
        {
            return Err(Error::State(
                "the saved irqchip state does not match the VM's irqchip mode".into(),
            ));
        }
        if let Some(pit) = &s.pit {
            self.fd()
                .set_pit2(pit)
                .map_err(Error::sys("KVM_SET_PIT2"))?;
        }
        for (chip, want) in s.irqchips.iter().zip(CHIPS) {
            if chip.chip_id != want {
                return Err(Error::State(format!(
                    "saved irqchip {} where chip {want} belongs",
                    chip.chip_id
                )));
            }
            self.fd()
                .set_irqchip(chip)
                .map_err(Error::sys("KVM_SET_IRQCHIP"))?;
        }
        // kvmclock moves on by the time since the save, as the TSC does:
        // by KVM itself where it can (KVM_CLOCK_REALTIME: it adds the
        // wall-clock time since `realtime` as it sets the clock), else
        // here.
        let advance = match s.saved_at_ns {
            0 => 0,
            at => realtime_ns().saturating_sub(at),
        };
        let clock = if s.saved_at_ns != 0 && self.adjusts_clock_by_realtime() {
            kvm_clock_data {
                clock: s.clock.clock,
                flags: kvm_bindings::KVM_CLOCK_REALTIME,
                realtime: s.saved_at_ns,
                ..Default::default()
            }
        } else {
            kvm_clock_data {
                clock: s.clock.clock.saturating_add(advance),
                ..Default::default()
            }
        };
        self.fd()
            .set_clock(&clock)
            .map_err(Error::sys("KVM_SET_CLOCK"))?;
        Ok(std::time::Duration::from_nanos(advance))
    }

    /// Whether KVM_SET_CLOCK takes KVM_CLOCK_REALTIME (KVM_CAP_ADJUST_CLOCK
    /// lists it; Linux 5.16 and later).
    fn adjusts_clock_by_realtime(&self) -> bool {
        let flags = self
            .fd()
            .check_extension_raw(kvm_bindings::KVM_CAP_ADJUST_CLOCK.into());
        flags > 0 && flags as u32 & kvm_bindings::KVM_CLOCK_REALTIME != 0
    }
}

/// HLT's opcode.
const HLT: u8 = 0xf4;

impl VcpuSnapshot {
    /// A vCPU stopped between STI and HLT (in the STI interrupt shadow,
    /// with `next`, the byte at CS:RIP, a HLT; asked only in the shadow)
    /// is recorded as having run the HLT: past it, halted, no shadow.
    /// That is what the HLT does:
    /// the shadow holds interrupts off until it has run, and one pending
    /// then wakes the vCPU after it. Saved as stopped, a host that does
    /// not honour a restored shadow (PVM: shown in docs/snapshot.md)
    /// would deliver the interrupt before the HLT, which then sleeps
    /// through the wake-up the handler made. Returns whether it did;
    /// without a LAPIC (brisk's own irqchip) the caller records the halt,
    /// which lives in user space.
    pub fn run_hlt_in_sti_shadow(&mut self, next: impl FnOnce(&Self) -> Option<u8>) -> bool {
        let shadowed = u32::from(self.events.interrupt.shadow) & KVM_X86_SHADOW_INT_STI != 0;
        if !shadowed || next(self) != Some(HLT) {
            return false;
        }
        self.regs.rip = self.regs.rip.wrapping_add(1);
        self.events.interrupt.shadow = 0;
        if self.lapic.is_some() {
            self.mp_state.mp_state = KVM_MP_STATE_HALTED;
        }
        true
    }
}

impl KvmVcpu {
    /// The byte at CS:RIP in `memory`, through the guest's page tables
    /// (KVM_TRANSLATE); `None` where it is not mapped.
    fn byte_at_rip(&self, s: &VcpuSnapshot, memory: &crate::GuestRam) -> Option<u8> {
        use vm_memory::Bytes;
        let linear = s.sregs.cs.base.wrapping_add(s.regs.rip);
        let t = self.fd().translate_gva(linear).ok()?;
        if t.valid == 0 {
            return None;
        }
        memory
            .read_obj::<u8>(vm_memory::GuestAddress(t.physical_address))
            .ok()
    }

    /// Save this vCPU (not running: parked, or never started). `msr_index`
    /// is [`Vm::msr_index_list`]; `memory`, the VM's RAM, is read for the
    /// instruction at RIP when the vCPU stopped in an STI shadow
    /// ([`VcpuSnapshot::run_hlt_in_sti_shadow`]: whether it did is
    /// returned too).
    ///
    /// KVM's order: KVM_GET_MP_STATE first (it accepts pending INIT/SIPI
    /// events, which change the LAPIC and registers), KVM_GET_VCPU_EVENTS
    /// last (reading MSRs and the LAPIC can raise events).
    pub fn save_state(
        &self,
        msr_index: &[u32],
        memory: &crate::GuestRam,
    ) -> Result<(VcpuSnapshot, bool)> {
        let fd = self.fd();
        let mp_state = fd.get_mp_state().map_err(Error::sys("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(Error::sys("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(Error::sys("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(Error::sys("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(Error::sys("KVM_GET_XCRS"))?;
        let debugregs = fd
            .get_debug_regs()
            .map_err(Error::sys("KVM_GET_DEBUGREGS"))?;
        let lapic = match self.has_lapic() {
            true => Some(fd.get_lapic().map_err(Error::sys("KVM_GET_LAPIC"))?),
            false => None,
        };
        let tsc_khz = fd.get_tsc_khz().ok();
        let msrs = self.read_msrs(msr_index)?;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::sys("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let events = fd
            .get_vcpu_events()
            .map_err(Error::sys("KVM_GET_VCPU_EVENTS"))?;
        let mut s = VcpuSnapshot {
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            events,
            tsc_khz,
        };
        let ran_hlt = s.run_hlt_in_sti_shadow(|s| self.byte_at_rip(s, memory));
        Ok((s, ran_hlt))
    }

    /// Every MSR of `index` KVM lets this vCPU read. KVM_GET_MSRS stops
    /// at the first it cannot read: skip that one and go on.
    fn read_msrs(&self, index: &[u32]) -> Result<Vec<kvm_msr_entry>> {
        let mut out = Vec::new();
        let mut rest = index;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(MAX_MSRS)];
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|_| Error::State("too many MSRs for one KVM_GET_MSRS".into()))?;
            let read = self
                .fd()
                .get_msrs(&mut msrs)
                .map_err(Error::sys("KVM_GET_MSRS"))?;
            out.extend_from_slice(&msrs.as_slice()[..read]);
            // All read: on to the next chunk; else entry `read` failed:
            // skip it.
            let skip = if read == chunk.len() { read } else { read + 1 };
            rest = &rest[skip..];
        }
        Ok(out)
    }

    /// Write saved MSRs. KVM_SET_MSRS stops at the first it refuses: one
    /// that already holds the saved value (some hosts refuse writes of
    /// PV MSRs they do not let the guest enable) is skipped; any other is
    /// an error naming it.
    fn write_msrs(&self, saved: &[kvm_msr_entry]) -> Result<()> {
        let mut rest = saved;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(MAX_MSRS)];
            let msrs = Msrs::from_entries(chunk)
                .map_err(|_| Error::State("too many MSRs for one KVM_SET_MSRS".into()))?;
            let written = self
                .fd()
                .set_msrs(&msrs)
                .map_err(Error::sys("KVM_SET_MSRS"))?;
            if written == chunk.len() {
                rest = &rest[written..];
                continue;
            }
            let refused = chunk[written];
            let now = self.read_msrs(&[refused.index])?;
            if now.first().map(|e| e.data) != Some(refused.data) {
                return Err(Error::State(format!(
                    "vCPU {}: KVM refused to set MSR {:#x} to {:#x}",
                    self.id(),
                    refused.index,
                    refused.data
                )));
            }
            rest = &rest[written + 1..];
        }
        Ok(())
    }

    /// Put a saved vCPU back (before its thread runs it). KVM's order:
    /// CPUID before anything that depends on it, registers and segments
    /// before the LAPIC (whose base is in the segment state), the LAPIC
    /// before MSRs (TSC deadline), events last.
    /// `advance`: how far the VM's clocks moved on ([`Vm::restore_state`]);
    /// the TSC moves on as far (written, then read back: a host that
    /// ignores the write, PVM, runs it on from its own, which moved on by
    /// about as much on the same host).
    pub fn restore_state(&mut self, s: &VcpuSnapshot, advance: std::time::Duration) -> Result<()> {
        if s.lapic.is_some() != self.has_lapic() {
            return Err(Error::State(format!(
                "vCPU {}: the saved LAPIC state does not match the VM's irqchip mode",
                self.id()
            )));
        }
        let cpuid = CpuId::from_entries(&s.cpuid)
            .map_err(|_| Error::State(format!("vCPU {}: too many CPUID entries", self.id())))?;
        let fd = self.fd();
        fd.set_cpuid2(&cpuid)
            .map_err(Error::sys("KVM_SET_CPUID2"))?;
        if let Some(khz) = s.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                fd.set_tsc_khz(khz).map_err(Error::sys("KVM_SET_TSC_KHZ"))?;
            }
        }
        fd.set_mp_state(s.mp_state)
            .map_err(Error::sys("KVM_SET_MP_STATE"))?;
        fd.set_regs(&s.regs).map_err(Error::sys("KVM_SET_REGS"))?;
        fd.set_sregs(&s.sregs)
            .map_err(Error::sys("KVM_SET_SREGS"))?;
        // SAFETY: KVM reads at most its XSAVE uabi size, which the VM
        // checked is within the 4 KiB of `kvm_xsave` (Vm::check_xsave_fits);
        // it validates the header itself and refuses a bad one (EINVAL).
        unsafe { fd.set_xsave(&s.xsave) }.map_err(Error::sys("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&s.xcrs).map_err(Error::sys("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&s.debugregs)
            .map_err(Error::sys("KVM_SET_DEBUGREGS"))?;
        if let Some(lapic) = &s.lapic {
            fd.set_lapic(lapic).map_err(Error::sys("KVM_SET_LAPIC"))?;
        }
        let khz = s.tsc_khz.or_else(|| self.fd().get_tsc_khz().ok());
        let ticks = khz.map_or(0, |khz| {
            (advance.as_nanos() * u128::from(khz) / 1_000_000).min(u128::from(u64::MAX)) as u64
        });
        let mut msrs = s.msrs.clone();
        let mut tsc_wanted = None;
        for m in msrs.iter_mut().filter(|m| m.index == MSR_IA32_TSC) {
            m.data = m.data.wrapping_add(ticks);
            tsc_wanted = Some(m.data);
        }
        tsc_before_deadline(&mut msrs);
        self.write_msrs(&msrs)?;
        if let (Some(wanted), Some(khz)) = (tsc_wanted, khz) {
            let got = self.read_msrs(&[MSR_IA32_TSC])?;
            let got = got.first().map_or(wanted, |m| m.data);
            // More than a second off: the write did not take.
            if got.abs_diff(wanted) > u64::from(khz) * 1000 {
                log::debug!(
                    "vCPU {}: the host ignores TSC writes (TSC {got:#x}, written {wanted:#x}); the guest's TSC runs on from the host's",
                    self.id()
                );
            }
        }
        let fd = self.fd();
        fd.set_vcpu_events(&s.events)
            .map_err(Error::sys("KVM_SET_VCPU_EVENTS"))?;
        // The run loop asks `if_flag` whether a pending interrupt wakes a
        // halted vCPU; KVM refreshes it on every exit, but a restored vCPU
        // has not exited yet: seed it from the restored RFLAGS.IF.
        self.seed_if_flag(s.regs.rflags & (1 << 9) != 0);
        if !advance.is_zero() {
            // The clocks jumped: tell a kvmclock guest it was stopped
            // (PVCLOCK_GUEST_STOPPED), so its watchdogs do not take the
            // time saved for a lock-up.
            self.clock_stopped();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KVM lists the deadline (0x6e0) after the TSC (0x10) today, but a
    /// saved list in any order is written TSC first, deadline last, the
    /// rest as they were (review: TSC_DEADLINE restored after the TSC,
    /// explicitly).
    #[test]
    fn the_tsc_is_written_before_the_deadline_armed_against_it() {
        let msr = |index| kvm_msr_entry {
            index,
            data: u64::from(index),
            ..Default::default()
        };
        let mut m = vec![
            msr(0x6e0),
            msr(0x174),
            msr(0x10),
            msr(0xc000_0080),
            msr(0x277),
        ];
        tsc_before_deadline(&mut m);
        let order: Vec<u32> = m.iter().map(|e| e.index).collect();
        assert_eq!(order, [0x10, 0x174, 0xc000_0080, 0x277, 0x6e0]);
        assert!(m.iter().all(|e| e.data == u64::from(e.index)));
    }

    fn snapshot() -> VcpuSnapshot {
        VcpuSnapshot {
            cpuid: vec![kvm_cpuid_entry2::default(); 2],
            mp_state: kvm_mp_state::default(),
            regs: kvm_regs {
                rip: 0x1234,
                ..Default::default()
            },
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic: Some(kvm_lapic_state::default()),
            msrs: vec![kvm_msr_entry::default()],
            events: kvm_vcpu_events::default(),
            tsc_khz: None,
        }
    }

    fn saved() -> serde_json::Value {
        serde_json::to_value(snapshot()).unwrap()
    }

    /// Only the STI shadow in front of a HLT counts as the HLT run; the
    /// MOV SS shadow, or another instruction, leave the state as read.
    #[test]
    fn only_a_hlt_in_the_sti_shadow_is_run_at_the_save() {
        let in_shadow = |shadow: u32| {
            let mut s = snapshot();
            s.events.interrupt.shadow = shadow as u8;
            s.mp_state.mp_state = KVM_MP_STATE_RUNNABLE;
            s
        };
        let mut s = in_shadow(KVM_X86_SHADOW_INT_STI);
        assert!(s.run_hlt_in_sti_shadow(|_| Some(HLT)));
        assert_eq!(s.regs.rip, 0x1235);
        assert_eq!(s.mp_state.mp_state, KVM_MP_STATE_HALTED);
        assert_eq!(s.events.interrupt.shadow, 0);
        for (shadow, next) in [
            (KVM_X86_SHADOW_INT_STI, Some(0x90)),
            (KVM_X86_SHADOW_INT_STI, None),
            (KVM_X86_SHADOW_INT_MOV_SS, Some(HLT)),
            (0, Some(HLT)),
        ] {
            let mut s = in_shadow(shadow);
            assert!(!s.run_hlt_in_sti_shadow(|_| next), "{shadow} {next:?}");
            assert_eq!(s.regs.rip, 0x1234);
            assert_eq!(s.mp_state.mp_state, KVM_MP_STATE_RUNNABLE);
            assert_eq!(u32::from(s.events.interrupt.shadow), shadow);
        }
    }

    #[test]
    fn kvm_structures_load_only_at_their_exact_size() {
        let good = saved();
        let back: VcpuSnapshot = serde_json::from_value(good.clone()).unwrap();
        assert_eq!(back.regs.rip, 0x1234);
        let shorten = |v: &mut serde_json::Value| {
            v.as_array_mut().unwrap().pop();
        };
        let lengthen = |v: &mut serde_json::Value| {
            v.as_array_mut().unwrap().push(0.into());
        };
        for (field, change) in [
            ("regs", &shorten as &dyn Fn(&mut serde_json::Value)),
            ("xsave", &lengthen),
            ("lapic", &shorten),
        ] {
            let mut bad = good.clone();
            change(&mut bad[field]);
            let e = serde_json::from_value::<VcpuSnapshot>(bad)
                .err()
                .expect(field);
            assert!(e.to_string().contains("this brisk's has"), "{field}: {e}");
        }
        let mut bad = good.clone();
        shorten(&mut bad["cpuid"][1]);
        assert!(serde_json::from_value::<VcpuSnapshot>(bad).is_err());
    }
}
