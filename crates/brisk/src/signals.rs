//! SIGINT/SIGTERM: turn them into a readable eventfd the main thread polls,
//! so Ctrl-C stops the vCPUs and exits cleanly.

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
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, on_signal)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(event.as_raw_fd())
}

/// The last signal received (0 if none).
pub fn last() -> i32 {
    LAST.load(Ordering::SeqCst)
}
