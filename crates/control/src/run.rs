//! The vCPU thread's loop: requests, the Dekker entry, exits.
//!
//! A request bit is consumed only by the code that acts on it: the top of
//! the loop takes every bit (it acts on each), a parked vCPU takes only
//! Work and Exit, so a Kick or Interrupt that arrives while parked is still
//! there when the vCPU resumes, whatever ran in between.

use std::cell::RefCell;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Instant;

use crate::counters::Counters;
use crate::pool::Scheduler;
use crate::requests::WAKES_PARKED;
use crate::state::VcpuState;
use crate::sync;
use crate::vcpu::{Whereabouts, CURRENT};
use crate::{Classify, Flow, Guest, Mode, Request, RunError, VcpuCtl};

/// Why [`VcpuCtl::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// A controller called [`VcpuCtl::request_exit`].
    ExitRequested,
    /// The exit handler returned [`Flow::Exit`].
    GuestDone,
}

/// How many exits completing one half-done access may take before a park
/// gives up waiting for it (a split MMIO access takes two; string PIO one
/// per batch). Past it the access completes on the next entry instead:
/// the vCPU is never failed for it.
const MAX_SETTLE_EXITS: usize = 64;

/// Why the loop handed its thread back without ending (M:N only: a 1:1
/// vCPU blocks on its own thread instead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leave {
    /// Halted with nothing to do: on no thread until a wake.
    Halted,
    /// Halted, with idle tasks left for when no vCPU waits to run.
    HaltedIdle,
    /// Parked for a controller: on no thread until a resume or work.
    Parked,
    /// Its time slice ended while another vCPU waited: back in the queue.
    Preempted,
}

/// What one stretch of the loop on one thread ended with.
pub(crate) enum Step {
    End(RunEnd),
    Away(Leave),
}

/// Where the loop was, kept while the vCPU is on no thread (M:N).
#[derive(Default)]
pub(crate) struct LoopState {
    /// The guest executed HLT and has not been woken (user irqchip).
    pub(crate) halted: bool,
    /// Inside a park (between acknowledging the stop and the resume).
    pub(crate) in_park: bool,
    /// When the current halt and park began, for their counters.
    halt_since: Option<Instant>,
    park_since: Option<Instant>,
}

impl<G> VcpuCtl<G> {
    /// The thread is about to stop running this vCPU (it leaves the loop
    /// for good, or hands the vCPU to another thread). `mode` is already
    /// published (Halted, Parked) or is published here (Outside, Exited).
    /// A kicker that read InGuest may still be about to signal this
    /// thread; once none is left, every later kicker reads the new mode,
    /// which asks for no signal. So no kick signal reaches this thread
    /// for this vCPU once it has gone on to other work (or exited and its
    /// id is reused).
    pub(crate) fn leave_thread(&self, publish: Option<Mode>) {
        CURRENT.with(|c| c.set((std::ptr::null(), std::ptr::null())));
        if let Some(mode) = publish {
            self.mode.store(mode);
        }
        // Dekker with `claim_and_signal` (kickers, then mode).
        sync::dekker_fence();
        while self.kickers.load(SeqCst) != 0 {
            #[cfg(loom)]
            if self
                .model_leave_without_waiting
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                break;
            }
            sync::yield_now();
        }
    }

    /// The end of the vCPU's loop (return, error or panic): no controller
    /// waits for a thread that is gone, and unrun work is dropped.
    pub(crate) fn finish_run(&self) {
        let ctl = self;
        ctl.leave_thread(Some(Mode::Exited));
        ctl.state.set(VcpuState::Exited);
        let orphans = {
            let mut slow = ctl.lock();
            slow.exited = true;
            slow.parked = false;
            let mut orphans = std::mem::take(&mut slow.work);
            orphans.append(&mut slow.idle);
            if let Some(shared) = &slow.idle_group {
                orphans.append(&mut shared.member_exited());
            }
            orphans
        };
        // Dropping unrun work drops its result senders: run_on waiters see
        // `Exited` at once instead of waiting out their deadline.
        drop(orphans);
        ctl.ack_cv.notify_all();
    }
}

