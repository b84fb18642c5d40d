//! Per-thread seccomp-bpf filters (rust-vmm's `seccompiler`): each of
//! brisk's threads may make only the system calls it is known to make.
//! A vCPU thread that a guest or a device bug turned into a foothold cannot
//! open a file, a socket or a process.
//!
//! The lists were taken from `strace -f` of brisk running every built-in
//! guest, the API (including hostile clients) and the multiboot kernels;
//! docs/seccomp.md gives them with the reason for each call. A filter is
//! installed by the thread itself, once its set-up is done (opening
//! `/dev/kvm`, creating the VM and the API socket happen before).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a filter does with a system call not on its list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Seccomp {
    /// No filter (debugging; `--seccomp off`).
    #[default]
    Off,
    /// Allow it, and have the kernel log it (`--seccomp log`).
    Log,
    /// Stop brisk: the call traps, brisk names it on stderr and exits with
    /// status 12 (`brisk run`'s default).
    Trap,
    /// Fail it with this errno (tests: shows the filter without ending the
    /// process).
    Errno(u32),
}

/// The kinds of thread brisk runs, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU: KVM_RUN and the exit handlers (devices, guest output).
    Vcpu,
    /// The user-irqchip timer thread: waits and raises interrupts.
    Timer,
    /// The API thread: a tokio runtime serving the socket.
    Api,
    /// The main thread once the VM runs: waits for its end, then tears
    /// it down.
    Main,
    /// `brisk run`'s console: reads stdin into the guest's UART.
    Console,
    /// The I/O engine: waits on queue notifiers and TAPs, serves virtio
    /// requests (disk images, TAP frames).
    Io,
}

/// Every thread: memory, futexes, time, signals, leaving.
const COMMON: &[i64] = &[
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_mprotect,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_rt_sigreturn,
    // A timed wait a signal interrupted resumes through it (SA_RESTART).
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    // Kicks (a device raising an interrupt, a controller kicking a vCPU).
    libc::SYS_tgkill,
    // Output, logs, eventfds (vCPU state, the end latch, tokio's waker).
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_read,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_prctl,
];

/// Allowed only with these first-two-argument values: debug builds of std
/// check that an fd is open (`fcntl(fd, F_GETFD)`) before closing it.
const FCNTL_GETFD: i64 = libc::SYS_fcntl;

fn list(kind: ThreadKind) -> Vec<i64> {
    let own: &[i64] = match kind {
        // KVM_RUN, KVM_INTERRUPT, register access in run_on closures,
        // KVM_KVMCLOCK_CTRL; poll for nothing. virtio-blk requests are
        // served on the vCPU thread: pread/pwrite on the image, fdatasync
        // for a flush.
        ThreadKind::Vcpu => &[
            libc::SYS_ioctl,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_fdatasync,
        ],
        ThreadKind::Timer => &[],
        // epoll on the ioeventfds and TAPs; pread/pwrite/fdatasync on
        // disk images; frames are read and written with read/write. The
        // vsock: its own epoll (wait, ctl), accepting host clients,
        // connecting to host listeners (socket, connect, fcntl for
        // non-blocking), the streams' data.
        ThreadKind::Io => &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_fdatasync,
            libc::SYS_accept4,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_ioctl,
            libc::SYS_fcntl,
            // std's Unix streams: send(MSG_NOSIGNAL) and recv.
            libc::SYS_sendto,
            libc::SYS_recvfrom,
        ],
        ThreadKind::Console => &[libc::SYS_poll, libc::SYS_ppoll],
        ThreadKind::Api => &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_accept4,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
            libc::SYS_fcntl,
            libc::SYS_ioctl,
            // Snapshots (run on a worker the API thread spawns): create
            // the directory and the two files, read /proc/self/pagemap,
            // write the pages, rename the files into place.
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_openat,
            libc::SYS_mkdir,
            libc::SYS_mkdirat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_fstat,
            libc::SYS_lseek,
            libc::SYS_ftruncate,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_rename,
            libc::SYS_renameat,
            libc::SYS_renameat2,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            // ... a live snapshot makes a page that became zero a hole
            // again (fallocate PUNCH_HOLE) ...
            libc::SYS_fallocate,
            // ... durably: each file's data and the directory synced
            // before the state names them (and a migration flushes the
            // disk images before its Commit).
            libc::SYS_fdatasync,
            libc::SYS_fsync,
            // ... and list the directory for temporary files a killed
            // brisk left there; tell a kernel file system from a real one.
            libc::SYS_getdents64,
            libc::SYS_statfs,
            // Migrations (on a thread the API thread spawns): connect to
            // the destination (non-blocking, waited for with poll), set
            // the stream's options.
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_setsockopt,
            libc::SYS_poll,
        ],
        ThreadKind::Main => &[
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_ioctl,
            // Removing the API socket and its lock file.
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_fstat,
            libc::SYS_lstat,
            libc::SYS_flock,
            libc::SYS_kill,
            libc::SYS_rt_sigaction,
        ],
    };
    COMMON.iter().chain(own).copied().collect()
}

