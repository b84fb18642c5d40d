//! The host threads that run a VM's vCPUs: one each (the default), or a
//! pool of N that runs them all (`--vcpu-threads N`, M:N; see
//! `brisk_control::Pool`).

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use brisk_control::{Pool, PoolConfig, PoolVcpu, RunEnd, RunError};
use brisk_devices::{Apics, DeviceManager};
use brisk_kvm::KvmVcpu;

use crate::lifecycle::Lifecycle;
use crate::seccomp::{self, Seccomp, ThreadKind};
use crate::{exits, Vcpu, VmEnd};

/// How long a runnable vCPU waits for a pool thread while others spin in
/// the guest: about a host scheduler tick, so M:N time-shares the way the
/// host would have shared N CPUs among M threads.
pub const POOL_SLICE: Duration = Duration::from_millis(4);

/// The oldest host kernel whose KVM_RUN from a new thread is cheap: before
/// 6.13 (commit 3e7f43188ee2) it called `synchronize_rcu()`, which can
/// stall for hundreds of milliseconds, on every move to another thread.
const POOL_MIN_KERNEL: (u32, u32) = (6, 13);

/// Why a pool cannot run here.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("--vcpu-threads needs Linux {}.{} or later on the host (this is {release}): before it, KVM_RUN from another thread waits for synchronize_rcu(), which can stall for hundreds of milliseconds", POOL_MIN_KERNEL.0, POOL_MIN_KERNEL.1)]
    OldKernel { release: String },
    #[error("starting the vCPU pool's threads: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Refuse a pool on a host kernel where moving a vCPU between threads
/// stalls.
pub(crate) fn check_host() -> Result<(), PoolError> {
    let release = host_release();
    let version = parse_release(&release);
    match version {
        Some(v) if v >= POOL_MIN_KERNEL => Ok(()),
        _ => Err(PoolError::OldKernel { release }),
    }
}

fn host_release() -> String {
    // SAFETY: uname fills the zeroed struct it is given; the release is a
    // NUL-terminated string inside it.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return "an unknown kernel".into();
        }
        std::ffi::CStr::from_ptr(u.release.as_ptr())
            .to_string_lossy()
            .into_owned()
    }
}

/// "6.18.0-1-amd64" -> (6, 18).
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// What every vCPU's thread needs to handle its exits and report its end.
#[derive(Clone)]
pub(crate) struct VcpuEnv {
    pub(crate) devices: Arc<DeviceManager>,
    pub(crate) life: Arc<Lifecycle>,
    pub(crate) mem: brisk_kvm::GuestRam,
    pub(crate) apics: Option<Arc<Apics>>,
    pub(crate) seccomp: Seccomp,
    pub(crate) finished: Arc<Finished>,
}

impl VcpuEnv {
    /// Handle one exit of a vCPU.
    fn handle(&self, v: &mut KvmVcpu, exit: brisk_kvm::Exit) -> brisk_control::Flow {
        let fatal = |e| {
            self.life.end(e);
        };
        let bus = self.devices.bus();
        exits::handle(v, exit, bus, self.apics.as_deref(), Some(&self.mem), &fatal)
    }

    /// How vCPU `id`'s loop ended: a failure ends the VM.
    fn report(
        &self,
        id: usize,
        run: std::thread::Result<Result<RunEnd, RunError<brisk_kvm::Error>>>,
    ) {
        let error = match run {
            Ok(Ok(RunEnd::ExitRequested | RunEnd::GuestDone)) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the vCPU thread panicked".to_string(),
        };
        self.life.end(VmEnd::VcpuFailed { vcpu: id, error });
    }

    /// Install this thread's seccomp filter; a failure ends the VM with
    /// what `failed` makes of the message.
    fn install_seccomp(&self, failed: impl FnOnce(String) -> VmEnd) -> bool {
        match seccomp::install(ThreadKind::Vcpu, self.seccomp) {
            Ok(()) => true,
            Err(e) => {
                self.life
                    .end(failed(format!("cannot install its seccomp filter: {e}")));
                false
            }
        }
    }
}

