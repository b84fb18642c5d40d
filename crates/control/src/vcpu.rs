//! The per-vCPU control block and the operations controllers call.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, OnceLock};

use crate::counters::Counters;
use crate::idle_queue::SharedIdle;
use crate::mode::AtomicMode;
use crate::oneshot;
use crate::pool::Scheduler;
use crate::state::{StateWatch, VcpuState};
use crate::sync::{self, AtomicU32, Condvar, Mutex, MutexGuard};
use crate::work::{work, RunOnTicket, Who, Work};
use crate::{Deadline, Error, Guest, Interrupt, Mode, Op, Request};

/// State behind the mutex: only the slow paths (park, halt, work) take it.
pub(crate) struct Slow<G> {
    /// A controller wants the vCPU parked.
    pub(crate) paused: bool,
    /// The vCPU thread is parked (acknowledges `paused`).
    pub(crate) parked: bool,
    /// The vCPU thread has left its loop.
    pub(crate) exited: bool,
    pub(crate) work: VecDeque<Work<G>>,
    /// Low-priority tasks that run only while the guest is halted.
    pub(crate) idle: VecDeque<Work<G>>,
    /// The idle group's queue, if this vCPU is in one.
    pub(crate) idle_group: Option<Arc<SharedIdle<G>>>,
    /// Controllers waiting in `wait_parked`: `resume` wakes them only
    /// when there are some (a condvar notify is a syscall).
    pub(crate) stop_waiters: usize,
    /// While parked: the guest had executed HLT and was not woken (user
    /// irqchip), so it resumes halted. Before `run`: start halted (a
    /// restored vCPU that was halted when saved).
    pub(crate) guest_halted: bool,
    /// M:N: whether a wake must queue the vCPU for a pool thread.
    pub(crate) whereabouts: Whereabouts,
}

/// Where an M:N vCPU is, as a wake needs to know (a 1:1 vCPU is always
/// `Held`: its thread waits on `vcpu_cv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Whereabouts {
    /// On a thread, or in the pool's run queue: a wake has nothing to do
    /// (the loop looks at requests before its next wait or entry).
    Held,
    /// Halted or parked on no thread, in no queue: a wake queues it.
    Off,
    /// Halted, in the pool's low-priority queue for its idle tasks: a
    /// wake moves it to the run queue.
    IdleQueued,
}

/// What a wake is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wake {
    /// A request, a resume: the vCPU must run.
    Run,
    /// An idle task for a halted vCPU: it may wait for a free thread.
    Idle,
}

/// The control block of one vCPU, shared (in an `Arc`) between its thread
/// and any number of controllers.
pub struct VcpuCtl<G> {
    id: usize,
    pub(crate) mode: AtomicMode,
    pub(crate) requests: AtomicU32,
    pub(crate) slow: Mutex<Slow<G>>,
    /// The vCPU thread waits here when halted or parked.
    pub(crate) vcpu_cv: Condvar,
    /// Controllers wait here for `parked` / `exited`.
    pub(crate) ack_cv: Condvar,
    /// How to kick the thread that runs the vCPU now. Replaced only while
    /// the vCPU is not in the guest and no kicker is between its look at
    /// the mode and its signal (see [`VcpuCtl::leave_thread`]).
    pub(crate) interrupt: Mutex<Option<Box<dyn Interrupt>>>,
    /// M:N: the pool that runs this vCPU (set once, before it first runs).
    pub(crate) sched: OnceLock<Arc<Scheduler>>,
    /// Set by the first `run`; a second one is refused.
    pub(crate) started: std::sync::atomic::AtomicBool,
    /// Kickers between their look at `mode` and the end of their signal.
    /// The vCPU thread waits for none to be left before it leaves `run`,
    /// so no kick signal is ever sent to a thread id that may be reused.
    pub(crate) kickers: AtomicU32,
    pub(crate) counters: Counters,
    pub(crate) state: StateWatch,
    /// Model check only: enter with the broken order (see `run.rs`).
    #[cfg(loom)]
    pub(crate) model_broken_order: std::sync::atomic::AtomicBool,
    /// Model check only: parking takes every request bit (see `run.rs`).
    #[cfg(loom)]
    pub(crate) model_park_takes_all: std::sync::atomic::AtomicBool,
    /// Model check only: a thread hands the vCPU on without waiting for
    /// kickers (see `run.rs`).
    #[cfg(loom)]
    pub(crate) model_leave_without_waiting: std::sync::atomic::AtomicBool,
}

type Current = Cell<(*const (), *const ())>;