/// Marks the vCPU exited however `run` ends (return, error or panic), so no
/// controller waits for a thread that is gone.
struct ExitGuard<'a, G>(&'a VcpuCtl<G>);

impl<G> Drop for ExitGuard<'_, G> {
    fn drop(&mut self) {
        self.0.finish_run();
    }
}

impl<G: Guest> VcpuCtl<G> {
    /// The vCPU thread's loop. Call it on the thread that will own `guest`;
    /// returns when a controller asks it to exit, when `on_exit` returns
    /// [`Flow::Exit`], or with the first error from the guest or handler.
    /// A control block runs once: a second call is refused.
    ///
    /// The exit path touches only atomics: the mutex is taken only to park,
    /// halt or run work.
    pub fn run<H>(&self, guest: G, on_exit: H) -> Result<RunEnd, RunError<G::Error>>
    where
        H: FnMut(&mut G, G::Exit) -> Result<Flow, G::Error>,
    {
        if self.started.swap(true, SeqCst) {
            return Err(RunError::AlreadyStarted { vcpu: self.id() });
        }
        let guest = RefCell::new(guest);
        self.bind(&guest);
        let _exit_guard = ExitGuard(self);
        let mut lp = Loop {
            ctl: self,
            guest: &guest,
            on_exit,
            st: self.first_entry(),
            sched: None,
        };
        match lp.run().map_err(RunError::Guest)? {
            Step::End(end) => Ok(end),
            Step::Away(_) => unreachable!("a vCPU with a thread of its own never leaves it"),
        }
    }

    /// Make the calling thread this vCPU's: kicks signal it, and `run_on`
    /// from it runs inline. The caller has no other vCPU bound.
    pub(crate) fn bind(&self, guest: &RefCell<G>) {
        let interrupt = guest.borrow_mut().bind_thread();
        // Nobody reads it now: it is read only by a kicker that wins
        // InGuest -> Exiting, and the vCPU publishes InGuest after this.
        *sync::lock(&self.interrupt) = Some(interrupt);
        CURRENT.with(|c| {
            c.set((
                self as *const Self as *const (),
                guest as *const RefCell<G> as *const (),
            ))
        });
    }

    /// The loop's state at its first entry (a restored vCPU may start
    /// halted).
    pub(crate) fn first_entry(&self) -> LoopState {
        self.state.set(VcpuState::Running);
        LoopState {
            halted: std::mem::take(&mut self.lock().guest_halted),
            ..LoopState::default()
        }
    }

    /// Run the loop on this thread until the vCPU ends or leaves the
    /// thread (M:N): the pool's part of `run`.
    pub(crate) fn run_stretch<H>(
        &self,
        guest: &RefCell<G>,
        on_exit: H,
        st: &mut LoopState,
        sched: &Scheduler,
    ) -> Result<Step, G::Error>
    where
        H: FnMut(&mut G, G::Exit) -> Result<Flow, G::Error>,
    {
        let mut lp = Loop {
            ctl: self,
            guest,
            on_exit,
            st: std::mem::take(st),
            sched: Some(sched),
        };
        let step = lp.run();
        *st = lp.st;
        step
    }

    /// Dekker, vCPU side: store `mode = InGuest`, then load `requests`.
    /// Returns whether a request is pending (the entry must not happen).
    #[inline]
    fn publish_in_guest(&self) -> bool {
        #[cfg(loom)]
        if self
            .model_broken_order
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            // The bug of seed 004: look at requests, *then* publish. A kick
            // in between sees "not in guest", sends nothing, and is lost.
            let pending = self.requests.load(SeqCst) != 0;
            self.mode.store(Mode::InGuest);
            return pending;
        }
        self.mode.store(Mode::InGuest);
        sync::dekker_fence();
        self.requests.load(SeqCst) != 0
    }

    /// Take the request bits in `mask` (and only those).
    fn take(&self, mask: u32) -> u32 {
        #[cfg(loom)]
        if self
            .model_park_takes_all
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            // Finding 1 of the review: parking swallows every bit.
            return self.requests.swap(0, SeqCst);
        }
        self.requests.fetch_and(!mask, SeqCst) & mask
    }

    /// Time spent blocked, for the parked/halted counters.
    fn add_ns(counter: &std::sync::atomic::AtomicU64, since: Instant) {
        let ns = since.elapsed().as_nanos() as u64;
        counter.fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One run of the loop: the control block, the guest and the handler.
struct Loop<'a, G: Guest, H> {
    ctl: &'a VcpuCtl<G>,
    guest: &'a RefCell<G>,
    on_exit: H,
    st: LoopState,
    /// M:N: the pool's scheduler. Where a 1:1 vCPU blocks on its thread,
    /// a pooled one leaves it ([`Step::Away`]).
    sched: Option<&'a Scheduler>,
}

