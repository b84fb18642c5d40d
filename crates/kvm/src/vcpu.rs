//! A KVM vCPU as the control plane's [`Guest`].

use std::mem::ManuallyDrop;
use std::ptr::addr_of_mut;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use brisk_control::{Classify, ExitKind, Guest, Interrupt};
use kvm_bindings::*;
use kvm_ioctls::VcpuFd;

use crate::kick::{self, SignalInterrupt};
use crate::{Error, InterruptController, Result, Startup};

vmm_sys_util::ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);

/// Why KVM_RUN returned, copied out of `kvm_run` (data stays there: see
/// [`KvmVcpu::io_data`] and [`KvmVcpu::mmio_data`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `in`: fill `io_data()` (`size * count` bytes).
    IoIn { port: u16, size: u8, count: u32 },
    /// `out`: `io_data()` holds `size * count` bytes.
    IoOut { port: u16, size: u8, count: u32 },
    /// MMIO read: fill `mmio_data()`.
    MmioRead { addr: u64, len: u32 },
    /// MMIO write: `mmio_data()` holds the bytes.
    MmioWrite { addr: u64, len: u32 },
    /// HLT with no in-kernel irqchip.
    Hlt,
    /// The guest can take an interrupt now (we asked with
    /// `request_interrupt_window`): the next entry injects it.
    IrqWindowOpen,
    /// RDMSR of an MSR KVM hands to user space (brisk's LAPIC): answer
    /// with [`KvmVcpu::answer_msr`].
    RdMsr { index: u32 },
    /// WRMSR likewise; [`KvmVcpu::answer_msr`] says whether it faults.
    WrMsr { index: u32, value: u64 },
    /// The guest lowered CR8 (its task priority) with no in-kernel LAPIC.
    SetTpr,
    /// Not an exit of KVM's: the vCPU waits for a start-up IPI (after
    /// INIT, or an AP at power-on) and must not run; a halt until woken.
    WaitForSipi,
    /// Triple fault or shutdown.
    Shutdown,
    /// KVM could not enter the guest (invalid state).
    FailEntry { reason: u64 },
    /// KVM failed internally; suberror 1 is an instruction it cannot emulate.
    InternalError { suberror: u32 },
    /// A system event (reset, shutdown, crash) raised by KVM.
    SystemEvent { kind: u32 },
    /// Any other `exit_reason`.
    Other { reason: u32 },
}

impl Classify for Exit {
    fn kind(&self) -> ExitKind {
        match self {
            Exit::IoIn { .. } | Exit::IoOut { .. } => ExitKind::Io,
            Exit::MmioRead { .. } | Exit::MmioWrite { .. } => ExitKind::Mmio,
            Exit::Hlt => ExitKind::Halt,
            Exit::Shutdown | Exit::SystemEvent { .. } => ExitKind::Shutdown,
            _ => ExitKind::Other,
        }
    }
}

/// One vCPU: its fd and our own pointer to its mapped `kvm_run`.
///
/// `VcpuFd::run` and `set_kvm_immediate_exit` take `&mut self`, so nothing
/// can set `immediate_exit` through that API while a run is in progress
/// (rust-vmm/kvm#373); the kick signal handler writes the byte through this
/// pointer instead. Every access to the mapping goes through a raw pointer
/// to the one field it needs (`addr_of_mut!`), never a reference to the
/// whole `kvm_run`, which the handler may be writing.
pub struct KvmVcpu {
    id: usize,
    /// Dropped by hand: kept (leaked) if a thread other than the dropping
    /// one may still point its kick handler at this mapping.
    fd: ManuallyDrop<VcpuFd>,
    run: *mut kvm_run,
    /// Bytes mapped at `run` (KVM_GET_VCPU_MMAP_SIZE).
    run_size: usize,
    /// The last exit, whose union member of `kvm_run` the data accessors
    /// may read; `None` after an interrupted entry or before any.
    last: Option<Exit>,
    /// The last exit was PIO, MMIO or an MSR access: the instruction
    /// completes on next entry.
    io_pending: bool,
    /// User irqchip mode: where the vectors to inject come from.
    interrupts: Option<Arc<dyn InterruptController>>,
    /// CR8 as last seen in `kvm_run` (user irqchip: the TPR's mirror).
    cr8: u8,
    /// The thread whose kick handler points at this mapping now, and
    /// whether a thread we left without unbinding ever did (then its
    /// handler may still point here).
    bound: Option<libc::pid_t>,
    bound_elsewhere: bool,
    /// The host's KVM has KVM_CAP_KVMCLOCK_CTRL.
    kvmclock_ctrl: bool,
    /// Parks a kvmclock guest was told about.
    clock_stops: u64,
    /// The VM has the in-kernel irqchip: this vCPU has a LAPIC.
    lapic: bool,
    /// The VM's dirty rings, collected here when this vCPU's fills.
    pub(crate) dirty_rings: Option<Arc<crate::dirty_ring::DirtyRings>>,
    /// Ring-full exits in a row that found nothing to collect.
    empty_full_exits: u32,
}

