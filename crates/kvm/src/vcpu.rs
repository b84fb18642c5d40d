//! A KVM vCPU as the control plane's [`Guest`].

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use brisk_control::{Classify, ExitKind, Guest, Interrupt};
use kvm_bindings::*;
use kvm_ioctls::VcpuFd;

use crate::kick::{self, SignalInterrupt};
use crate::{Error, PendingInterrupts, Result};

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
/// pointer instead.
pub struct KvmVcpu {
    id: usize,
    fd: VcpuFd,
    run: *mut kvm_run,
    /// The last exit was PIO/MMIO: the instruction completes on next entry.
    io_pending: bool,
    /// User irqchip mode: the vectors to inject.
    interrupts: Option<Arc<PendingInterrupts>>,
}

// SAFETY: `run` points into the mapping owned by `fd`, which moves with it;
// the pointer is only dereferenced by the thread that owns the KvmVcpu (and
// that thread's signal handler).
unsafe impl Send for KvmVcpu {}

impl KvmVcpu {
    pub(crate) fn new(id: usize, mut fd: VcpuFd) -> Self {
        let run = fd.get_kvm_run() as *mut kvm_run;
        KvmVcpu {
            id,
            fd,
            run,
            io_pending: false,
            interrupts: None,
        }
    }

    /// Inject interrupts from `pending` before entries (user irqchip only:
    /// with KVM's irqchip, interrupts go through its LAPIC instead).
    pub fn set_interrupts(&mut self, pending: Arc<PendingInterrupts>) {
        self.interrupts = Some(pending);
    }

    /// Whether a pending interrupt would be taken now: something is pending
    /// and the guest had interrupts enabled at its last exit. A HLT exit in
    /// that state must not halt.
    pub fn interrupt_deliverable(&self) -> bool {
        // SAFETY: if_flag is a plain byte of the live mapping, written by
        // KVM only during KVM_RUN, which this thread is not in.
        let if_flag = unsafe { (*self.run).if_flag };
        if_flag != 0 && self.interrupts.as_ref().is_some_and(|p| p.any())
    }

