//! The I/O engine: one thread per VM that serves device queues off the
//! vCPU threads.
//!
//! A guest's QueueNotify is an ioeventfd: KVM completes the write and
//! bumps the eventfd, with no exit to the vCPU loop. The engine waits on
//! those eventfds and on the backends' fds (a TAP's frames) with epoll,
//! and calls the device to serve them. Every call does a bounded amount
//! of work (a [`Budget`]); a device with more to do says so and is called
//! again after the engine has looked at everything else, so one flooded
//! queue can neither hold a vCPU (nothing runs on one) nor starve the
//! other devices.
//!
//! A pause quiesces the engine ([`IoEngine::quiesce`]): it finishes the
//! call in progress (whole requests only) and parks, so a snapshot or a
//! migration sees no request half done and no guest memory written
//! behind its back. Notifications that arrive meanwhile stay in their
//! eventfds; [`IoEngine::release`] serves every source once, so nothing
//! posted while parked (or saved in a snapshot) is left waiting.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// How much one call may do before it lets the others have a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    chains: u32,
    bytes: u64,
}

impl Budget {
    /// Chains per call from the engine.
    pub const CHAINS: u32 = 64;
    /// Bytes per call from the engine.
    pub const BYTES: u64 = 1 << 20;

    /// One engine call's share.
    pub const fn per_call() -> Budget {
        Budget {
            chains: Self::CHAINS,
            bytes: Self::BYTES,
        }
    }

    /// No limit (the inline path, which serves a queue to its end).
    pub const fn unlimited() -> Budget {
        Budget {
            chains: u32::MAX,
            bytes: u64::MAX,
        }
    }

    /// Whether it is used up.
    pub fn spent(&self) -> bool {
        self.chains == 0 || self.bytes == 0
    }

    /// Account one chain of `bytes`.
    pub fn spend(&mut self, bytes: u64) {
        self.chains = self.chains.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
    }

    /// Chains still allowed.
    pub fn chains_left(&self) -> usize {
        self.chains as usize
    }
}

/// What a call to the work left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// Nothing until the next event.
    Done,
    /// More now: call again soon, without a new event.
    More,
    /// Throttled by a rate limiter: call again after this long.
    After(Duration),
}

/// Work the engine runs: a device's queues and backend.
pub trait IoWork: Send + Sync {
    /// Serve what source `token` signalled, within `budget`.
    fn serve(&self, token: u32, budget: &mut Budget) -> Served;
}

/// How the engine watches a source's fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// An eventfd (a queue's notifier): drained, then served; level
    /// triggered, so a notification is never lost.
    Counter,
    /// A backend (a TAP): edge triggered; the device reads until it would
    /// block, or says it has more.
    Edge,
}

/// One fd the engine waits on, and whom it calls.
pub struct Source {
    /// Owned by `work` (the device), which outlives the engine's use.
    pub fd: RawFd,
    pub trigger: Trigger,
    pub token: u32,
    pub work: Arc<dyn IoWork>,
}

/// Why the engine could not be started.
#[derive(Debug, thiserror::Error)]
#[error("the I/O engine: {what}: {source}")]
pub struct IoEngineError {
    what: &'static str,
    #[source]
    source: std::io::Error,
}

/// A call did not finish within the pause's deadline (a backend file
/// that blocks: a hung network file system); the engine runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the I/O thread did not finish its request within {0:?}")]
pub struct NotParked(pub Duration);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Run,
    Quiesce,
    Stop,
}

struct Control {
    mode: Mode,
    parked: bool,
    /// Released since the thread last looked: serve every source once.
    released: bool,
    finished: bool,
}

