//! M:N: a fixed pool of host threads runs many vCPUs.
//!
//! Each vCPU keeps its [`VcpuCtl`] and its protocol; what changes is where
//! it waits. A 1:1 vCPU blocks on its own thread when it halts or parks; a
//! pooled one *leaves* the thread instead ([`Leave`]), which goes on to run
//! another vCPU. A wake (a kick, an interrupt, a resume, work) finds the
//! vCPU on no thread ([`Whereabouts::Off`]) and puts its id in the run
//! queue, waking a sleeping pool thread only if there is one: a kick to a
//! vCPU that holds no thread is a bit in memory and a queue entry, never a
//! signal.
//!
//! How a vCPU moves between threads without losing a kick or signalling
//! the wrong thread (docs/protocol.md has the whole argument):
//! - it leaves only with its mode published as Halted or Parked (under its
//!   lock, after looking at requests: the same Dekker pair as a 1:1 halt),
//!   or as Outside when preempted (it is then queued, and looks at requests
//!   before its next entry);
//! - before the thread runs anything else it waits for the vCPU's kickers
//!   to drain ([`VcpuCtl::leave_thread`]): a kicker that saw InGuest may
//!   still be about to signal, and must signal this thread, not the next;
//! - the next thread binds its own interrupt before it publishes InGuest,
//!   so a kicker that wins that entry signals the thread that runs it.
//!
//! The slot lock (`Slot::runner`) is the vCPU's ownership: the thread that
//! runs a vCPU holds it for the stretch, so a thread that takes the id from
//! the queue while the previous one is still leaving waits for it there.
//!
//! When no vCPU is runnable, a pool thread runs the idle tasks of halted
//! vCPUs (`run_when_idle`, idle groups) before it sleeps: the VMM's work
//! runs on the guest's idle time, within the pool's threads.
//!
//! Time slices: a vCPU that spins in the guest never exits by itself. While
//! a vCPU waits in the run queue and no pool thread sleeps, the slicer
//! thread kicks ([`Request::Preempt`]) the vCPU that has run longest once
//! its slice is over; it leaves only if someone still waits by then.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::run::{Leave, LoopState, Step};
use crate::sync::{self, Condvar, Mutex};
use crate::vcpu::Whereabouts;
use crate::{Flow, Guest, Mode, Request, RunEnd, RunError, VcpuCtl};

/// How a pool thread that has not started any vCPU yet makes itself ready
/// (brisk installs its seccomp filter); `false`: it cannot, and leaves.
pub type ThreadStart = Arc<dyn Fn(usize) -> bool + Send + Sync>;

/// One pooled vCPU's exit handler.
pub type ExitHandler<G> =
    Box<dyn FnMut(&mut G, <G as Guest>::Exit) -> Result<Flow, <G as Guest>::Error> + Send>;

/// Told how a pooled vCPU's loop ended (what [`VcpuCtl::run`] returns for a
/// 1:1 vCPU), on the pool thread it ended on.
pub type EndHandler<G> = Box<dyn FnOnce(Result<RunEnd, RunError<<G as Guest>::Error>>) + Send>;

/// A vCPU for the pool: what [`VcpuCtl::run`] takes, plus where its end goes.
pub struct PoolVcpu<G: Guest> {
    pub ctl: Arc<VcpuCtl<G>>,
    pub guest: G,
    pub on_exit: ExitHandler<G>,
    pub on_end: EndHandler<G>,
}

/// How the pool runs.
#[derive(Clone)]
pub struct PoolConfig {
    /// Host threads that run vCPUs (at least 1).
    pub threads: usize,
    /// A runnable vCPU waits at most about this long for a thread while
    /// others spin in the guest; `None`: no slicer thread (a spinning vCPU
    /// keeps its thread until it halts, parks or ends).
    pub slice: Option<Duration>,
    /// Runs first on each pool thread (0 to `threads - 1`) and on the
    /// slicer (`threads`).
    pub on_thread_start: Option<ThreadStart>,
}

/// The queue and the sleeping threads, shared by the pool threads, the
/// slicer and every wake (through each vCPU's `sched`). Lock order: a
/// vCPU's own lock, then this one.
pub(crate) struct Scheduler {
    queue: Mutex<Queue>,
    /// One per pool thread: it sleeps here when nothing is queued.
    threads: Vec<Condvar>,
    /// The slicer sleeps here while no vCPU waits for a thread.
    slicer: Condvar,
    /// How long a queued vCPU or idle task waits, at most, while others
    /// run (`None`: until a thread is free).
    slice: Option<Duration>,
}