#[cfg(not(loom))]
thread_local! {
    /// On a vCPU thread: (its control block, its `RefCell<G>`), both as
    /// untyped pointers; lets `run_on` from that thread run inline.
    pub(crate) static CURRENT: Current = const { Cell::new((std::ptr::null(), std::ptr::null())) };
}

#[cfg(loom)]
loom::thread_local! {
    pub(crate) static CURRENT: Current = Cell::new((std::ptr::null(), std::ptr::null()));
}

impl<G> VcpuCtl<G> {
    /// A control block for vCPU `id`, not yet bound to a thread.
    pub fn new(id: usize) -> Self {
        VcpuCtl {
            id,
            mode: AtomicMode::new(Mode::Outside),
            requests: AtomicU32::new(0),
            slow: Mutex::new(Slow {
                paused: false,
                parked: false,
                exited: false,
                work: VecDeque::new(),
                idle: VecDeque::new(),
                idle_group: None,
                stop_waiters: 0,
                guest_halted: false,
                whereabouts: Whereabouts::Held,
            }),
            vcpu_cv: Condvar::new(),
            ack_cv: Condvar::new(),
            interrupt: Mutex::new(None),
            sched: OnceLock::new(),
            started: std::sync::atomic::AtomicBool::new(false),
            kickers: AtomicU32::new(0),
            counters: Counters::default(),
            state: StateWatch::new(),
            #[cfg(loom)]
            model_broken_order: std::sync::atomic::AtomicBool::new(false),
            #[cfg(loom)]
            model_park_takes_all: std::sync::atomic::AtomicBool::new(false),
            #[cfg(loom)]
            model_leave_without_waiting: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The vCPU index.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Where the vCPU thread is now.
    pub fn mode(&self) -> Mode {
        self.mode.load()
    }

    /// Coarse state: running, halted, parked, exited.
    pub fn state(&self) -> VcpuState {
        self.state.get()
    }

    /// An eventfd that becomes readable whenever [`VcpuCtl::state`] changes
    /// (put it in an epoll set; read it with [`VcpuCtl::take_transitions`]).
    /// Owned by the control block: do not close it.
    pub fn state_fd(&self) -> std::os::fd::RawFd {
        self.state.raw_fd()
    }

    /// State changes since the last call, resetting the eventfd (0 if none).
    pub fn take_transitions(&self) -> u64 {
        self.state.take_transitions()
    }

    /// Live counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Whether a controller has asked this vCPU to stay parked.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Whether the vCPU is parked (acknowledged a stop).
    pub fn is_parked(&self) -> bool {
        self.lock().parked
    }

    /// Whether the guest is halted in user space (executed HLT with no
    /// in-kernel irqchip and was not woken): known while the vCPU is
    /// parked, `None` otherwise. Part of a vCPU's saved state.
    pub fn halted_while_parked(&self) -> Option<bool> {
        let slow = self.lock();
        // A kick posted while parked ends the halt at the resume.
        let kicked = self.requests.load(SeqCst) & Request::Kick.bit() != 0;
        slow.parked.then_some(slow.guest_halted && !kicked)
    }

    /// Make the vCPU park before its first entry (a VM restored paused):
    /// [`VcpuCtl::resume`] lets it go. Call before [`VcpuCtl::run`].
    pub fn start_paused(&self) {
        self.lock().paused = true;
        self.requests.fetch_or(Request::Stop.bit(), SeqCst);
    }

    /// Make the vCPU start halted, as if it had executed HLT (a restored
    /// vCPU that was halted when saved): only a kick or a deliverable
    /// interrupt lets it go on. Call before [`VcpuCtl::run`].
    pub fn start_halted(&self) {
        self.lock().guest_halted = true;
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Slow<G>> {
        sync::lock(&self.slow)
    }

    /// Post `req` and make sure the vCPU notices before (or right after) its
    /// next guest entry. Signals only if the vCPU is in the guest and no one
    /// else has signalled this entry.
    pub fn kick(&self, req: Request) {
        Counters::bump(&self.counters.kicks);
        // Dekker, requester side: publish the request, then look at the mode.
        self.requests.fetch_or(req.bit(), SeqCst);
        sync::dekker_fence();
        let seen = match self.mode.load() {
            Mode::InGuest => self.claim_and_signal(),
            other => Err(other),
        };
        match seen {
            Ok(()) => {}
            // A preemption is for a vCPU in the guest: one that halted or
            // parked meanwhile has given its thread back already.
            Err(Mode::Halted) | Err(Mode::Parked) if req == Request::Preempt => {
                Counters::bump(&self.counters.signals_elided)
            }
            Err(Mode::Halted) | Err(Mode::Parked) => {
                // Blocked in user space: a futex wake, never a signal.
                // Taking the lock orders us after its store of the mode, so
                // the notify cannot slip in before it waits.
                Counters::bump(&self.counters.signals_elided);
                Counters::bump(&self.counters.wakeups);
                let mut slow = self.lock();
                self.wake(&mut slow, Wake::Run);
            }
            // Outside: it checks requests before entering. Exiting: already
            // signalled. Exited: nobody to tell.
            Err(_) => Counters::bump(&self.counters.signals_elided),
        }
    }

    /// `InGuest -> Exiting`, and the signal if we won. Counted in `kickers`
    /// from before the compare-and-swap to after the signal: the vCPU
    /// thread stores `Exited`, then waits for `kickers == 0`, so a kicker
    /// it did not wait for finds `Exited` and sends nothing (SeqCst).
    fn claim_and_signal(&self) -> Result<(), Mode> {
        self.kickers.fetch_add(1, SeqCst);
        // Dekker with the exit guard (mode, then kickers).
        sync::dekker_fence();
        let claimed = self.mode.claim_exit();
        if claimed.is_ok() {
            // We won InGuest -> Exiting: ours is the one signal.
            Counters::bump(&self.counters.signals_sent);
            sync::lock(&self.interrupt)
                .as_ref()
                .expect("a vCPU is InGuest only after its thread bound its interrupt")
                .interrupt();
        }
        self.kickers.fetch_sub(1, SeqCst);
        claimed
    }

    /// Ask the vCPU to park outside guest mode; returns once it has, with
    /// any half-done PIO/MMIO completed. Stopping a parked vCPU costs no
    /// signal and no wake-up.
    pub fn stop(&self, deadline: Deadline) -> Result<(), Error> {
        if self.begin_stop(Op::Stop)? {
            self.wait_parked(Op::Stop, deadline)?;
        }
        Ok(())
    }

    /// Mark paused; kick unless already parked. Returns whether a wait is
    /// needed. On the vCPU's own thread it fails at once and marks nothing:
    /// that thread cannot park while it waits for itself.
    pub(crate) fn begin_stop(&self, op: Op) -> Result<bool, Error> {
        if self.on_own_thread().is_some() {
            return Err(Error::OwnThread { op, vcpu: self.id });
        }
        {
            let mut slow = self.lock();
            if slow.exited {
                return Err(Error::Exited { op, vcpu: self.id });
            }
            slow.paused = true;
            if slow.parked {
                Counters::bump(&self.counters.kicks);
                Counters::bump(&self.counters.signals_elided);
                return Ok(false);
            }
        }
        self.kick(Request::Stop);
        Ok(true)
    }

    pub(crate) fn wait_parked(&self, op: Op, deadline: Deadline) -> Result<(), Error> {
        let mut slow = self.lock();
        slow.stop_waiters += 1;
        let mut slow = sync::wait_until(&self.ack_cv, slow, deadline, |s| {
            !s.paused || s.parked || s.exited
        });
        slow.stop_waiters -= 1;
        if slow.parked || !slow.paused {
            // Parked, or someone resumed it meanwhile: either way our stop
            // is no longer pending.
            Ok(())
        } else if slow.exited {
            Err(Error::Exited { op, vcpu: self.id })
        } else {
            Err(Error::Timeout {
                op,
                vcpus: vec![self.id],
            })
        }
    }

    /// Let a stopped vCPU run again. No signal: a parked thread waits on a
    /// condition variable. A `stop` still waiting for the park is woken
    /// too: its stop is no longer pending.
    pub fn resume(&self) {
        let mut slow = self.lock();
        slow.paused = false;
        self.wake(&mut slow, Wake::Run);
        if slow.stop_waiters > 0 {
            self.ack_cv.notify_all();
        }
    }

    /// Ask the vCPU thread to leave its run loop (from any state).
    pub fn request_exit(&self) {
        self.kick(Request::Exit);
    }

    /// Model check only: make this vCPU check requests *before* publishing
    /// InGuest, the lost-kick bug the model must catch.
    #[cfg(loom)]
    pub fn model_break_entry_order(&self) {
        self.model_broken_order
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Model check only: make a thread hand this vCPU on without waiting
    /// for kickers, so a late kick signals a thread that no longer runs it.
    #[cfg(loom)]
    pub fn model_break_leave(&self) {
        self.model_leave_without_waiting
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Wake the vCPU from a halt or a park, under its lock (which orders
    /// us after its store of the mode, so it cannot be about to wait with
    /// the news unseen). A 1:1 vCPU waits on `vcpu_cv`; an M:N vCPU on no
    /// thread is queued for a pool thread instead, which costs no syscall
    /// unless a pool thread sleeps.
    pub(crate) fn wake(&self, slow: &mut Slow<G>, why: Wake) {
        let Some(sched) = self.sched.get() else {
            self.vcpu_cv.notify_all();
            return;
        };
        match (slow.whereabouts, why) {
            (Whereabouts::Held, _) | (Whereabouts::IdleQueued, Wake::Idle) => {}
            (Whereabouts::Off, Wake::Run) => {
                slow.whereabouts = Whereabouts::Held;
                sched.queue_run(self.id);
            }
            (Whereabouts::Off, Wake::Idle) => {
                slow.whereabouts = Whereabouts::IdleQueued;
                sched.queue_idle(self.id);
            }
            (Whereabouts::IdleQueued, Wake::Run) => {
                slow.whereabouts = Whereabouts::Held;
                sched.promote(self.id);
            }
        }
    }

    /// Model check only: make parking swallow every request bit, the lost
    /// wake-up of the review's finding 1, which the model must catch.
    #[cfg(loom)]
    pub fn model_break_park(&self) {
        self.model_park_takes_all
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the calling thread is this vCPU's own thread.
    pub(crate) fn on_own_thread(&self) -> Option<*const RefCell<G>> {
        let (ctl, guest) = CURRENT.with(|c| c.get());
        (ctl == self as *const Self as *const ()).then_some(guest as *const RefCell<G>)
    }
}

impl<G: Guest> VcpuCtl<G> {
    /// Run `f` on the vCPU thread, outside guest mode, and return its result.
    /// From the vCPU's own thread `f` runs inline.
    pub fn run_on<R, F>(&self, f: F, deadline: Deadline) -> Result<R, Error>
    where
        F: FnOnce(&mut G) -> R + Send + 'static,
        R: Send + 'static,
    {
        if let Some(cell) = self.on_own_thread() {
            // SAFETY: CURRENT holds this control block's address only while
            // `run` is executing on this thread with the `RefCell<G>` it
            // points to alive on that thread's stack, and `G` is the type
            // `run` was called with (it is part of `Self`'s type).
            let cell = unsafe { &*cell };
            let mut guest = cell
                .try_borrow_mut()
                .map_err(|_| Error::Reentrant { vcpu: self.id })?;
            // A panic here unwinds into the caller, which is on this thread.
            return Ok(f(&mut guest));
        }
        self.run_on_async(f)?.wait(deadline)
    }

    /// Queue `f` to run on the vCPU thread and kick it; does not wait. Work
    /// still queued when the thread exits is dropped unrun, and its ticket
    /// reports [`Error::Exited`].
    pub fn run_on_async<R, F>(&self, f: F) -> Result<RunOnTicket<R>, Error>
    where
        F: FnOnce(&mut G) -> R + Send + 'static,
        R: Send + 'static,
    {
        let (ticket, slow) = self.enqueue(f, |s| &mut s.work)?;
        drop(slow);
        self.kick(Request::Work);
        Ok(ticket)
    }

    /// Queue `f` to run on the vCPU thread only while its guest is halted
    /// (low priority: never kicks the guest out; [`VcpuCtl::run_on`] is the
    /// path that preempts). Tasks should be short: a kick, stop or due
    /// interrupt waits for the running task to return. Tasks still queued
    /// when the thread exits are dropped (their tickets report Exited).
    pub fn run_when_idle<R, F>(&self, f: F) -> Result<RunOnTicket<R>, Error>
    where
        F: FnOnce(&mut G) -> R + Send + 'static,
        R: Send + 'static,
    {
        let (ticket, mut slow) = self.enqueue(f, |s| &mut s.idle)?;
        // A halted vCPU waits on this condvar with the lock released and
        // re-checks the queue: no request bit, no signal.
        if self.mode.load() == Mode::Halted {
            self.wake(&mut slow, Wake::Idle);
        }
        Ok(ticket)
    }

    /// Push `f` (wrapped to send its result) on the queue `queue` selects,
    /// unless the thread has exited; returns the ticket and the held lock.
    fn enqueue<R, F>(
        &self,
        f: F,
        queue: impl FnOnce(&mut Slow<G>) -> &mut VecDeque<Work<G>>,
    ) -> Result<(RunOnTicket<R>, MutexGuard<'_, Slow<G>>), Error>
    where
        F: FnOnce(&mut G) -> R + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let mut slow = self.lock();
        if slow.exited {
            return Err(Error::Exited {
                op: Op::RunOn,
                vcpu: self.id,
            });
        }
        // The waiter may have given up; the result is then dropped.
        queue(&mut slow).push_back(work(f, tx));
        Ok((RunOnTicket::new(Who::One(self.id), rx), slow))
    }
}