// SAFETY: `run` points into the mapping owned by `fd`, which moves with it;
// the pointer is dereferenced by the thread that owns the KvmVcpu and by
// the kick handler of the thread it was bound on, and `Drop` keeps the
// mapping alive when that thread is not the one dropping it.
unsafe impl Send for KvmVcpu {}

impl KvmVcpu {
    pub(crate) fn new(
        id: usize,
        mut fd: VcpuFd,
        run_size: usize,
        kvmclock_ctrl: bool,
        lapic: bool,
    ) -> Self {
        let run = fd.get_kvm_run() as *mut kvm_run;
        KvmVcpu {
            id,
            fd: ManuallyDrop::new(fd),
            run,
            run_size,
            last: None,
            io_pending: false,
            interrupts: None,
            cr8: 0,
            bound: None,
            bound_elsewhere: false,
            kvmclock_ctrl,
            clock_stops: 0,
            lapic,
            dirty_rings: None,
            empty_full_exits: 0,
        }
    }

    /// Whether this vCPU has an in-kernel LAPIC (kernel irqchip).
    pub fn has_lapic(&self) -> bool {
        self.lapic
    }

    /// Set `kvm_run.if_flag` as KVM would have on an exit with RFLAGS.IF
    /// = `on` (a restored vCPU that has not exited yet).
    pub(crate) fn seed_if_flag(&mut self, on: bool) {
        // SAFETY: a plain byte of the live mapping; KVM writes it only
        // during KVM_RUN, which this thread is not in.
        unsafe { addr_of_mut!((*self.run).if_flag).write(on as u8) }
    }

    /// Inject interrupts from `source` before entries (user irqchip only:
    /// with KVM's irqchip, interrupts go through its LAPIC instead).
    pub fn set_interrupts(&mut self, source: Arc<dyn InterruptController>) {
        self.interrupts = Some(source);
    }

    /// Whether the vCPU has something to take now: an interrupt pending
    /// while the guest had interrupts enabled at its last exit, or an NMI
    /// or start-up IPI. A HLT exit (or a wait for SIPI) in that state must
    /// not halt.
    pub fn interrupt_deliverable(&self) -> bool {
        // SAFETY: if_flag is a plain byte of the live mapping, written by
        // KVM only during KVM_RUN, which this thread is not in.
        let if_flag = unsafe { addr_of_mut!((*self.run).if_flag).read() };
        let Some(source) = &self.interrupts else {
            return false;
        };
        source.must_wake() || (if_flag != 0 && source.deliverable())
    }

