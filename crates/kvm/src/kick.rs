//! The kick signal: a real-time signal whose handler only sets the current
//! thread's `kvm_run.immediate_exit`.
//!
//! The handler finds the flag through a const-initialised thread-local
//! pointer: no lazy initialisation or destructor runs in the handler, and a
//! thread that is not a vCPU (or no longer one) has a null pointer, so a
//! stray signal does nothing (cf. firecracker#2570).

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use brisk_control::Interrupt;
use libc::{c_int, c_void, pid_t, siginfo_t};

use crate::{Error, Result};

thread_local! {
    static IMMEDIATE_EXIT: Cell<*const AtomicU8> = const { Cell::new(ptr::null()) };
}

/// The signal brisk kicks vCPU threads with.
pub fn kick_signal() -> c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

extern "C" fn on_kick(_num: c_int, _info: *mut siginfo_t, _ctx: *mut c_void) {
    let flag = IMMEDIATE_EXIT.with(|c| c.get());
    if !flag.is_null() {
        // SAFETY: the pointer is set by `bind_thread` on this very thread to
        // the `immediate_exit` byte of this thread's mapped `kvm_run`, and
        // cleared on this thread before that mapping goes away.
        unsafe { (*flag).store(1, Ordering::SeqCst) };
    }
}

/// Install the handler once per process.
pub(crate) fn install_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
                .map_err(|e| e.errno())
        })
        .map_err(|errno| Error::Sys {
            what: "installing the kick signal handler",
            err: vmm_sys_util::errno::Error::new(errno),
        })
}

/// Point this thread's handler at `flag` (null to detach).
pub(crate) fn bind_thread(flag: *const AtomicU8) {
    IMMEDIATE_EXIT.with(|c| c.set(flag));
    // The handler runs on this thread: keep the compiler from moving the
    // store past later accesses of the mapping.
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
}

/// Whether this thread's handler points at `flag`.
pub(crate) fn is_bound_to(flag: *const AtomicU8) -> bool {
    IMMEDIATE_EXIT.with(|c| c.get() == flag)
}

/// Kicks one thread with [`kick_signal`].
///
/// It addresses the thread by kernel tid with `tgkill`, not by `pthread_t`:
/// signalling a `pthread_t` whose thread has exited is undefined behaviour,
/// while a stale tid fails with ESRCH or, if reused inside this process,
/// reaches a thread whose handler pointer is null.
#[derive(Debug)]
pub struct SignalInterrupt {
    pid: pid_t,
    tid: pid_t,
}

impl SignalInterrupt {
    /// An interrupt for the calling thread.
    pub fn current_thread() -> Self {
        // SAFETY: getpid and gettid have no preconditions.
        let (pid, tid) = unsafe { (libc::getpid(), libc::gettid()) };
        SignalInterrupt { pid, tid }
    }
}

impl Interrupt for SignalInterrupt {
    fn interrupt(&self) {
        // SAFETY: tgkill with valid signal number; failure (ESRCH: thread
        // gone) needs no handling, there is then nothing to interrupt.
        unsafe {
            libc::syscall(libc::SYS_tgkill, self.pid, self.tid, kick_signal());
        }
    }
}