/// The filter for `kind` under `policy`.
pub fn filter(kind: ThreadKind, policy: Seccomp) -> Option<BpfProgram> {
    let mismatch = match policy {
        Seccomp::Off => return None,
        Seccomp::Log => SeccompAction::Log,
        Seccomp::Trap => SeccompAction::Trap,
        Seccomp::Errno(e) => SeccompAction::Errno(e),
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        list(kind).into_iter().map(|s| (s, Vec::new())).collect();
    // An unconditional entry (the API thread's fcntl) stays unconditional.
    rules.entry(FCNTL_GETFD).or_insert_with(|| {
        let cond = SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::F_GETFD as u64,
        )
        .expect("a valid condition");
        vec![SeccompRule::new(vec![cond]).expect("a valid rule")]
    });
    let f = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .expect("the built-in lists are valid");
    Some(f.try_into().expect("the built-in lists compile"))
}

/// Install `kind`'s filter on the calling thread.
pub fn install(kind: ThreadKind, policy: Seccomp) -> Result<(), seccompiler::Error> {
    let Some(prog) = filter(kind, policy) else {
        return Ok(());
    };
    if policy == Seccomp::Trap {
        install_sigsys_handler();
    }
    keep_thread_heaps();
    seccompiler::apply_filter(&prog)
}

/// glibc reads /proc/sys/vm/overcommit_memory the first time it gives
/// back the top of a thread's heap, and a filtered thread may not open
/// files (the I/O thread was stopped for it after closing a vsock
/// connection): once any thread is filtered, thread heaps keep their
/// memory for reuse instead (guest RAM is mapped apart, not affected).
fn keep_thread_heaps() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        // SAFETY: mallopt only sets an allocator parameter; glibc takes
        // its own lock for it, so other threads may be allocating.
        unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) };
    });
}

/// On a trapped call: name it on stderr and exit with status 12.
fn install_sigsys_handler() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        // SAFETY: a zeroed sigaction is valid to start from; the handler
        // only formats into a stack buffer and calls write(2) and
        // _exit(2), both async-signal-safe and on every list.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigsys as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut());
        }
    });
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // struct siginfo's _sigsys: { void *call_addr; int syscall; u32 arch }
    // after the three ints of the header (padded to 16 bytes).
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS.
    let nr = unsafe { *((info as *const u8).add(24) as *const libc::c_int) };
    let mut buf = [0u8; 128];
    let mut n = 0;
    for part in [
        &b"brisk: seccomp: a thread made system call "[..],
        itoa(nr as u64, &mut [0u8; 20]),
        &b", which its filter forbids; exiting (run with --seccomp log to find every one)\n"[..],
    ] {
        let take = part.len().min(buf.len() - n);
        buf[n..n + take].copy_from_slice(&part[..take]);
        n += take;
    }
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
        libc::_exit(12);
    }
}

fn itoa(mut v: u64, out: &mut [u8; 20]) -> &[u8] {
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &out[i..];
        }
    }
}