    /// Before an entry: start at a SIPI's vector or stay waiting for one;
    /// inject a pending NMI, then the highest deliverable vector if KVM
    /// says the guest can take it, and ask for an interrupt-window exit
    /// while another is deliverable (or it could not take one). Returns
    /// false when the vCPU must not run (waiting for SIPI).
    fn prepare_injection(&mut self) -> Result<bool> {
        let Some(source) = self.interrupts.clone() else {
            return Ok(true);
        };
        match source.startup() {
            Startup::Run => {}
            Startup::WaitForSipi => return Ok(false),
            Startup::Sipi(vector) => self.start_at_sipi(vector)?,
        }
        if source.take_nmi() {
            self.fd.nmi().map_err(Error::sys("KVM_NMI"))?;
        }
        // SAFETY: plain bytes of the live mapping; KVM reads and writes
        // them only during KVM_RUN, which this thread is not in, and the
        // kick handler writes only `immediate_exit`.
        let (window, ready, cr8) = unsafe {
            (
                addr_of_mut!((*self.run).request_interrupt_window),
                addr_of_mut!((*self.run).ready_for_interrupt_injection).read(),
                addr_of_mut!((*self.run).cr8),
            )
        };
        // The TPR written through the APIC shows in CR8 (KVM loads CR8
        // from kvm_run on entry when it has no LAPIC).
        if let Some(tpr) = source.cr8().filter(|&t| t != self.cr8) {
            // SAFETY: as above.
            unsafe { cr8.write(u64::from(tpr)) };
            self.cr8 = tpr;
        }
        let ask = if !source.deliverable() {
            false
        } else if ready != 0 {
            if let Some(vector) = source.acknowledge() {
                let irq = kvm_interrupt {
                    irq: u32::from(vector),
                };
                // SAFETY: KVM_INTERRUPT on our vCPU fd reads one kvm_interrupt.
                let ret = unsafe {
                    vmm_sys_util::ioctl::ioctl_with_ref(&*self.fd, KVM_INTERRUPT(), &irq)
                };
                if ret < 0 {
                    return Err(Error::Sys {
                        what: "KVM_INTERRUPT",
                        err: vmm_sys_util::errno::Error::last(),
                    });
                }
            }
            // KVM takes one interrupt per entry; come back for the next.
            source.deliverable()
        } else {
            true
        };
        // SAFETY: as above.
        unsafe { window.write(ask as u8) };
        Ok(true)
    }

    /// After an exit: a CR8 the guest wrote becomes the TPR.
    fn sync_cr8(&mut self) {
        let Some(source) = self.interrupts.as_ref().filter(|s| s.cr8().is_some()) else {
            return;
        };
        // SAFETY: a plain field of the live mapping, written by KVM only
        // during KVM_RUN, which this thread is not in.
        let cr8 = unsafe { addr_of_mut!((*self.run).cr8).read() } as u8;
        if cr8 != self.cr8 {
            source.set_cr8(cr8);
            self.cr8 = cr8;
        }
    }

