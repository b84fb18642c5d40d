//! The VM's life as one state ([`VmState`]), changed in one place.
//!
//! ```text
//!  Configured ──start──▶ Running ◀──────▶ Paused
//!                           │  ▲            │  ▲
//!                      hold │  │ guard   hold│  │ guard
//!                           ▼  │ drops       ▼  │ drops
//!       Held(Pausing | Resuming | Snapshot | Migration, Was::Running | Was::Paused)
//!
//!  any state ──end──▶ Ended(why)   (for good)
//! ```
//!
//! A VM restored paused goes from Running to Paused once its vCPUs,
//! started paused, have parked: before anyone else can see it.
//!
//! Whatever pauses, resumes or saves the VM first *holds* it
//! ([`Vm::hold`]): a checked transition from Running or Paused to `Held`,
//! under a lock held only for the transition, never while vCPUs park.
//! While it is held, pause and resume wait for it or are refused
//! ([`PauseError::Busy`], naming what holds it) — never inferred from a
//! lock being contended. The [`HeldVm`] guard stops the vCPUs when asked
//! and, when it drops (a panic unwinding included), resumes what it
//! stopped and puts the state back: no path leaves the VM paused by
//! accident or "busy" for good. An end (the guest powering off, a
//! migration's commit) wins over everything and is never undone.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use brisk_control::Deadline;
use brisk_devices::{GuestStop, StopSink};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vm::PauseError;
use crate::{Vm, VmEnd};

/// Where a VM is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Not started: being configured (Firecracker's pre-boot API, a
    /// `--wait-for-vm` brisk) or built; no vCPU runs.
    Configured,
    /// Its vCPUs run the guest.
    Running,
    /// Every vCPU is parked and the I/O engine too, until resumed.
    Paused,
    /// An operation has the VM to itself; pause and resume wait for it.
    /// What the VM was before (and is again after, unless the holder
    /// pauses or resumes it) is kept: Firecracker's API reports that.
    Held(Hold, Was),
    /// It ended, for good.
    Ended(VmEnd),
}

/// What holds a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// A pause on its way: the vCPUs are being parked.
    Pausing,
    /// A resume on its way.
    Resuming,
    /// A snapshot is being written (a live one from its first pass).
    Snapshot,
    /// An outgoing migration's stop-and-copy.
    Migration,
}

/// What a held VM was when the hold began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Was {
    Running,
    Paused,
}

impl VmState {
    /// The state's name in the API (`vm.info`'s "state").
    pub fn name(&self) -> &'static str {
        match self {
            VmState::Configured => "configured",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Held(h, _) => h.name(),
            VmState::Ended(_) => "shutdown",
        }
    }
}

impl Hold {
    /// The held state's name in the API (`vm.info`'s "state").
    pub fn name(&self) -> &'static str {
        match self {
            Hold::Pausing => "pausing",
            Hold::Resuming => "resuming",
            Hold::Snapshot => "snapshotting",
            Hold::Migration => "migrating",
        }
    }
}

impl std::fmt::Display for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hold::Pausing => "a pause",
            Hold::Resuming => "a resume",
            Hold::Snapshot => "a snapshot",
            Hold::Migration => "a migration",
        })
    }
}

/// How long a snapshot, a migration or a resume waits for whatever holds
/// the VM (writing a large guest's memory takes a while) before refusing.
pub(crate) const HOLD_WAIT: Duration = Duration::from_secs(600);

/// Whether to wait for a VM another operation holds.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Wait {
    /// Refused at once ([`PauseError::Busy`]): the API's event loop.
    No,
    /// Until the deadline, then refused.
    Until(Deadline),
}

/// The state, its lock and who waits on it. Devices end the VM through
/// it ([`StopSink`]); [`Vm::wait`] polls `ended_fd`.
pub(crate) struct Lifecycle {
    state: Mutex<VmState>,
    changed: Condvar,
    /// Readable once the VM has ended.
    pub(crate) ended_fd: EventFd,
}

