//! The console: brisk's stdin fed to the guest's UART (COM1), so a guest
//! can take input (with its receive interrupt, IRQ 4). One thread, which
//! waits in poll(2) on stdin and on a stop eventfd: it never blocks the
//! exit, and a full receive FIFO is retried as the guest drains it.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use brisk_vmm::seccomp::{self, Seccomp, ThreadKind};
use brisk_vmm::Vm;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The console thread; dropping it stops and joins it.
pub struct Console {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Console {
    /// Feed stdin to `vm`'s UART until EOF or the drop.
    pub fn start(vm: Arc<Vm>, policy: Seccomp) -> std::io::Result<Console> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_fd = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                if let Err(e) = seccomp::install(ThreadKind::Console, policy) {
                    log::error!("console thread: cannot install its seccomp filter: {e}");
                    return;
                }
                feed(&vm, &stop_fd);
            })?;
        Ok(Console {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// poll(2) on `fds` for `ms` (-1: no bound); the revents of each.
fn wait(fds: &mut [libc::pollfd], ms: i32) -> bool {
    // SAFETY: `fds` is a valid array of pollfd for the call.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) >= 0 }
}

fn feed(vm: &Vm, stop: &EventFd) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: 0,
                events: if pending.is_empty() { libc::POLLIN } else { 0 },
                revents: 0,
            },
        ];
        // With input waiting for room in the FIFO, look again in 10 ms.
        if !wait(&mut fds, if pending.is_empty() { -1 } else { 10 }) {
            continue; // EINTR
        }
        if fds[0].revents != 0 {
            return;
        }
        if pending.is_empty() && fds[1].revents != 0 {
            // SAFETY: reads at most buf.len() bytes into buf from stdin.
            let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
            match n {
                0 => return, // EOF: no more input
                n if n < 0 => {
                    if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                        return;
                    }
                }
                n => pending.extend_from_slice(&buf[..n as usize]),
            }
        }
        if !pending.is_empty() {
            let taken = vm.console_input(&pending);
            pending.drain(..taken);
        }
    }
}