struct Queue {
    /// vCPUs that must run, oldest first.
    run: VecDeque<usize>,
    /// Halted vCPUs with idle tasks, since when: run when `run` is empty,
    /// or once the first has waited a slice (one task each time), so
    /// vCPUs that never halt do not starve the VMM's work.
    idle: VecDeque<(usize, Instant)>,
    /// The thread each vCPU last ran on (`usize::MAX`: none yet).
    last: Vec<usize>,
    /// Threads waiting on their condvar that nobody has woken yet.
    sleeping: Vec<bool>,
    /// What each thread runs now (`None`: starting, between two vCPUs or
    /// asleep: about to take from the queue itself).
    running: Vec<Option<Running>>,
    /// Threads that could not start.
    gone: Vec<bool>,
    /// The slicer waits with nothing to count (a notify is a syscall even
    /// with no waiter: sent only then).
    slicer_idle: bool,
    /// vCPUs whose loop has not ended.
    live: usize,
}

/// A thread's current stretch, as the slicer sees it.
#[derive(Clone, Copy)]
struct Running {
    vcpu: usize,
    since: Instant,
    /// The slicer has asked it to leave (it has not yet).
    preempted: bool,
}

impl Queue {
    /// Whether a vCPU or an idle task waits for a thread.
    fn waiting(&self) -> bool {
        !self.run.is_empty() || !self.idle.is_empty()
    }

    /// How many wait for a thread: queued vCPUs, and the idle queue's
    /// vCPUs as one.
    fn waiters(&self) -> usize {
        self.run.len() + usize::from(!self.idle.is_empty())
    }
}

/// The shortest slice the slicer keeps (a zero one would spin).
const MIN_SLICE: Duration = Duration::from_micros(100);

/// How far down the run queue a thread looks for a vCPU it ran last.
const AFFINITY_LOOKAHEAD: usize = 8;

impl Scheduler {
    fn new(threads: usize, vcpus: usize, slice: Option<Duration>) -> Scheduler {
        Scheduler {
            queue: Mutex::new(Queue {
                run: (0..vcpus).collect(),
                idle: VecDeque::new(),
                last: vec![usize::MAX; vcpus],
                sleeping: vec![false; threads],
                running: vec![None; threads],
                gone: vec![false; threads],
                slicer_idle: false,
                live: vcpus,
            }),
            threads: (0..threads).map(|_| Condvar::new()).collect(),
            slicer: Condvar::new(),
            slice,
        }
    }

    /// vCPU `id` must run: queue it and wake a thread for it (the one it
    /// last ran on if that one sleeps), or the slicer if none sleeps.
    pub(crate) fn queue_run(&self, id: usize) {
        let mut q = sync::lock(&self.queue);
        q.run.push_back(id);
        self.wake_for(&mut q, Some(id));
    }

    /// Halted vCPU `id` has idle tasks: queue it behind every runnable one.
    pub(crate) fn queue_idle(&self, id: usize) {
        let mut q = sync::lock(&self.queue);
        q.idle.push_back((id, Instant::now()));
        self.wake_for(&mut q, None);
    }

    /// vCPU `id`, queued for its idle tasks, must run now: move it to the
    /// run queue. Not there any more: a thread has it, and will see the
    /// request that made it runnable.
    pub(crate) fn promote(&self, id: usize) {
        let mut q = sync::lock(&self.queue);
        if let Some(at) = q.idle.iter().position(|&(v, _)| v == id) {
            q.idle.remove(at);
            q.run.push_back(id);
            self.wake_for(&mut q, Some(id));
        }
    }

    /// Whether a vCPU waits in the run queue, or idle tasks have waited
    /// a slice.
    pub(crate) fn others_waiting(&self) -> bool {
        let q = sync::lock(&self.queue);
        !q.run.is_empty() || self.idle_due(&q)
    }

    fn idle_due(&self, q: &Queue) -> bool {
        let waited = |since: &Instant| self.slice.is_some_and(|s| since.elapsed() >= s);
        q.idle.front().is_some_and(|(_, since)| waited(since))
    }