    /// Start this vCPU in real mode at `vector << 12`, as a start-up IPI
    /// does (SDM 8.4.4; the state of INIT, CS:IP = vector << 8 : 0).
    fn start_at_sipi(&mut self, vector: u8) -> Result<()> {
        let mut sregs = self.fd.get_sregs().map_err(Error::sys("KVM_GET_SREGS"))?;
        let segment = |selector: u16, code: bool| kvm_segment {
            base: u64::from(selector) << 4,
            limit: 0xffff,
            selector,
            type_: if code { 0xb } else { 0x3 },
            present: 1,
            s: 1,
            ..Default::default()
        };
        sregs.cs = segment(u16::from(vector) << 8, true);
        for seg in [
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.fs,
            &mut sregs.gs,
            &mut sregs.ss,
        ] {
            *seg = segment(0, false);
        }
        // Nothing KVM had queued before the INIT survives it.
        sregs.interrupt_bitmap = [0; 4];
        sregs.cr0 = 0x6000_0010;
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.efer = 0;
        sregs.gdt = kvm_dtable {
            limit: 0xffff,
            ..Default::default()
        };
        sregs.idt = kvm_dtable {
            limit: 0xffff,
            ..Default::default()
        };
        self.fd
            .set_sregs(&sregs)
            .map_err(Error::sys("KVM_SET_SREGS"))?;
        let regs = kvm_regs {
            rip: 0,
            rflags: 2,
            rdx: 0x600, // the processor's signature, as at reset
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(Error::sys("KVM_SET_REGS"))
    }

    /// The guest's TSC now and its frequency in kHz (for TSC-deadline
    /// writes); `None` where KVM cannot say.
    pub fn guest_tsc(&self) -> Option<(u64, u64)> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: 0x10, // IA32_TIME_STAMP_COUNTER
            ..Default::default()
        }])
        .ok()?;
        match self.fd.get_msrs(&mut msrs) {
            Ok(1) => {}
            _ => return None,
        }
        let khz = self.fd.get_tsc_khz().ok()?;
        Some((msrs.as_slice()[0].data, u64::from(khz)))
    }

    /// Tell KVM the guest's IA32_APIC_BASE (brisk's LAPIC owns it; KVM's
    /// copy decides CPUID's APIC bit). A failure only leaves that bit.
    pub fn mirror_apic_base(&self, value: u64) {
        let Ok(msrs) = Msrs::from_entries(&[kvm_msr_entry {
            index: 0x1b,
            data: value,
            ..Default::default()
        }]) else {
            return;
        };
        if let Err(e) = self.fd.set_msrs(&msrs) {
            log::debug!("vCPU {}: KVM kept its IA32_APIC_BASE: {e}", self.id);
        }
    }

    /// Answer the last MSR exit: `Some(value)` completes a RDMSR
    /// (ignored for WRMSR), `None` makes the access fault (#GP).
    pub fn answer_msr(&mut self, value: Option<u64>) {
        if !matches!(self.last, Some(Exit::RdMsr { .. } | Exit::WrMsr { .. })) {
            return;
        }
        // SAFETY: the last exit was an MSR exit, so the `msr` member is
        // the one KVM wrote; its fields are plain integers KVM reads on
        // the next entry, and this thread is not in KVM_RUN.
        unsafe {
            let m = addr_of_mut!((*self.run).__bindgen_anon_1.msr);
            addr_of_mut!((*m).error).write(u8::from(value.is_none()));
            if let Some(v) = value {
                addr_of_mut!((*m).data).write(v);
            }
        }
    }

    /// The vCPU index.
    pub fn id(&self) -> usize {
        self.id
    }

    /// The vCPU fd, for register access and other ioctls.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Whether this host's KVM lets a park be reported to kvmclock.
    pub fn can_stop_clock(&self) -> bool {
        self.kvmclock_ctrl
    }

    /// How many parks were reported to the guest's kvmclock
    /// (KVM_KVMCLOCK_CTRL succeeded: the guest has kvmclock enabled).
    pub fn clock_stops(&self) -> u64 {
        self.clock_stops
    }

    /// Whether the last exit left a PIO/MMIO access or an MSR access
    /// half-done (it completes on the next entry or `settle`).
    pub fn io_pending(&self) -> bool {
        self.io_pending
    }

    fn immediate_exit(&self) -> *const AtomicU8 {
        // SAFETY: in-bounds field of the live mapping; only its address is taken.
        unsafe { std::ptr::addr_of!((*self.run).immediate_exit) as *const AtomicU8 }
    }

    /// The data of the last PIO exit (`size * count` bytes in `kvm_run`);
    /// empty unless the last exit was PIO.
    pub fn io_data(&mut self) -> &mut [u8] {
        if !matches!(self.last, Some(Exit::IoIn { .. } | Exit::IoOut { .. })) {
            return &mut [];
        }
        // SAFETY: the last exit was KVM_EXIT_IO, so the `io` union member is
        // the one KVM wrote; it is a plain copy of a few integers.
        let io = unsafe { addr_of_mut!((*self.run).__bindgen_anon_1.io).read() };
        let (offset, len) = (
            io.data_offset as usize,
            io.size as usize * io.count as usize,
        );
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.run_size)
        {
            return &mut [];
        }
        // SAFETY: `offset + len` lies inside the `run_size` bytes mapped at
        // `run` (checked above), where KVM placed the PIO data; the handler
        // never writes there, and `&mut self` keeps it unaliased.
        unsafe { std::slice::from_raw_parts_mut((self.run as *mut u8).add(offset), len) }
    }

    /// The data of the last MMIO exit (at most 8 bytes); empty unless the
    /// last exit was MMIO.
    pub fn mmio_data(&mut self) -> &mut [u8] {
        if !matches!(
            self.last,
            Some(Exit::MmioRead { .. } | Exit::MmioWrite { .. })
        ) {
            return &mut [];
        }
        // SAFETY: the last exit was KVM_EXIT_MMIO, so the `mmio` member is
        // valid; `data` is an 8-byte array inside the mapping, which the
        // handler never writes, and `&mut self` keeps it unaliased.
        unsafe {
            let mmio = addr_of_mut!((*self.run).__bindgen_anon_1.mmio);
            let len = ((*mmio).len as usize).min(8);
            std::slice::from_raw_parts_mut(addr_of_mut!((*mmio).data) as *mut u8, len)
        }
    }

    /// The last KVM_RUN stopped because this vCPU's dirty ring is full.
    fn ring_full(&self) -> bool {
        // SAFETY: KVM_RUN returned 0: exit_reason is valid, read by value.
        let reason = unsafe { addr_of_mut!((*self.run).exit_reason).read() };
        reason == kvm_bindings::KVM_EXIT_DIRTY_RING_FULL
    }

    fn read_exit(&self) -> Exit {
        // SAFETY: KVM_RUN returned 0, so exit_reason and the union member it
        // names are valid; each is read by value through a raw pointer.
        unsafe {
            let run = self.run;
            let u = addr_of_mut!((*run).__bindgen_anon_1);
            match addr_of_mut!((*run).exit_reason).read() {
                KVM_EXIT_IO => {
                    let io = (*u).io;
                    let (port, size, count) = (io.port, io.size, io.count);
                    if u32::from(io.direction) == KVM_EXIT_IO_IN {
                        Exit::IoIn { port, size, count }
                    } else {
                        Exit::IoOut { port, size, count }
                    }
                }
                KVM_EXIT_MMIO => {
                    let m = (*u).mmio;
                    if m.is_write != 0 {
                        Exit::MmioWrite {
                            addr: m.phys_addr,
                            len: m.len,
                        }
                    } else {
                        Exit::MmioRead {
                            addr: m.phys_addr,
                            len: m.len,
                        }
                    }
                }
                KVM_EXIT_HLT => Exit::Hlt,
                KVM_EXIT_IRQ_WINDOW_OPEN => Exit::IrqWindowOpen,
                KVM_EXIT_X86_RDMSR => Exit::RdMsr {
                    index: (*u).msr.index,
                },
                KVM_EXIT_X86_WRMSR => Exit::WrMsr {
                    index: (*u).msr.index,
                    value: (*u).msr.data,
                },
                KVM_EXIT_SET_TPR => Exit::SetTpr,
                KVM_EXIT_SHUTDOWN => Exit::Shutdown,
                KVM_EXIT_FAIL_ENTRY => Exit::FailEntry {
                    reason: (*u).fail_entry.hardware_entry_failure_reason,
                },
                KVM_EXIT_INTERNAL_ERROR => Exit::InternalError {
                    suberror: (*u).internal.suberror,
                },
                KVM_EXIT_SYSTEM_EVENT => Exit::SystemEvent {
                    kind: (*u).system_event.type_,
                },
                reason => Exit::Other { reason },
            }
        }
    }

    /// One KVM_RUN. `Ok(None)` when it returned EINTR (kick or immediate_exit).
    fn run_once(&mut self) -> Result<Option<Exit>> {
        self.last = None;
        // The exit is read from `kvm_run` (`read_exit`), not from what
        // kvm-ioctls decoded.
        let ran = self.fd.run().map(drop);
        match ran {
            Ok(()) if self.dirty_rings.is_some() && self.ring_full() => {
                // Collected, the vCPU may run again: an entry like one a
                // kick interrupted (nothing for the exit handlers).
                if let Some(rings) = &self.dirty_rings {
                    self.empty_full_exits = rings.collect_full(self.empty_full_exits)?;
                }
                self.io_pending = false;
                Ok(None)
            }
            Ok(()) => {
                let exit = self.read_exit();
                // KVM finishes these instructions on the next KVM_RUN
                // (with what brisk answered): a WRMSR to the ICR saved
                // before that would be sent again by the restored vCPU.
                self.io_pending = matches!(exit.kind(), ExitKind::Io | ExitKind::Mmio)
                    || matches!(exit, Exit::RdMsr { .. } | Exit::WrMsr { .. });
                self.last = Some(exit);
                Ok(Some(exit))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // KVM completes pending PIO/MMIO before it honours
                // immediate_exit or a signal.
                self.io_pending = false;
                Ok(None)
            }
            Err(e) => Err(Error::Sys {
                what: "KVM_RUN",
                err: e,
            }),
        }
    }
}