impl Lifecycle {
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(Lifecycle {
            state: Mutex::new(VmState::Configured),
            changed: Condvar::new(),
            ended_fd: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Never held across anything that can panic or wait: a poisoned
    /// lock still holds a true state.
    fn lock(&self) -> MutexGuard<'_, VmState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn get(&self) -> VmState {
        self.lock().clone()
    }

    /// How the VM ended, if it has.
    pub(crate) fn ended(&self) -> Option<VmEnd> {
        match &*self.lock() {
            VmState::Ended(end) => Some(end.clone()),
            _ => None,
        }
    }

    /// The vCPU threads run: Configured to Running.
    pub(crate) fn started(&self) {
        let mut s = self.lock();
        if *s == VmState::Configured {
            *s = VmState::Running;
        }
    }

    /// A VM whose vCPUs started paused (a paused restore) and have all
    /// parked: Running to Paused, before anyone else can see it.
    pub(crate) fn paused_at_start(&self) {
        let mut s = self.lock();
        if *s == VmState::Running {
            *s = VmState::Paused;
        }
    }

    /// Record `end` unless the VM has ended already; whether it was.
    pub(crate) fn end(&self, end: VmEnd) -> bool {
        let mut s = self.lock();
        if matches!(*s, VmState::Ended(_)) {
            return false;
        }
        log::debug!("VM end: {end}");
        *s = VmState::Ended(end);
        drop(s);
        self.changed.notify_all();
        // Cannot fail short of a counter overflow; the state is set anyway.
        let _ = self.ended_fd.write(1);
        true
    }

    /// The one check of who may hold the VM: from Running (or Paused)
    /// to `Held(hold, was)`; a pause needs Running, a resume Paused.
    /// Returns what it was.
    fn take(&self, hold: Hold, wait: Wait) -> Result<Was, PauseError> {
        let mut s = self.lock();
        loop {
            let was = match &*s {
                VmState::Ended(_) | VmState::Configured => return Err(PauseError::Ended),
                VmState::Running if hold == Hold::Resuming => return Err(PauseError::NotPaused),
                VmState::Paused if hold == Hold::Pausing => return Err(PauseError::AlreadyPaused),
                VmState::Running => Was::Running,
                VmState::Paused => Was::Paused,
                VmState::Held(by, _) => {
                    let left = match wait {
                        Wait::Until(d) if !d.passed() => d.remaining(),
                        _ => return Err(PauseError::Busy(*by)),
                    };
                    s = self
                        .changed
                        .wait_timeout(s, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    continue;
                }
            };
            *s = VmState::Held(hold, was);
            return Ok(was);
        }
    }

    /// Back from Held to `to`, unless the VM ended meanwhile.
    fn put_back(&self, to: VmState) {
        let mut s = self.lock();
        if matches!(*s, VmState::Held(..)) {
            *s = to;
        }
        drop(s);
        self.changed.notify_all();
    }
}

impl StopSink for Lifecycle {
    fn guest_stopped(&self, why: GuestStop) {
        self.end(match why {
            GuestStop::PowerOff => VmEnd::PowerOff,
            GuestStop::DebugExit(v) => VmEnd::DebugExit(v),
            GuestStop::Reset => VmEnd::Reboot,
            GuestStop::Panic => VmEnd::Panicked,
        });
    }
}

/// What the VM becomes when its [`HeldVm`] drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    /// As it was when taken.
    AsBefore,
    Paused,
    Running,
}

/// A VM held by one operation. [`HeldVm::stop`] parks its vCPUs and I/O
/// engine; dropping it resumes what it stopped (or leaves the VM paused,
/// [`HeldVm::leave_paused`]) and ends the hold.
pub(crate) struct HeldVm<'a> {
    vm: &'a Vm,
    was: Was,
    stopped: bool,
    after: After,
}