    /// Wake a sleeping thread for what was just queued (the one vCPU `id`
    /// last ran on, if it sleeps), or the slicer if none sleeps.
    fn wake_for(&self, q: &mut Queue, id: Option<usize>) {
        let last = id.map(|id| q.last[id]).filter(|&t| t != usize::MAX);
        let thread = last
            .filter(|&t| q.sleeping[t])
            .or_else(|| q.sleeping.iter().position(|&s| s));
        match thread {
            Some(t) => {
                q.sleeping[t] = false;
                self.threads[t].notify_one();
            }
            None => self.wake_slicer(q),
        }
    }

    /// Tell the slicer to look again, if it waits with nothing to count.
    fn wake_slicer(&self, q: &mut Queue) {
        if q.slicer_idle {
            q.slicer_idle = false;
            self.slicer.notify_one();
        }
    }

    /// The next vCPU for thread `me` to run; `None` once every vCPU ended.
    fn next(&self, me: usize) -> Option<usize> {
        let mut q = sync::lock(&self.queue);
        loop {
            if q.live == 0 {
                return None;
            }
            let mine = q
                .run
                .iter()
                .take(AFFINITY_LOOKAHEAD)
                .position(|&v| q.last[v] == me);
            let due = if self.idle_due(&q) {
                q.idle.pop_front().map(|(v, _)| v)
            } else {
                None
            };
            let id = due
                .or_else(|| match mine {
                    Some(at) => q.run.remove(at),
                    None => q.run.pop_front(),
                })
                .or_else(|| q.idle.pop_front().map(|(v, _)| v));
            if let Some(id) = id {
                q.last[id] = me;
                q.running[me] = Some(Running {
                    vcpu: id,
                    since: Instant::now(),
                    preempted: false,
                });
                if q.waiting() && self.slice_now(&q) {
                    // Others still wait and this thread is the last free
                    // one: the slicer must start counting.
                    self.wake_slicer(&mut q);
                }
                return Some(id);
            }
            q.sleeping[me] = true;
            q = sync::wait_while(&self.threads[me], q, |q| q.sleeping[me] && q.live > 0);
            q.sleeping[me] = false;
        }
    }

    /// Whether every thread runs a vCPU (one that runs none now takes the
    /// next from the queue itself): a queued vCPU then needs a slice to
    /// end.
    fn slice_now(&self, q: &Queue) -> bool {
        q.running
            .iter()
            .zip(&q.gone)
            .all(|(r, g)| r.is_some() || *g)
    }

    /// Thread `me` is done with vCPU `id` for now.
    fn put_back(&self, me: usize, id: usize, outcome: Outcome) {
        let mut q = sync::lock(&self.queue);
        q.running[me] = None;
        match outcome {
            // Someone was waiting when it left: no thread sleeps to wake.
            // It goes to the back with no thread of its own, or this
            // thread would take it straight back.
            Outcome::Away(Leave::Preempted) => {
                q.last[id] = usize::MAX;
                q.run.push_back(id);
            }
            // Off (a wake queues it) or already in the idle queue.
            Outcome::Away(_) | Outcome::Gone => {}
            Outcome::Ended => {
                q.live -= 1;
                if q.live == 0 {
                    self.close(&mut q);
                }
            }
        }
    }

    /// Every vCPU ended: wake every sleeper so it sees it and leaves.
    fn close(&self, q: &mut Queue) {
        for (t, cv) in self.threads.iter().enumerate() {
            q.sleeping[t] = false;
            cv.notify_all();
        }
        self.slicer.notify_all();
    }

    /// Thread `me` could not start: whether it was the last one, leaving
    /// the vCPUs with none.
    fn thread_lost(&self, me: usize) -> bool {
        let mut q = sync::lock(&self.queue);
        q.gone[me] = true;
        q.gone.iter().all(|&g| g)
    }
}

/// What a stretch on a thread ended with.
enum Outcome {
    Away(Leave),
    Ended,
    /// The vCPU had ended before (counted then).
    Gone,
}

/// A vCPU between stretches: everything its loop needs on the next thread.
struct Runner<G: Guest> {
    guest: RefCell<G>,
    on_exit: ExitHandler<G>,
    on_end: EndHandler<G>,
    st: Option<LoopState>,
}

struct Slot<G: Guest> {
    ctl: Arc<VcpuCtl<G>>,
    /// Held by the thread that runs the vCPU; `None` once it ended.
    runner: Mutex<Option<Runner<G>>>,
}

