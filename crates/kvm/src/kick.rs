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
    /// This thread has unblocked the kick signal (once is enough: an M:N
    /// pool thread binds a vCPU at every stretch).
    static UNBLOCKED: Cell<bool> = const { Cell::new(false) };
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

/// Install the handler once per process, with `SA_RESTART`: a kick that
/// reaches a thread outside KVM_RUN (a late signal) does not turn its
/// blocking system calls into EINTR. KVM_RUN itself returns EINTR for a
/// signal whatever the flags.
pub(crate) fn install_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            // SAFETY: a zeroed sigaction is a valid starting value; the
            // handler is an `extern "C"` fn of the SA_SIGINFO signature
            // that only does an atomic store (async-signal-safe).
            unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_kick as *const () as usize;
                act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
                libc::sigemptyset(&mut act.sa_mask);
                if libc::sigaction(kick_signal(), &act, std::ptr::null_mut()) != 0 {
                    return Err(*libc::__errno_location());
                }
            }
            Ok(())
        })
        .map_err(|errno| Error::Sys {
            what: "installing the kick signal handler",
            err: vmm_sys_util::errno::Error::new(errno),
        })
}

/// Point this thread's handler at `flag` (null to detach), and make sure
/// the thread can receive the kick: it may have inherited a mask that
/// blocks it (an embedding application's), and a blocked kick is lost.
pub(crate) fn bind_thread(flag: *const AtomicU8) {
    IMMEDIATE_EXIT.with(|c| c.set(flag));
    // The handler runs on this thread: keep the compiler from moving the
    // store past later accesses of the mapping.
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
    if !flag.is_null() && !UNBLOCKED.with(|u| u.replace(true)) {
        // SAFETY: a signal set on the stack, filled by sigemptyset; the
        // mask change applies to this thread only.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, kick_signal());
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    }
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

    /// The kernel thread id it signals.
    pub fn tid(&self) -> pid_t {
        self.tid
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