struct Shared {
    control: Mutex<Control>,
    cv: Condvar,
    wake: EventFd,
    serves: AtomicU64,
    wakeups: AtomicU64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The engine's thread and the handle that pauses and stops it.
pub struct IoEngine {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// How long dropping the engine waits for its thread.
const STOP_BOUND: Duration = Duration::from_secs(5);
/// The token of the engine's own wake-up eventfd.
const WAKE: u64 = u64::MAX;

impl IoEngine {
    /// Start the engine's thread on `sources`, parked: nothing is served
    /// until [`IoEngine::release`]. `init` runs first on the thread (its
    /// seccomp filter).
    pub fn start(
        sources: Vec<Source>,
        init: Box<dyn FnOnce() + Send>,
    ) -> Result<IoEngine, IoEngineError> {
        let setup = |what| move |source| IoEngineError { what, source };
        let epoll = Epoll::new().map_err(setup("epoll_create"))?;
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(setup("an eventfd"))?;
        let add = |fd, events, data| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, data))
                .map_err(setup("epoll_ctl"))
        };
        use std::os::fd::AsRawFd;
        add(wake.as_raw_fd(), EventSet::IN, WAKE)?;
        for (i, s) in sources.iter().enumerate() {
            let events = match s.trigger {
                Trigger::Counter => EventSet::IN,
                Trigger::Edge => EventSet::IN | EventSet::EDGE_TRIGGERED,
            };
            add(s.fd, events, i as u64)?;
        }
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                mode: Mode::Quiesce,
                parked: false,
                released: false,
                finished: false,
            }),
            cv: Condvar::new(),
            wake,
            serves: AtomicU64::new(0),
            wakeups: AtomicU64::new(0),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("io".into())
            .spawn(move || {
                init();
                let finished = Finished(&thread_shared);
                run(&thread_shared, &epoll, &sources);
                drop(finished);
            })
            .map_err(setup("starting its thread"))?;
        Ok(IoEngine {
            shared,
            thread: Some(thread),
        })
    }

    /// Let the engine finish the call in progress and park, waiting at
    /// most `bound`. Idempotent.
    pub fn quiesce(&self, bound: Duration) -> Result<(), NotParked> {
        let deadline = Instant::now() + bound;
        let mut c = self.shared.lock();
        if c.finished {
            return Ok(());
        }
        c.mode = Mode::Quiesce;
        let _ = self.shared.wake.write(1);
        while !c.parked && !c.finished {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                c.mode = Mode::Run;
                return Err(NotParked(bound));
            }
            c = self
                .shared
                .cv
                .wait_timeout(c, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Run again after [`IoEngine::quiesce`] (or the parked start): every
    /// source is served once, then as its fds say.
    pub fn release(&self) {
        let mut c = self.shared.lock();
        if c.mode == Mode::Quiesce {
            c.mode = Mode::Run;
            c.released = true;
            self.shared.cv.notify_all();
        }
    }

    /// Calls made to devices so far.
    pub fn serves(&self) -> u64 {
        self.shared.serves.load(Ordering::Relaxed)
    }

    /// Times the thread woke from its wait.
    pub fn wakeups(&self) -> u64 {
        self.shared.wakeups.load(Ordering::Relaxed)
    }
}

impl Drop for IoEngine {
    fn drop(&mut self) {
        let mut c = self.shared.lock();
        c.mode = Mode::Stop;
        self.shared.cv.notify_all();
        let _ = self.shared.wake.write(1);
        let (c, _) = self
            .shared
            .cv
            .wait_timeout_while(c, STOP_BOUND, |c| !c.finished)
            .unwrap_or_else(|p| p.into_inner());
        let finished = c.finished;
        drop(c);
        match self.thread.take() {
            Some(t) if finished => {
                let _ = t.join();
            }
            // Stuck in a backend call: detached (it holds what it uses).
            _ => log::warn!("the I/O thread did not stop within {STOP_BOUND:?}; left running"),
        }
    }
}

/// Marks the engine finished however its thread ends.
struct Finished<'a>(&'a Shared);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        let mut c = self.0.lock();
        c.finished = true;
        c.parked = false;
        self.0.cv.notify_all();
    }
}

/// Park while quiesced. Returns `None` to stop, else whether the engine
/// was released since the last look (then everything is served once).
fn park(shared: &Shared) -> Option<bool> {
    let mut c = shared.lock();
    while c.mode == Mode::Quiesce {
        if !c.parked {
            c.parked = true;
            shared.cv.notify_all();
        }
        c = shared.cv.wait(c).unwrap_or_else(|p| p.into_inner());
    }
    c.parked = false;
    match c.mode {
        Mode::Stop => None,
        _ => Some(std::mem::take(&mut c.released)),
    }
}

fn run(shared: &Shared, epoll: &Epoll, sources: &[Source]) {
    let mut events = vec![EpollEvent::default(); sources.len() + 1];
    // Sources with work left, in the order they get their next turn.
    let mut again: Vec<usize> = Vec::new();
    let mut queued = vec![false; sources.len()];
    // Throttled sources: when to call them again.
    let mut timers: Vec<Option<Instant>> = vec![None; sources.len()];
    loop {
        match park(shared) {
            None => return,
            Some(true) => {
                // Released: anything posted while parked, or restored from
                // a snapshot, gets served now.
                for i in 0..sources.len() {
                    queue(i, &mut again, &mut queued);
                }
            }
            Some(false) => {}
        }
        let now = Instant::now();
        let timeout = if !again.is_empty() {
            0
        } else {
            match timers.iter().flatten().min() {
                // Rounded up: waking early would find the tokens short.
                Some(t) => t
                    .saturating_duration_since(now)
                    .as_micros()
                    .div_ceil(1000)
                    .min(i32::MAX as u128) as i32,
                None => -1,
            }
        };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!(
                    "the I/O thread's epoll_wait failed ({e}); device queues are no longer served"
                );
                return;
            }
        };
        shared.wakeups.fetch_add(1, Ordering::Relaxed);
        for ev in &events[..n] {
            if ev.data() == WAKE {
                let _ = shared.wake.read();
                continue;
            }
            let i = ev.data() as usize;
            let Some(s) = sources.get(i) else { continue };
            if s.trigger == Trigger::Counter {
                drain(s.fd);
            }
            queue(i, &mut again, &mut queued);
        }
        let now = Instant::now();
        for (i, timer) in timers.iter_mut().enumerate() {
            if timer.is_some_and(|t| t <= now) {
                *timer = None;
                queue(i, &mut again, &mut queued);
            }
        }
        // One turn each; whoever has more goes to the back of the line.
        let turn = std::mem::take(&mut again);
        for i in turn {
            queued[i] = false;
            let s = &sources[i];
            let mut budget = Budget::per_call();
            shared.serves.fetch_add(1, Ordering::Relaxed);
            match s.work.serve(s.token, &mut budget) {
                Served::Done => {}
                Served::More => queue(i, &mut again, &mut queued),
                Served::After(d) => timers[i] = Some(Instant::now() + d),
            }
        }
    }
}