struct Shared<G: Guest> {
    sched: Arc<Scheduler>,
    slots: Vec<Slot<G>>,
    slice: Option<Duration>,
}

/// A running pool. [`Pool::join`] waits for its threads, which leave once
/// every vCPU's loop has ended (ask them with [`VcpuCtl::request_exit`]).
pub struct Pool {
    threads: Vec<sync::JoinHandle>,
    sched: Arc<Scheduler>,
}

impl Pool {
    /// Start `config.threads` pool threads (and the slicer) running
    /// `vcpus`. Every vCPU starts runnable; a vCPU made to start paused or
    /// halted parks or halts on its first stretch. The vCPUs' ids must be
    /// 0, 1, 2... in order.
    pub fn start<G>(config: PoolConfig, vcpus: Vec<PoolVcpu<G>>) -> std::io::Result<Pool>
    where
        G: Guest + Send + 'static,
        G::Error: Send,
    {
        let threads = config.threads.max(1);
        let sched = Arc::new(Scheduler::new(threads, vcpus.len(), config.slice));
        let mut slots = Vec::with_capacity(vcpus.len());
        for (i, v) in vcpus.into_iter().enumerate() {
            assert_eq!(v.ctl.id(), i, "pooled vCPUs come in id order");
            assert!(
                !v.ctl
                    .started
                    .swap(true, std::sync::atomic::Ordering::SeqCst),
                "a pooled vCPU must not have run"
            );
            let _ = v.ctl.sched.set(sched.clone());
            slots.push(Slot {
                ctl: v.ctl,
                runner: Mutex::new(Some(Runner {
                    guest: RefCell::new(v.guest),
                    on_exit: v.on_exit,
                    on_end: v.on_end,
                    st: None,
                })),
            });
        }
        let shared = Arc::new(Shared {
            sched: sched.clone(),
            slots,
            slice: config.slice,
        });
        let mut handles = Vec::with_capacity(threads + 1);
        for me in 0..threads {
            let mine = shared.clone();
            let start = config.on_thread_start.clone();
            let spawned = sync::spawn(format!("vcpu-pool{me}"), move || {
                if start.is_some_and(|f| !f(me)) {
                    if mine.sched.thread_lost(me) {
                        mine.abandon();
                    }
                    return;
                }
                mine.work(me);
            });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // The threads started so far leave once the vCPUs
                    // end; with none, end them here.
                    for t in me..threads {
                        if sched.thread_lost(t) {
                            shared.abandon();
                        }
                    }
                    Pool {
                        threads: handles,
                        sched,
                    }
                    .end_all(&shared);
                    return Err(e);
                }
            }
        }
        if config.slice.is_some() {
            let mine = shared.clone();
            let start = config.on_thread_start.clone();
            let slicer = move || {
                // A slicer that cannot start leaves: vCPUs then keep their
                // threads until they halt or park.
                if start.is_none_or(|f| f(threads)) {
                    mine.slicer();
                }
            };
            match sync::spawn("vcpu-slicer".into(), slicer) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    Pool {
                        threads: handles,
                        sched,
                    }
                    .end_all(&shared);
                    return Err(e);
                }
            }
        }
        Ok(Pool {
            threads: handles,
            sched,
        })
    }

    /// Host threads the pool holds (the slicer included).
    pub fn thread_count(&self) -> usize {
        self.threads.len()
    }

    /// Whether `thread` is one of the pool's (a caller on a pool thread
    /// must not wait to join it).
    #[cfg(not(loom))]
    pub fn runs_on(&self, thread: std::thread::ThreadId) -> bool {
        self.threads.iter().any(|t| t.thread().id() == thread)
    }

    /// Whether every vCPU's loop has ended (the threads then leave).
    pub fn is_done(&self) -> bool {
        sync::lock(&self.sched.queue).live == 0
    }

    /// Wait for the pool's threads (after every vCPU's loop has ended).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }

    /// Ask every vCPU to exit and wait for the threads (a failed start).
    fn end_all<G: Guest>(self, shared: &Shared<G>) {
        for s in &shared.slots {
            s.ctl.request_exit();
        }
        self.join();
    }
}

impl<G: Guest> Shared<G> {
    /// A pool thread's life: run whatever is queued until every vCPU ended.
    fn work(&self, me: usize) {
        while let Some(id) = self.sched.next(me) {
            let outcome = self.stretch(id);
            self.sched.put_back(me, id, outcome);
        }
    }