impl Guest for KvmVcpu {
    type Exit = Exit;
    type Error = Error;

    fn bind_thread(&mut self) -> Box<dyn Interrupt> {
        let me = SignalInterrupt::current_thread();
        if self.bound.is_some_and(|tid| tid != me.tid()) {
            self.bound_elsewhere = true;
        }
        self.bound = Some(me.tid());
        kick::bind_thread(self.immediate_exit());
        Box::new(me)
    }

    fn unbind_thread(&mut self) {
        if kick::is_bound_to(self.immediate_exit()) {
            kick::bind_thread(std::ptr::null());
            self.bound = None;
        }
    }

    fn set_immediate_exit(&mut self, on: bool) {
        // SAFETY: see `immediate_exit`; the byte is shared with this
        // thread's signal handler and the kernel, hence the atomic store.
        // Relaxed is enough: both run on this thread, so program order
        // orders it (and the SeqCst mode store that follows keeps the
        // compiler from sinking it past that).
        unsafe { (*self.immediate_exit()).store(on as u8, Ordering::Relaxed) }
    }

    fn enter(&mut self) -> Result<Option<Exit>> {
        if !self.prepare_injection()? {
            self.last = None;
            return Ok(Some(Exit::WaitForSipi));
        }
        let exit = self.run_once();
        self.sync_cr8();
        exit
    }