/// Which vCPUs have left their loop (set as their last act).
#[derive(Default)]
pub(crate) struct Finished {
    done: Mutex<Vec<bool>>,
    cv: Condvar,
}

impl Finished {
    pub(crate) fn new(vcpus: usize) -> Arc<Finished> {
        Arc::new(Finished {
            done: Mutex::new(vec![false; vcpus]),
            cv: Condvar::new(),
        })
    }

    /// Wait until every vCPU but those `skip` says has finished, or
    /// `deadline`; returns who has.
    fn wait(&self, deadline: Instant, skip: impl Fn(usize) -> bool) -> Vec<bool> {
        let guard = self.done.lock().unwrap_or_else(|p| p.into_inner());
        let left = deadline.saturating_duration_since(Instant::now());
        let (guard, _) = self
            .cv
            .wait_timeout_while(guard, left, |d| {
                !d.iter().enumerate().all(|(i, done)| *done || skip(i)) && Instant::now() < deadline
            })
            .unwrap_or_else(|p| p.into_inner());
        guard.clone()
    }
}

/// Marks its vCPU finished however its loop ends.
struct FinishGuard(Arc<Finished>, usize);

impl Drop for FinishGuard {
    fn drop(&mut self) {
        let mut done = self.0.done.lock().unwrap_or_else(|p| p.into_inner());
        done[self.1] = true;
        self.0.cv.notify_all();
    }
}

/// The threads running a VM's vCPUs.
pub(crate) enum VcpuThreads {
    /// Thread `i` runs vCPU `i`.
    OneEach(Vec<JoinHandle<()>>),
    /// A pool runs them all (`None` once joined or left behind).
    Pool(Option<Pool>),
}

/// What [`VcpuThreads::stop`] left behind.
pub(crate) enum Stopped {
    Clean,
    /// These vCPUs did not finish in time: their threads are detached.
    Stuck(Vec<usize>),
    /// vCPU `i`'s own thread panicked.
    Panicked(usize),
    /// The caller is a pool thread: the other pool threads may still run
    /// vCPUs, and nothing here can wait for them; they finish on their own
    /// and the VM's memory must stay for them.
    LeftToFinish,
}

impl VcpuThreads {
    /// Start a thread per vCPU, or a pool of `pool` threads, in `self`
    /// (which has none yet). On failure the threads started so far are in
    /// `self`, for [`VcpuThreads::stop`].
    pub(crate) fn start(
        &mut self,
        env: &VcpuEnv,
        vcpus: Vec<(KvmVcpu, Arc<Vcpu>)>,
        pool: Option<usize>,
    ) -> Result<(), PoolError> {
        *self = VcpuThreads::start_with(env, vcpus, pool, |t| *self = VcpuThreads::OneEach(t))?;
        Ok(())
    }

    fn start_with(
        env: &VcpuEnv,
        vcpus: Vec<(KvmVcpu, Arc<Vcpu>)>,
        pool: Option<usize>,
        keep_on_failure: impl FnOnce(Vec<JoinHandle<()>>),
    ) -> Result<VcpuThreads, PoolError> {
        match pool {
            None => {
                let mut threads = Vec::with_capacity(vcpus.len());
                for (v, ctl) in vcpus {
                    match spawn_own(env, v, ctl) {
                        Ok(t) => threads.push(t),
                        Err(e) => {
                            keep_on_failure(threads);
                            return Err(PoolError::Spawn(e));
                        }
                    }
                }
                Ok(VcpuThreads::OneEach(threads))
            }
            Some(threads) => {
                check_host()?;
                let pooled = vcpus
                    .into_iter()
                    .map(|(v, ctl)| {
                        let id = v.id();
                        let (on_exit, on_end) = (env.clone(), env.clone());
                        let finished = FinishGuard(env.finished.clone(), id);
                        PoolVcpu {
                            ctl,
                            guest: v,
                            on_exit: Box::new(move |v, exit| Ok(on_exit.handle(v, exit))),
                            on_end: Box::new(move |end| {
                                let _finished = finished;
                                on_end.report(id, Ok(end));
                            }),
                        }
                    })
                    .collect();
                let start = env.clone();
                let config = PoolConfig {
                    threads,
                    slice: Some(POOL_SLICE),
                    on_thread_start: Some(Arc::new(move |thread| {
                        start.install_seccomp(|error| VmEnd::PoolThreadFailed { thread, error })
                    })),
                };
                let pool = Pool::start(config, pooled).map_err(PoolError::Spawn)?;
                Ok(VcpuThreads::Pool(Some(pool)))
            }
        }
    }