    /// Run vCPU `id` on this thread until it leaves it or ends.
    fn stretch(&self, id: usize) -> Outcome {
        let slot = &self.slots[id];
        let ctl = &*slot.ctl;
        // Waits here while the previous thread is still leaving.
        let mut held = sync::lock(&slot.runner);
        let Some(r) = held.as_mut() else {
            return Outcome::Gone; // unreachable: an ended vCPU is never queued
        };
        ctl.lock().whereabouts = Whereabouts::Held;
        ctl.bind(&r.guest);
        let mut st = match r.st.take() {
            Some(st) => st,
            None => ctl.first_entry(),
        };
        let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ctl.run_stretch(&r.guest, &mut r.on_exit, &mut st, &self.sched)
        }));
        let end = match step {
            Ok(Ok(Step::Away(leave))) => {
                r.st = Some(st);
                // Preempted: it is about to be queued, and looks at
                // requests before its next entry. Halted or parked: the
                // mode is published already.
                let publish = (leave == Leave::Preempted).then_some(Mode::Outside);
                ctl.leave_thread(publish);
                r.guest.borrow_mut().unbind_thread();
                return Outcome::Away(leave);
            }
            Ok(Ok(Step::End(end))) => Ok(end),
            Ok(Err(e)) => Err(RunError::Guest(e)),
            Err(_) => Err(RunError::Panicked { vcpu: id }),
        };
        let runner = held.take().expect("held above");
        drop(held);
        Self::finish(ctl, runner, end);
        Outcome::Ended
    }

    /// The end of a vCPU's loop, on the thread it ended on.
    fn finish(ctl: &VcpuCtl<G>, runner: Runner<G>, end: Result<RunEnd, RunError<G::Error>>) {
        ctl.finish_run();
        runner.guest.borrow_mut().unbind_thread();
        (runner.on_end)(end);
    }

    /// No pool thread is left: end every vCPU that has not ended.
    fn abandon(&self) {
        for (id, slot) in self.slots.iter().enumerate() {
            let runner = sync::lock(&slot.runner).take();
            if let Some(runner) = runner {
                Self::finish(&slot.ctl, runner, Err(RunError::NoThread { vcpu: id }));
                let mut q = sync::lock(&self.sched.queue);
                q.live -= 1;
                if q.live == 0 {
                    self.sched.close(&mut q);
                }
            }
        }
    }

    /// The slicer: while a vCPU waits for a thread and none sleeps, kick
    /// the one that has run longest once its slice is over.
    ///
    /// One preemption per waiter: a vCPU asked counts for a slice (until
    /// its thread takes the next, or it declines because nobody waited by
    /// then, and is asked again a slice on), so one waiter never costs
    /// every thread a switch.
    fn slicer(&self) {
        let Some(slice) = self.slice else { return };
        let slice = slice.max(MIN_SLICE);
        let sched = &*self.sched;
        let mut q = sync::lock(&sched.queue);
        loop {
            if q.live == 0 {
                return;
            }
            // Whether anyone waits and every thread is busy changes only
            // with a queue entry or a thread taking one, which notify us.
            if !q.waiting() || !sched.slice_now(&q) {
                q.slicer_idle = true;
                q = sync::wait(&sched.slicer, q);
                q.slicer_idle = false;
                continue;
            }
            let asked = |r: &&Running| r.preempted && r.since.elapsed() < slice;
            let pending = q.running.iter().flatten().filter(asked).count();
            let oldest = q
                .running
                .iter()
                .flatten()
                .filter(|r| !asked(r))
                .min_by_key(|r| r.since)
                .copied();
            let Some(oldest) = oldest.filter(|_| pending < q.waiters()) else {
                // Enough are asked: look again once their asks expire.
                q = sync::wait_timeout(&sched.slicer, q, slice);
                continue;
            };
            let due = slice.saturating_sub(oldest.since.elapsed());
            if !due.is_zero() {
                q = sync::wait_timeout(&sched.slicer, q, due);
                continue;
            }
            for r in q.running.iter_mut().flatten() {
                if r.vcpu == oldest.vcpu {
                    r.preempted = true;
                    r.since = Instant::now();
                }
            }
            drop(q);
            self.slots[oldest.vcpu].ctl.kick(Request::Preempt);
            q = sync::lock(&sched.queue);
        }
    }
}