impl Vm {
    /// Hold the VM for `hold` (see the module's doc).
    pub(crate) fn hold(&self, hold: Hold, wait: Wait) -> Result<HeldVm<'_>, PauseError> {
        let was = self.life.take(hold, wait)?;
        Ok(HeldVm {
            vm: self,
            was,
            stopped: false,
            after: After::AsBefore,
        })
    }

    /// Where the VM is in its life.
    pub fn state(&self) -> VmState {
        self.life.get()
    }

    /// Whether the VM is paused as a whole.
    pub fn is_paused(&self) -> bool {
        self.state() == VmState::Paused
    }

    /// How the VM ended, if it has.
    pub fn ended(&self) -> Option<VmEnd> {
        self.life.ended()
    }

    /// End the VM as [`VmEnd::ShutdownRequested`]: whoever waits in
    /// [`Vm::wait`] returns and shuts it down. No effect if it has ended.
    pub fn request_shutdown(&self) {
        self.life.end(VmEnd::ShutdownRequested);
    }

    /// Pause every vCPU (signal all, then wait for all, at most until
    /// `deadline`), then the I/O engine. If one does not park in time,
    /// all are resumed again and the error names it: no VM is left
    /// half-paused. Waits (until `deadline`) for a snapshot or migration
    /// that holds the VM.
    pub fn pause(&self, deadline: Deadline) -> Result<(), PauseError> {
        self.pause_with(Wait::Until(deadline), deadline)
    }

    /// As [`Vm::pause`], but refused at once ([`PauseError::Busy`]) while
    /// something else holds the VM (for the API's event loop, which must
    /// not wait for one).
    pub fn try_pause(&self, deadline: Deadline) -> Result<(), PauseError> {
        self.pause_with(Wait::No, deadline)
    }

    fn pause_with(&self, wait: Wait, deadline: Deadline) -> Result<(), PauseError> {
        let mut held = self.hold(Hold::Pausing, wait)?;
        held.stop(deadline)?;
        held.leave_paused();
        Ok(())
    }

    /// Resume a VM paused with [`Vm::pause`] (waiting, at most
    /// `HOLD_WAIT`, ten minutes, for a snapshot or migration that holds it).
    pub fn resume(&self) -> Result<(), PauseError> {
        self.resume_with(Wait::Until(Deadline::after(HOLD_WAIT)))
    }

    /// As [`Vm::resume`], refused at once while something holds the VM.
    pub fn try_resume(&self) -> Result<(), PauseError> {
        self.resume_with(Wait::No)
    }

    fn resume_with(&self, wait: Wait) -> Result<(), PauseError> {
        let mut held = self.hold(Hold::Resuming, wait)?;
        // Ended since the hold was taken (the vCPUs still parked): there
        // is nothing to resume. An end after the guard runs the vCPUs
        // again is the guest's own, after a resume that happened.
        if self.ended().is_some() {
            return Err(PauseError::Ended);
        }
        held.after = After::Running;
        Ok(())
    }
}

impl HeldVm<'_> {
    /// Park every vCPU, then the I/O engine (no request half done in
    /// what is saved), unless stopped already. On failure every vCPU
    /// runs again and the VM stays held.
    pub(crate) fn stop(&mut self, deadline: Deadline) -> Result<(), PauseError> {
        if self.was == Was::Paused || self.stopped {
            return Ok(());
        }
        let vcpus = || self.vm.vcpus.iter().map(|v| &**v);
        if let Err(e) = brisk_control::pause_all(vcpus(), deadline) {
            brisk_control::resume_all(vcpus());
            return Err(PauseError::Control(e));
        }
        if let Err(e) = self.vm.quiesce_io(deadline) {
            brisk_control::resume_all(vcpus());
            return Err(PauseError::Io(e));
        }
        self.stopped = true;
        Ok(())
    }

    /// Run what [`HeldVm::stop`] stopped, still holding the VM (a
    /// snapshot puts its files in place with the guest running again).
    pub(crate) fn run_again(&mut self) {
        if self.stopped && self.vm.ended().is_none() {
            self.vm.release_io();
            brisk_control::resume_all(self.vm.vcpus.iter().map(|v| &**v));
            self.stopped = false;
        }
    }

    /// Whether the VM was paused when taken.
    pub(crate) fn was_paused(&self) -> bool {
        self.was == Was::Paused
    }

    /// Leave the VM paused when the hold ends (it then stands exactly as
    /// saved).
    pub(crate) fn leave_paused(&mut self) {
        self.after = After::Paused;
    }
}