    /// Host threads running vCPUs (a pool's slicer included).
    pub(crate) fn count(&self) -> usize {
        match self {
            VcpuThreads::OneEach(t) => t.len(),
            VcpuThreads::Pool(p) => p.as_ref().map_or(0, Pool::thread_count),
        }
    }

    /// Wait (until `deadline`) for every vCPU's loop to end, then join the
    /// threads; the caller has asked every vCPU to exit. A thread that is
    /// the caller itself (the last reference to the VM dropped on a vCPU
    /// thread) is left to finish on its own.
    pub(crate) fn stop(&mut self, finished: &Finished, deadline: Instant) -> Stopped {
        let me = std::thread::current().id();
        match self {
            VcpuThreads::OneEach(threads) => {
                // Only vCPUs with a thread (a failed start has fewer).
                let done = finished.wait(deadline, |i| {
                    threads.get(i).is_none_or(|t| t.thread().id() == me)
                });
                let mut stuck = Vec::new();
                let mut panicked = None;
                for (id, t) in threads.drain(..).enumerate() {
                    if t.thread().id() == me {
                        continue; // detached: it is us
                    }
                    if !done[id] {
                        stuck.push(id);
                        continue; // detached
                    }
                    if t.join().is_err() {
                        panicked.get_or_insert(id);
                    }
                }
                match (stuck.is_empty(), panicked) {
                    (false, _) => Stopped::Stuck(stuck),
                    (true, Some(id)) => Stopped::Panicked(id),
                    (true, None) => Stopped::Clean,
                }
            }
            VcpuThreads::Pool(pool) => {
                let Some(p) = pool.take() else {
                    return Stopped::Clean;
                };
                if p.runs_on(me) {
                    // Our own loop (the vCPU we run) ends when we return;
                    // the pool's threads leave once every vCPU has.
                    return Stopped::LeftToFinish;
                }
                let done = finished.wait(deadline, |_| false);
                let stuck: Vec<usize> = (0..done.len()).filter(|&i| !done[i]).collect();
                if stuck.is_empty() {
                    p.join();
                    Stopped::Clean
                } else {
                    Stopped::Stuck(stuck) // the pool's threads are detached
                }
            }
        }
    }
}

/// Start vCPU `ctl`'s own thread.
fn spawn_own(env: &VcpuEnv, v: KvmVcpu, ctl: Arc<Vcpu>) -> std::io::Result<JoinHandle<()>> {
    let id = v.id();
    let env = env.clone();
    let finished = FinishGuard(env.finished.clone(), id);
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            let _finished = finished;
            if !env.install_seccomp(|error| VmEnd::VcpuFailed { vcpu: id, error }) {
                return;
            }
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ctl.run(v, |v, exit| Ok(env.handle(v, exit)))
            }));
            env.report(id, run);
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_kernel_releases_parse_to_major_and_minor() {
        assert_eq!(parse_release("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(parse_release("6.1.0-28-cloud-amd64"), Some((6, 1)));
        assert_eq!(parse_release("5.10.0"), Some((5, 10)));
        assert_eq!(parse_release("junk"), None);
        assert!((6, 1) < POOL_MIN_KERNEL && (6, 13) >= POOL_MIN_KERNEL);
        assert!((7, 0) >= POOL_MIN_KERNEL);
    }
}