/// Put source `i` in line for a turn, once.
fn queue(i: usize, again: &mut Vec<usize>, queued: &mut [bool]) {
    if !queued[i] {
        queued[i] = true;
        again.push(i);
    }
}

/// Reset an eventfd's counter (non-blocking: nothing there is fine).
fn drain(fd: RawFd) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a local u64 from an fd the source's
    // device keeps open for as long as the engine runs.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicU32;

    /// Counts what it serves; has `more` calls' worth of work after each
    /// notification.
    struct Work {
        served: AtomicU32,
        left: AtomicU32,
        per_notify: u32,
        done: (Mutex<u32>, Condvar),
    }

    impl Work {
        fn new(per_notify: u32) -> Arc<Work> {
            Arc::new(Work {
                served: AtomicU32::new(0),
                left: AtomicU32::new(0),
                per_notify,
                done: (Mutex::new(0), Condvar::new()),
            })
        }

        fn wait_for(&self, n: u32) {
            let g = self.done.0.lock().unwrap();
            drop(self.done.1.wait_while(g, |d| *d < n).unwrap());
        }
    }

    impl IoWork for Work {
        fn serve(&self, _token: u32, budget: &mut Budget) -> Served {
            budget.spend(1);
            self.served.fetch_add(1, Ordering::SeqCst);
            let left = self.left.load(Ordering::SeqCst);
            let more = if left == 0 {
                self.per_notify.saturating_sub(1)
            } else {
                left - 1
            };
            self.left.store(more, Ordering::SeqCst);
            if more == 0 {
                *self.done.0.lock().unwrap() += 1;
                self.done.1.notify_all();
            }
            if more > 0 {
                Served::More
            } else {
                Served::Done
            }
        }
    }

    fn engine(fds: &[(&EventFd, Arc<Work>)]) -> IoEngine {
        let sources = fds
            .iter()
            .enumerate()
            .map(|(i, (fd, w))| Source {
                fd: fd.as_raw_fd(),
                trigger: Trigger::Counter,
                token: i as u32,
                work: w.clone() as Arc<dyn IoWork>,
            })
            .collect();
        IoEngine::start(sources, Box::new(|| {})).unwrap()
    }

    /// A notification is served; a device with more work is called again
    /// without a second notification.
    #[test]
    fn work_left_is_served_without_a_new_notification() {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let w = Work::new(5);
        let e = engine(&[(&fd, w.clone())]);
        e.release();
        // The release serves every source once (one whole round of 5).
        w.wait_for(1);
        fd.write(1).unwrap();
        w.wait_for(2);
        assert_eq!(w.served.load(Ordering::SeqCst), 10);
    }

    /// Parked, nothing is served; notifications made meanwhile are served
    /// after the release.
    #[test]
    fn a_quiesced_engine_serves_nothing_until_released() {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let w = Work::new(1);
        let e = engine(&[(&fd, w.clone())]);
        e.quiesce(Duration::from_secs(60)).unwrap();
        fd.write(1).unwrap();
        // Quiesce again: it returns only once parked, and the thread
        // parked before the first release, so nothing ran.
        e.quiesce(Duration::from_secs(60)).unwrap();
        assert_eq!(w.served.load(Ordering::SeqCst), 0);
        e.release();
        w.wait_for(1);
        e.quiesce(Duration::from_secs(60)).unwrap();
        let served = w.served.load(Ordering::SeqCst);
        fd.write(1).unwrap();
        e.quiesce(Duration::from_secs(60)).unwrap();
        assert_eq!(w.served.load(Ordering::SeqCst), served);
        drop(e);
    }

    /// A source that always has more work does not starve another one.
    #[test]
    fn a_flooded_source_does_not_starve_the_others() {
        let (a, b) = (
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        );
        let flood = Work::new(u32::MAX);
        let quiet = Work::new(1);
        let e = engine(&[(&a, flood.clone()), (&b, quiet.clone())]);
        e.release();
        quiet.wait_for(1);
        b.write(1).unwrap();
        quiet.wait_for(2);
        assert!(flood.served.load(Ordering::SeqCst) >= 1);
        // Dropping stops it even though the flood never ends.
        drop(e);
    }
}