    fn settle(&mut self) -> Result<Option<Exit>> {
        if !self.io_pending {
            return Ok(None);
        }
        // Re-enter with immediate_exit set: KVM finishes the PIO/MMIO
        // instruction, then returns EINTR without running guest code, or
        // exits again for the next fragment of the same access (an MMIO
        // access wider than 8 bytes or crossing a page), which the caller
        // serves before settling again.
        self.set_immediate_exit(true);
        let r = self.run_once();
        self.set_immediate_exit(false);
        r
    }

    fn interrupt_deliverable(&self) -> bool {
        KvmVcpu::interrupt_deliverable(self)
    }

    fn parking(&mut self) {
        self.clock_stopped();
    }
}

impl KvmVcpu {
    /// Set PVCLOCK_GUEST_STOPPED for the guest's next kvmclock update, so
    /// its watchdogs do not take a pause (or a restore's jump) for a
    /// lock-up. EINVAL: the guest has not enabled kvmclock, nothing to
    /// tell.
    pub(crate) fn clock_stopped(&mut self) {
        if !self.kvmclock_ctrl {
            return;
        }
        match self.fd.kvmclock_ctrl() {
            Ok(()) => self.clock_stops += 1,
            Err(e) if e.errno() == libc::EINVAL => {}
            Err(e) => log::warn!("vCPU {}: KVM_KVMCLOCK_CTRL failed: {e}", self.id),
        }
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        let here = SignalInterrupt::current_thread().tid();
        if self.bound_elsewhere || self.bound.is_some_and(|tid| tid != here) {
            // Another thread's kick handler may still point into this
            // mapping: keep it (and its fd) for the life of the process
            // rather than let a late kick write to unmapped memory.
            log::warn!(
                "vCPU {} dropped away from the thread it was bound to: its kvm_run mapping is kept",
                self.id
            );
            return;
        }
        // The mapping goes away with `fd`: detach the handler first.
        if kick::is_bound_to(self.immediate_exit()) {
            kick::bind_thread(std::ptr::null());
        }
        // SAFETY: dropped once, here; nothing uses `fd` or `run` after.
        unsafe { ManuallyDrop::drop(&mut self.fd) };
    }
}