impl<G: Guest, H> Loop<'_, G, H>
where
    H: FnMut(&mut G, G::Exit) -> Result<Flow, G::Error>,
{
    fn run(&mut self) -> Result<Step, G::Error> {
        let ctl = self.ctl;
        loop {
            // 0. M:N: back on a thread inside a park.
            if self.st.in_park {
                if let Some(step) = self.park_wait() {
                    return Ok(step);
                }
            }
            // 1. Take and handle pending requests. A plain load first: the
            // common case (nothing pending) costs no locked instruction, and
            // a request that lands after it is caught at step 3.
            if ctl.requests.load(SeqCst) != 0 {
                let req = ctl.requests.swap(0, SeqCst);
                if let Some(step) = self.serve(req)? {
                    return Ok(step);
                }
            }
            if self.st.halted {
                // HLT with no interrupt controller in the kernel: block in
                // user space until a request; only a kick or a deliverable
                // interrupt lets the guest continue after its HLT.
                if let Some(step) = self.halt_wait() {
                    return Ok(step);
                }
                continue;
            }

            let mut g = self.guest.borrow_mut();
            // 2. Clear immediate_exit *before* publishing InGuest: a signal
            // sent for this entry must find the flag cleared already.
            g.set_immediate_exit(false);
            // 3. Publish InGuest, then look at requests.
            if ctl.publish_in_guest() {
                ctl.mode.store_release(Mode::Outside);
                Counters::bump_own(&ctl.counters.cancelled_entries);
                continue;
            }
            // 4. Enter.
            Counters::bump_own(&ctl.counters.entries);
            let result = g.enter();
            ctl.mode.store_release(Mode::Outside);
            match result? {
                None if ctl.requests.load(SeqCst) != 0 => {
                    Counters::bump_own(&ctl.counters.kicked_exits)
                }
                None => Counters::bump_own(&ctl.counters.spurious_exits),
                Some(exit) => {
                    ctl.counters.exit(exit.kind());
                    let flow = (self.on_exit)(&mut g, exit)?;
                    if let Some(end) = self.flow(flow) {
                        return Ok(Step::End(end));
                    }
                }
            }
        }
    }

    /// Act on what the exit handler said; `Some` ends the loop.
    fn flow(&mut self, flow: Flow) -> Option<RunEnd> {
        match flow {
            Flow::Continue => None,
            Flow::Halt => {
                self.st.halted = true;
                None
            }
            Flow::Exit => Some(RunEnd::GuestDone),
        }
    }

    /// Act on the request bits `req`, all of which the caller took.
    fn serve(&mut self, req: u32) -> Result<Option<Step>, G::Error> {
        // M:N: a halt the vCPU left its thread in is counted up to here
        // (a park or work may follow); `halt_wait` opens a new stretch.
        if let Some(since) = self.st.halt_since.take() {
            VcpuCtl::<G>::add_ns(&self.ctl.counters.halted_ns, since);
        }
        if req & Request::Exit.bit() != 0 {
            return Ok(Some(Step::End(RunEnd::ExitRequested)));
        }
        if req & Request::Kick.bit() != 0 {
            // An explicit "re-enter": ends a halt (a spurious wake-up).
            self.end_halt();
        }
        if req & Request::Interrupt.bit() != 0
            && self.st.halted
            && self.guest.borrow().interrupt_deliverable()
        {
            self.end_halt();
        }
        if req & (Request::Stop.bit() | Request::Work.bit() | Request::Preempt.bit()) != 0 {
            // Parked vCPUs, run_on closures and the vCPU's next thread must
            // see a finished instruction, not a PIO-in whose data is still
            // in flight.
            if let Some(end) = self.settle()? {
                return Ok(Some(Step::End(end)));
            }
        }
        if req & Request::Work.bit() != 0 {
            self.run_work();
        }
        if req & Request::Stop.bit() != 0 {
            if let Some(step) = self.park() {
                return Ok(Some(step));
            }
        }
        // Last, so every other bit taken with it has been acted on. A
        // halted vCPU leaves at its halt instead (or yields between idle
        // tasks), never into the run queue.
        if req & Request::Preempt.bit() != 0
            && !self.st.halted
            && self.sched.is_some_and(|s| s.others_waiting())
        {
            return Ok(Some(Step::Away(Leave::Preempted)));
        }
        Ok(None)
    }

    /// The guest goes on after its HLT. A 1:1 vCPU published Running as
    /// it left `halt_wait`; an M:N vCPU that left its thread halted comes
    /// back here still Halted (a no-op otherwise: no transition).
    fn end_halt(&mut self) {
        self.st.halted = false;
        self.ctl.state.set(VcpuState::Running);
    }

    /// Complete a half-done access, serving the exits that takes (bounded).
    fn settle(&mut self) -> Result<Option<RunEnd>, G::Error> {
        for _ in 0..MAX_SETTLE_EXITS {
            let mut g = self.guest.borrow_mut();
            let Some(exit) = g.settle()? else {
                return Ok(None);
            };
            let counters = &self.ctl.counters;
            counters.exit(exit.kind());
            Counters::bump_own(&counters.settle_exits);
            let flow = (self.on_exit)(&mut g, exit)?;
            drop(g);
            if let Some(end) = self.flow(flow) {
                return Ok(Some(end));
            }
        }
        // Still not done: it completes on the next entry instead.
        Ok(None)
    }

    fn run_work(&self) {
        let ctl = self.ctl;
        loop {
            // Pop under the lock, run without it: work may call back into
            // this control block (e.g. read counters or modes).
            let Some(work) = ctl.lock().work.pop_front() else {
                return;
            };
            // Counted first, so a waiter that has its result sees the count.
            Counters::bump_own(&ctl.counters.work_run);
            work(&mut self.guest.borrow_mut(), ctl.id());
        }
    }

    /// Stay parked while paused, running work items as they come. Takes
    /// only the Work and Exit bits: any other request waits for the top of
    /// the loop after the resume. Returns `Some` if asked to exit, or (M:N)
    /// when the vCPU leaves its thread to wait parked on none.
    fn park(&mut self) -> Option<Step> {
        let ctl = self.ctl;
        let slow = ctl.lock();
        if !slow.paused {
            return None; // resumed before we got here (resume woke the stopper)
        }
        drop(slow);
        self.guest.borrow_mut().parking();
        ctl.state.set(VcpuState::Parked);
        let mut slow = ctl.lock();
        slow.parked = true;
        slow.guest_halted = self.st.halted;
        // Parked before the stopper can look: it returns seeing the mode.
        ctl.mode.store(Mode::Parked);
        ctl.ack_cv.notify_all();
        drop(slow);
        self.st.in_park = true;
        self.st.park_since = Some(Instant::now());
        self.park_wait()
    }

    /// The waiting part of a park (entered again by an M:N vCPU that comes
    /// back to a thread while parked, for work or the resume).
    fn park_wait(&mut self) -> Option<Step> {
        let ctl = self.ctl;
        let mut slow = ctl.lock();
        loop {
            // The mode is stored under the lock so a kicker that sees
            // Parked, then takes the lock to wake us, cannot miss our wait.
            ctl.mode.store(Mode::Parked);
            sync::dekker_fence();
            let idle = |s: &mut crate::vcpu::Slow<G>| {
                s.paused && ctl.requests.load(SeqCst) & WAKES_PARKED == 0
            };
            if self.sched.is_some() {
                if idle(&mut slow) {
                    // A wake (resume, work, exit) finds us on no thread
                    // and queues us; the mode stays Parked.
                    slow.whereabouts = Whereabouts::Off;
                    return Some(Step::Away(Leave::Parked));
                }
            } else {
                slow = sync::wait_while(&ctl.vcpu_cv, slow, idle);
            }
            ctl.mode.store(Mode::Outside);
            if !slow.paused {
                break;
            }
            drop(slow);
            let req = ctl.take(WAKES_PARKED);
            if req & Request::Exit.bit() != 0 {
                self.end_park();
                return Some(Step::End(RunEnd::ExitRequested));
            }
            if req & Request::Work.bit() != 0 {
                self.run_work();
            }
            slow = ctl.lock();
        }
        slow.parked = false;
        drop(slow);
        ctl.state.set(VcpuState::Running);
        self.end_park();
        None
    }

    fn end_park(&mut self) {
        self.st.in_park = false;
        if let Some(since) = self.st.park_since.take() {
            VcpuCtl::<G>::add_ns(&self.ctl.counters.parked_ns, since);
        }
    }

    /// Block while the guest is halted (mode Halted) until a request
    /// arrives, running idle-time tasks meanwhile. A request ends the idle
    /// stretch between two tasks, so a task delays a due kick, stop or
    /// interrupt by at most its own length. M:N: instead of blocking, the
    /// vCPU leaves its thread (`Some`), and it lets a vCPU waiting to run
    /// go first before each idle task.
    fn halt_wait(&mut self) -> Option<Step> {
        let ctl = self.ctl;
        self.st.halt_since.get_or_insert_with(Instant::now);
        // The eventfd write is a syscall: not under the lock kickers take.
        ctl.state.set(VcpuState::Halted);
        let mut slow = ctl.lock();
        ctl.mode.store(Mode::Halted);
        sync::dekker_fence();
        let nothing_to_do = |s: &mut crate::vcpu::Slow<G>| {
            ctl.requests.load(SeqCst) == 0
                && s.idle.is_empty()
                && !s.idle_group.as_ref().is_some_and(|q| q.has_work())
        };
        // M:N: one idle task per stretch runs whoever waits, so idle
        // tasks are not starved by vCPUs that never halt.
        let mut ran_a_task = false;
        loop {
            match self.sched {
                Some(sched) => {
                    if nothing_to_do(&mut slow) {
                        // A kick finds us on no thread and queues us; the
                        // mode stays Halted.
                        slow.whereabouts = Whereabouts::Off;
                        return Some(Step::Away(Leave::Halted));
                    }
                    if ctl.requests.load(SeqCst) == 0 && ran_a_task && sched.others_waiting() {
                        // Idle tasks wait for a thread no vCPU needs.
                        // Queued under our lock, so a kick that finds us
                        // there can move us up (`promote`).
                        slow.whereabouts = Whereabouts::IdleQueued;
                        sched.queue_idle(ctl.id());
                        return Some(Step::Away(Leave::HaltedIdle));
                    }
                }
                None => slow = sync::wait_while(&ctl.vcpu_cv, slow, nothing_to_do),
            }
            if ctl.requests.load(SeqCst) != 0 {
                break;
            }
            // Own tasks first, then the idle group's.
            let task = match slow.idle.pop_front() {
                Some(t) => Some(t),
                None => slow.idle_group.as_ref().and_then(|q| q.pop()),
            };
            let Some(task) = task else {
                continue;
            };
            // Still Halted while the task runs: a kicker wakes us the same
            // way, and we look at requests as soon as it returns.
            drop(slow);
            ran_a_task = true;
            Counters::bump_own(&ctl.counters.idle_tasks);
            let t = Instant::now();
            task(&mut self.guest.borrow_mut(), ctl.id());
            VcpuCtl::<G>::add_ns(&ctl.counters.idle_task_ns, t);
            slow = ctl.lock();
        }
        ctl.mode.store(Mode::Outside);
        drop(slow);
        ctl.state.set(VcpuState::Running);
        if let Some(since) = self.st.halt_since.take() {
            VcpuCtl::<G>::add_ns(&ctl.counters.halted_ns, since);
        }
        None
    }
}
