//! The vCPU thread's loop: requests, the Dekker entry, exits.

use std::cell::RefCell;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Instant;

use crate::counters::Counters;
use crate::requests::{ENDS_HALT, WAKES_PARKED};
use crate::state::VcpuState;
use crate::sync;
use crate::vcpu::CURRENT;
use crate::{Classify, Flow, Guest, Mode, Request, VcpuCtl};

/// Why [`VcpuCtl::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// A controller called [`VcpuCtl::request_exit`].
    ExitRequested,
    /// The exit handler returned [`Flow::Exit`].
    GuestDone,
}

/// Marks the vCPU exited however `run` ends (return, error or panic), so no
/// controller waits for a thread that is gone.
struct ExitGuard<'a, G>(&'a VcpuCtl<G>);

impl<G> Drop for ExitGuard<'_, G> {
    fn drop(&mut self) {
        let ctl = self.0;
        CURRENT.with(|c| c.set((std::ptr::null(), std::ptr::null())));
        ctl.mode.store(Mode::Exited);
        ctl.state.set(VcpuState::Exited);
        let orphans = {
            let mut slow = ctl.lock();
            slow.exited = true;
            slow.parked = false;
            let mut orphans = std::mem::take(&mut slow.work);
            orphans.append(&mut slow.idle);
            if let Some(shared) = ctl.shared_idle.get() {
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

impl<G: Guest> VcpuCtl<G> {
    /// The vCPU thread's loop. Call it on the thread that will own `guest`;
    /// returns when a controller asks it to exit, when `on_exit` returns
    /// [`Flow::Exit`], or with the first error from the guest or handler.
    ///
    /// The exit path touches only atomics: the mutex is taken only to park,
    /// halt or run work.
    pub fn run<H>(&self, guest: G, mut on_exit: H) -> Result<RunEnd, G::Error>
    where
        H: FnMut(&mut G, G::Exit) -> Result<Flow, G::Error>,
    {
        let guest = RefCell::new(guest);
        let interrupt = guest.borrow_mut().bind_thread();
        // One thread per control block: a second `run` keeps the first binding.
        let _ = self.interrupt.set(interrupt);
        let _exit_guard = ExitGuard(self);
        self.state.set(VcpuState::Running);
        CURRENT.with(|c| {
            c.set((
                self as *const Self as *const (),
                &guest as *const RefCell<G> as *const (),
            ))
        });

        let mut halted = false;
        loop {
            // 1. Take and handle pending requests. A plain load first: the
            // common case (nothing pending) costs no locked instruction, and
            // a request that lands after it is caught at step 3.
            if self.requests.load(SeqCst) != 0 {
                let req = self.requests.swap(0, SeqCst);
                if let Some(end) = self.handle_requests(req, &guest)? {
                    return Ok(end);
                }
                if req & ENDS_HALT != 0 {
                    halted = false;
                }
            }
            if halted {
                // HLT with no interrupt controller in the kernel: block in
                // user space until a request; only a kick or an interrupt
                // lets the guest continue after its HLT.
                self.halt_wait(&guest);
                continue;
            }

            let mut g = guest.borrow_mut();
            // 2. Clear immediate_exit *before* publishing InGuest: a signal
            // sent for this entry must find the flag cleared already.
            g.set_immediate_exit(false);
            // 3. Publish InGuest, then look at requests.
            if self.publish_in_guest() {
                self.mode.store(Mode::Outside);
                Counters::bump_own(&self.counters.cancelled_entries);
                continue;
            }
            // 4. Enter.
            Counters::bump_own(&self.counters.entries);
            let result = g.enter();
            self.mode.store(Mode::Outside);
            match result? {
                None if self.requests.load(SeqCst) != 0 => {
                    Counters::bump_own(&self.counters.kicked_exits)
                }
                None => Counters::bump_own(&self.counters.spurious_exits),
                Some(exit) => {
                    self.counters.exit(exit.kind());
                    match on_exit(&mut g, exit)? {
                        Flow::Continue => {}
                        Flow::Halt => halted = true,
                        Flow::Exit => return Ok(RunEnd::GuestDone),
                    }
                }
            }
        }
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

    fn handle_requests(&self, req: u32, guest: &RefCell<G>) -> Result<Option<RunEnd>, G::Error> {
        if req & Request::Exit.bit() != 0 {
            return Ok(Some(RunEnd::ExitRequested));
        }
        if req & (Request::Stop.bit() | Request::Work.bit()) != 0 {
            // Parked vCPUs and run_on closures must see a finished
            // instruction, not a PIO-in whose data is still in flight.
            guest.borrow_mut().settle()?;
        }
        if req & Request::Work.bit() != 0 {
            self.run_work(guest);
        }
        if req & Request::Stop.bit() != 0 {
            return Ok(self.park(guest));
        }
        Ok(None)
    }

    fn run_work(&self, guest: &RefCell<G>) {
        loop {
            // Pop under the lock, run without it: work may call back into
            // this control block (e.g. read counters or modes).
            let Some(work) = self.lock().work.pop_front() else {
                return;
            };
            // Counted first, so a waiter that has its result sees the count.
            Counters::bump_own(&self.counters.work_run);
            work(&mut guest.borrow_mut());
        }
    }

    /// Stay parked while paused, running work items as they come. Returns
    /// `Some` if asked to exit while parked.
    fn park(&self, guest: &RefCell<G>) -> Option<RunEnd> {
        let start = Instant::now();
        let mut slow = self.lock();
        if !slow.paused {
            return None; // resumed before we got here
        }
        slow.parked = true;
        self.state.set(VcpuState::Parked);
        self.ack_cv.notify_all();
        loop {
            // The mode is stored under the lock so a kicker that sees
            // Parked, then takes the lock to notify, cannot miss our wait.
            self.mode.store(Mode::Parked);
            sync::dekker_fence();
            slow = sync::wait_while(&self.vcpu_cv, slow, |s| {
                s.paused && self.requests.load(SeqCst) & WAKES_PARKED == 0
            });
            self.mode.store(Mode::Outside);
            if !slow.paused {
                break;
            }
            drop(slow);
            let req = self.requests.swap(0, SeqCst);
            if req & Request::Exit.bit() != 0 {
                // Still parked: the exit guard clears `parked` and wakes waiters.
                Self::add_ns(&self.counters.parked_ns, start);
                return Some(RunEnd::ExitRequested);
            }
            if req & Request::Work.bit() != 0 {
                self.run_work(guest);
            }
            slow = self.lock();
        }
        slow.parked = false;
        self.state.set(VcpuState::Running);
        drop(slow);
        Self::add_ns(&self.counters.parked_ns, start);
        None
    }

    /// Block while the guest is halted (mode Halted) until a request
    /// arrives, running idle-time tasks meanwhile. A request ends the idle
    /// stretch between two tasks, so a task delays a due kick, stop or
    /// interrupt by at most its own length.
    fn halt_wait(&self, guest: &RefCell<G>) {
        let start = Instant::now();
        let mut slow = self.lock();
        self.state.set(VcpuState::Halted);
        self.mode.store(Mode::Halted);
        sync::dekker_fence();
        loop {
            // The group may be formed while we wait: look it up each time.
            let shared = || self.shared_idle.get();
            slow = sync::wait_while(&self.vcpu_cv, slow, |s| {
                self.requests.load(SeqCst) == 0
                    && s.idle.is_empty()
                    && !shared().is_some_and(|q| q.has_work())
            });
            if self.requests.load(SeqCst) != 0 {
                break;
            }
            // Own tasks first, then the idle group's.
            let Some(task) = slow.idle.pop_front().or_else(|| shared()?.pop()) else {
                continue;
            };
            // Still Halted while the task runs: a kicker wakes us the same
            // way, and we look at requests as soon as it returns.
            drop(slow);
            Counters::bump_own(&self.counters.idle_tasks);
            let t = Instant::now();
            task(&mut guest.borrow_mut());
            Self::add_ns(&self.counters.idle_task_ns, t);
            slow = self.lock();
        }
        self.mode.store(Mode::Outside);
        self.state.set(VcpuState::Running);
        drop(slow);
        Self::add_ns(&self.counters.halted_ns, start);
    }
}