impl Drop for HeldVm<'_> {
    fn drop(&mut self) {
        let parked = self.stopped || self.was_paused();
        // vCPUs never parked run on, whatever was asked.
        let run = !parked
            || match self.after {
                After::AsBefore => self.was == Was::Running,
                After::Paused => false,
                After::Running => true,
            };
        // An ended VM stays where it is: a migrated one runs elsewhere.
        if run && parked && self.vm.ended().is_none() {
            self.vm.release_io();
            brisk_control::resume_all(self.vm.vcpus.iter().map(|v| &**v));
        }
        self.vm.life.put_back(match run {
            true => VmState::Running,
            false => VmState::Paused,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failpoint::spin_vm;

    fn soon() -> Deadline {
        Deadline::after(Duration::from_secs(10))
    }

    /// The guest runs: its progress counter moves (bounded by a long
    /// deadline, not a timing; polled asleep, so the vCPU gets the core).
    fn runs(vm: &Vm) -> bool {
        let (before, d) = (vm.progress(0), soon());
        while !d.passed() {
            if vm.progress(0) != before {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// `vm` held for `hold`, its vCPUs stopped.
    fn stopped(vm: &Vm, hold: Hold) -> HeldVm<'_> {
        let mut held = vm.hold(hold, Wait::No).unwrap();
        held.stop(soon()).unwrap();
        held
    }

    #[test]
    fn pause_and_resume_are_checked_transitions() {
        crate::require_kvm!();
        let vm = spin_vm();
        assert_eq!(vm.state(), VmState::Running);
        assert_eq!(vm.resume(), Err(PauseError::NotPaused));
        vm.pause(soon()).unwrap();
        assert_eq!(vm.state(), VmState::Paused);
        assert_eq!(vm.pause(soon()), Err(PauseError::AlreadyPaused));
        let p = vm.progress(0);
        vm.resume().unwrap();
        assert_eq!(vm.state(), VmState::Running);
        assert!(runs(&vm) && vm.progress(0) != p);
        vm.request_shutdown();
        assert_eq!(vm.state(), VmState::Ended(VmEnd::ShutdownRequested));
        assert_eq!(vm.pause(soon()), Err(PauseError::Ended));
        assert_eq!(vm.resume(), Err(PauseError::Ended));
        vm.shutdown().unwrap();
    }

    /// While something holds the VM it says what, pause and resume are
    /// refused naming it (at once, or once their deadline passes), and
    /// the VM runs again when the hold ends.
    #[test]
    fn a_held_vm_says_what_holds_it_and_runs_again_after() {
        crate::require_kvm!();
        let vm = spin_vm();
        let held = stopped(&vm, Hold::Snapshot);
        assert_eq!(vm.state(), VmState::Held(Hold::Snapshot, Was::Running));
        assert_eq!(vm.try_pause(soon()), Err(PauseError::Busy(Hold::Snapshot)));
        let passed = Deadline::after(Duration::ZERO);
        assert_eq!(vm.pause(passed), Err(PauseError::Busy(Hold::Snapshot)));
        assert_eq!(vm.try_resume(), Err(PauseError::Busy(Hold::Snapshot)));
        assert!(vm.hold(Hold::Migration, Wait::No).is_err());
        assert!(vm.vcpus[0].is_paused(), "stopped while held");
        drop(held);
        assert_eq!(vm.state(), VmState::Running);
        assert!(runs(&vm));
        vm.shutdown().unwrap();
    }

    /// A paused VM stays paused through a hold; a running one left
    /// paused by its holder (a live snapshot's `stay_paused`) is paused.
    #[test]
    fn a_hold_puts_back_what_it_found_or_was_told() {
        crate::require_kvm!();
        let vm = spin_vm();
        vm.pause(soon()).unwrap();
        drop(vm.hold(Hold::Snapshot, Wait::No).unwrap());
        assert_eq!(vm.state(), VmState::Paused);
        vm.resume().unwrap();
        let mut held = stopped(&vm, Hold::Snapshot);
        held.leave_paused();
        drop(held);
        assert_eq!(vm.state(), VmState::Paused);
        vm.resume().unwrap();
        assert!(runs(&vm));
        // Left paused before its vCPUs ever stopped: they run, and the
        // state says so.
        let mut held = vm.hold(Hold::Snapshot, Wait::No).unwrap();
        held.leave_paused();
        drop(held);
        assert_eq!(vm.state(), VmState::Running);
        vm.shutdown().unwrap();
    }

    /// A panic in whatever holds the VM (a brisk bug) unwinds through
    /// the guard: the guest runs again and the VM can be paused.
    #[test]
    fn a_panic_while_held_leaves_the_vm_running_and_pausable() {
        crate::require_kvm!();
        let vm = spin_vm();
        let r = std::thread::scope(|s| {
            s.spawn(|| {
                let _held = stopped(&vm, Hold::Migration);
                panic!("a bug while the guest is stopped");
            })
            .join()
        });
        assert!(r.is_err());
        assert_eq!(vm.state(), VmState::Running);
        assert!(runs(&vm));
        vm.try_pause(soon()).unwrap();
        vm.try_resume().unwrap();
        vm.shutdown().unwrap();
    }

    /// An end while held (a migration's commit) is never undone: the
    /// guard resumes nothing.
    #[test]
    fn an_end_while_held_stays() {
        crate::require_kvm!();
        let vm = spin_vm();
        let held = stopped(&vm, Hold::Migration);
        let to = VmEnd::Migrated {
            to: "unix:x".into(),
        };
        assert!(vm.life.end(to.clone()));
        drop(held);
        assert_eq!(vm.state(), VmState::Ended(to));
        assert!(vm.vcpus[0].is_paused(), "the ended VM's vCPU stays parked");
        vm.shutdown().unwrap();
    }
}
