//! SIGINT, SIGTERM, SIGHUP and SIGQUIT: turn them into a readable eventfd
//! the main thread polls, so Ctrl-C, `kill` or a hung-up terminal stop the
//! vCPUs and exit cleanly (socket removed). Each handler is one-shot
//! (SA_RESETHAND): a second signal of the same kind takes its default
//! action and ends brisk at once, whatever it is waiting for.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

static FD: AtomicI32 = AtomicI32::new(-1);
static LAST: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(num: c_int, _info: *mut siginfo_t, _ctx: *mut c_void) {
    LAST.store(num, Ordering::SeqCst);
    let fd = FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; fd is a live eventfd kept
        // open for the process's lifetime by `install`.
        unsafe { libc::write(fd, &one as *const u64 as *const c_void, 8) };
    }
}

/// Install the handlers; returns the fd that becomes readable on a signal.
pub fn install() -> std::io::Result<RawFd> {
    static EVENT: OnceLock<EventFd> = OnceLock::new();
    let event = match EVENT.get() {
        Some(e) => e,
        None => {
            let e = EventFd::new(EFD_NONBLOCK)?;
            EVENT.get_or_init(|| e)
        }
    };
    FD.store(event.as_raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: a zeroed sigaction is valid to start from; the handler is
        // an `extern "C"` fn of the SA_SIGINFO signature that only stores
        // an atomic and calls write(2), both async-signal-safe.
        let r = unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_RESETHAND;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(event.as_raw_fd())
}

/// The last signal received (0 if none).
pub fn last() -> i32 {
    LAST.load(Ordering::SeqCst)
}