    /// Before an entry: inject the highest pending vector if KVM says the
    /// guest can take it, and ask for an interrupt-window exit while more
    /// are pending (or it could not take one).
    fn prepare_injection(&mut self) -> Result<()> {
        let Some(pending) = &self.interrupts else {
            return Ok(());
        };
        // SAFETY: plain bytes of the live mapping; KVM reads and writes
        // them only during KVM_RUN, which this thread is not in.
        let run = unsafe { &mut *self.run };
        if !pending.any() {
            run.request_interrupt_window = 0;
            return Ok(());
        }
        if run.ready_for_interrupt_injection != 0 {
            if let Some(vector) = pending.take_highest() {
                let irq = kvm_interrupt {
                    irq: u32::from(vector),
                };
                // SAFETY: KVM_INTERRUPT on our vCPU fd reads one kvm_interrupt.
                let ret =
                    unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.fd, KVM_INTERRUPT(), &irq) };
                if ret < 0 {
                    return Err(Error::Sys {
                        what: "KVM_INTERRUPT",
                        err: vmm_sys_util::errno::Error::last(),
                    });
                }
            }
            // KVM takes one interrupt per entry; come back for the next.
            run.request_interrupt_window = pending.any() as u8;
        } else {
            run.request_interrupt_window = 1;
        }
        Ok(())
    }

    /// The vCPU index.
    pub fn id(&self) -> usize {
        self.id
    }

    /// The vCPU fd, for register access and other ioctls.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn immediate_exit(&self) -> *const AtomicU8 {
        // SAFETY: in-bounds field of the live mapping; only its address is taken.
        unsafe { std::ptr::addr_of!((*self.run).immediate_exit) as *const AtomicU8 }
    }

    /// The data of the last PIO exit (`size * count` bytes in `kvm_run`).
    pub fn io_data(&mut self) -> &mut [u8] {
        // SAFETY: after a KVM_EXIT_IO the kernel placed `size * count` bytes
        // at `data_offset` inside the mapping; `&mut self` keeps it unaliased.
        unsafe {
            let io = (*self.run).__bindgen_anon_1.io;
            let len = io.size as usize * io.count as usize;
            let base = (self.run as *mut u8).add(io.data_offset as usize);
            std::slice::from_raw_parts_mut(base, len)
        }
    }

    /// The data of the last MMIO exit.
    pub fn mmio_data(&mut self) -> &mut [u8] {
        // SAFETY: after KVM_EXIT_MMIO the mmio union member is valid; len <= 8.
        unsafe {
            let mmio = &mut (*self.run).__bindgen_anon_1.mmio;
            let len = (mmio.len as usize).min(mmio.data.len());
            &mut mmio.data[..len]
        }
    }

    fn read_exit(&self) -> Exit {
        // SAFETY: KVM_RUN returned 0, so exit_reason and the union member it
        // names are valid.
        unsafe {
            let run = &*self.run;
            match run.exit_reason {
                KVM_EXIT_IO => {
                    let io = run.__bindgen_anon_1.io;
                    let (port, size, count) = (io.port, io.size, io.count);
                    if u32::from(io.direction) == KVM_EXIT_IO_IN {
                        Exit::IoIn { port, size, count }
                    } else {
                        Exit::IoOut { port, size, count }
                    }
                }
                KVM_EXIT_MMIO => {
                    let m = run.__bindgen_anon_1.mmio;
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
                KVM_EXIT_SHUTDOWN => Exit::Shutdown,
                KVM_EXIT_FAIL_ENTRY => Exit::FailEntry {
                    reason: run
                        .__bindgen_anon_1
                        .fail_entry
                        .hardware_entry_failure_reason,
                },
                KVM_EXIT_INTERNAL_ERROR => Exit::InternalError {
                    suberror: run.__bindgen_anon_1.internal.suberror,
                },
                KVM_EXIT_SYSTEM_EVENT => Exit::SystemEvent {
                    kind: run.__bindgen_anon_1.system_event.type_,
                },
                reason => Exit::Other { reason },
            }
        }
    }

    /// One KVM_RUN. `Ok(None)` when it returned EINTR (kick or immediate_exit).
    fn run_once(&mut self) -> Result<Option<Exit>> {
        match self.fd.run() {
            Ok(_) => {
                let exit = self.read_exit();
                self.io_pending = matches!(exit.kind(), ExitKind::Io | ExitKind::Mmio);
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
        kick::bind_thread(self.immediate_exit());
        Box::new(SignalInterrupt::current_thread())
    }

    fn set_immediate_exit(&mut self, on: bool) {
        // SAFETY: see `immediate_exit`; the byte is shared with the signal
        // handler and the kernel, hence the atomic store.
        unsafe { (*self.immediate_exit()).store(on as u8, Ordering::SeqCst) }
    }

    fn enter(&mut self) -> Result<Option<Exit>> {
        self.prepare_injection()?;
        self.run_once()
    }

    fn settle(&mut self) -> Result<()> {
        if self.io_pending {
            // Re-enter with immediate_exit set: KVM finishes the PIO/MMIO
            // instruction, then returns EINTR without running guest code.
            self.set_immediate_exit(true);
            let r = self.run_once();
            self.set_immediate_exit(false);
            if r?.is_some() {
                return Err(Error::Sys {
                    what: "completing a PIO/MMIO access (KVM ran the guest despite immediate_exit)",
                    err: vmm_sys_util::errno::Error::new(libc::EIO),
                });
            }
        }
        Ok(())
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        // The mapping goes away with `fd`: detach the handler first.
        if kick::is_bound_to(self.immediate_exit()) {
            kick::bind_thread(std::ptr::null());
        }
    }
}
