//! The stand-in guest the control-plane tests drive: no KVM, every
//! behaviour deterministic, with the knobs the findings' tests need
//! (interrupts with an IF flag, split accesses, park notifications).
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use brisk_control::*;

/// How the stand-in behaves when entered.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Stays "in the guest" until interrupted (a spinning guest).
    Spin,
    /// Exits with an I/O exit every entry (a PIO loop).
    Io,
    /// Exits with HLT every entry.
    Halt,
    /// Exits with an MMIO access KVM split in two: `settle` returns the
    /// second fragment as a new exit before the access is complete.
    Split,
}

pub struct FakeExit(pub ExitKind);
impl Classify for FakeExit {
    fn kind(&self) -> ExitKind {
        self.0
    }
}

/// State the stand-in shares with its interrupt and the test.
#[derive(Default)]
pub struct Shared {
    pub immediate_exit: AtomicBool,
    pub signals: AtomicU64,
    pub entries: AtomicU64,
    /// While true, an interrupted Spin entry does not return yet.
    pub hold: Mutex<bool>,
    pub cv: Condvar,
    /// The guest's interrupt flag (IF), as at its last exit.
    pub if_flag: AtomicBool,
    /// An interrupt is pending (a device raised it); the next entry
    /// injects it.
    pub pending: AtomicBool,
    /// Interrupts injected.
    pub injected: AtomicU64,
    /// `parking` calls (KVM_KVMCLOCK_CTRL for KVM).
    pub parkings: AtomicU64,
    /// Fragments of the current split access still to be served.
    pub fragments: AtomicU64,
}

impl Shared {
    /// What a device does: mark the interrupt pending, then kick.
    pub fn raise(&self, ctl: &VcpuCtl<Fake>) {
        self.pending.store(true, SeqCst);
        ctl.kick(Request::Interrupt);
    }
}

pub struct FakeInterrupt(Arc<Shared>);
impl Interrupt for FakeInterrupt {
    fn interrupt(&self) {
        self.0.signals.fetch_add(1, SeqCst);
        let _g = self.0.hold.lock().unwrap();
        self.0.immediate_exit.store(true, SeqCst);
        self.0.cv.notify_all();
    }
}

/// How many stand-in vCPUs are inside their guest right now (shared by the
/// members of an exclusive group), and how often that exceeded one.
#[derive(Default)]
pub struct Occupancy {
    pub now: AtomicU64,
    pub violations: AtomicU64,
}

pub struct Fake {
    pub behaviour: Behaviour,
    pub shared: Arc<Shared>,
    pub occupancy: Arc<Occupancy>,
    /// Guest-visible progress: entries that ran guest code.
    pub progress: u64,
}

impl Guest for Fake {
    type Exit = FakeExit;
    type Error = String;

    fn bind_thread(&mut self) -> Box<dyn Interrupt> {
        Box::new(FakeInterrupt(self.shared.clone()))
    }

    fn set_immediate_exit(&mut self, on: bool) {
        self.shared.immediate_exit.store(on, SeqCst);
    }

    fn enter(&mut self) -> Result<Option<FakeExit>, String> {
        let s = &self.shared;
        let mut hold = s.hold.lock().unwrap();
        s.entries.fetch_add(1, SeqCst);
        s.cv.notify_all(); // for wait_in_guest
        if s.immediate_exit.load(SeqCst) {
            return Ok(None);
        }
        if s.pending.swap(false, SeqCst) {
            s.injected.fetch_add(1, SeqCst);
        }
        self.progress += 1;
        match self.behaviour {
            Behaviour::Io => Ok(Some(FakeExit(ExitKind::Io))),
            Behaviour::Halt => Ok(Some(FakeExit(ExitKind::Halt))),
            Behaviour::Split => {
                s.fragments.store(1, SeqCst);
                Ok(Some(FakeExit(ExitKind::Mmio)))
            }
            Behaviour::Spin => {
                if self.occupancy.now.fetch_add(1, SeqCst) != 0 {
                    self.occupancy.violations.fetch_add(1, SeqCst);
                }
                while !s.immediate_exit.load(SeqCst) || *hold {
                    hold = s.cv.wait(hold).unwrap();
                }
                self.occupancy.now.fetch_sub(1, SeqCst);
                Ok(None)
            }
        }
    }

    fn settle(&mut self) -> Result<Option<FakeExit>, String> {
        // The first fragment completes and the second comes back as an
        // exit of its own, even with immediate_exit set (as KVM does).
        let s = &self.shared;
        if s.fragments.load(SeqCst) > 0 {
            s.fragments.fetch_sub(1, SeqCst);
            return Ok(Some(FakeExit(ExitKind::Mmio)));
        }
        Ok(None)
    }

    fn interrupt_deliverable(&self) -> bool {
        self.shared.pending.load(SeqCst) && self.shared.if_flag.load(SeqCst)
    }

    fn parking(&mut self) {
        self.shared.parkings.fetch_add(1, SeqCst);
    }
}

/// A stand-in vCPU on its own thread, handing HLT to the loop as a halt.
pub struct Running {
    pub ctl: Arc<VcpuCtl<Fake>>,
    pub shared: Arc<Shared>,
    pub thread: Option<thread::JoinHandle<Result<RunEnd, RunError<String>>>>,
}

impl Running {
    pub fn start(behaviour: Behaviour) -> Running {
        Self::start_id(0, behaviour)
    }

    pub fn start_id(id: usize, behaviour: Behaviour) -> Running {
        Self::start_in(id, behaviour, Arc::default())
    }

    /// A vCPU whose guest has interrupts enabled (IF = 1).
    pub fn start_if(behaviour: Behaviour) -> Running {
        let shared = Arc::new(Shared::default());
        shared.if_flag.store(true, SeqCst);
        Self::start_with(0, behaviour, Arc::default(), shared)
    }

    pub fn start_in(id: usize, behaviour: Behaviour, occupancy: Arc<Occupancy>) -> Running {
        Self::start_with(id, behaviour, occupancy, Arc::default())
    }

    fn start_with(
        id: usize,
        behaviour: Behaviour,
        occupancy: Arc<Occupancy>,
        shared: Arc<Shared>,
    ) -> Running {
        let ctl = Arc::new(VcpuCtl::new(id));
        let fake = Fake {
            behaviour,
            shared: shared.clone(),
            occupancy,
            progress: 0,
        };
        let c = ctl.clone();
        let thread = thread::spawn(move || {
            c.run(fake, |_, exit| {
                Ok(if exit.0 == ExitKind::Halt {
                    Flow::Halt
                } else {
                    Flow::Continue
                })
            })
        });
        Running {
            ctl,
            shared,
            thread: Some(thread),
        }
    }

    pub fn progress(&self) -> u64 {
        self.ctl.run_on(|f: &mut Fake| f.progress, soon()).unwrap()
    }

    /// Block until the (spinning, never yet kicked) vCPU is inside the
    /// stand-in guest, where it stays until interrupted.
    pub fn wait_in_guest(&self) {
        let hold = self.shared.hold.lock().unwrap();
        let (_hold, timeout) = self
            .shared
            .cv
            .wait_timeout_while(hold, Duration::from_secs(10), |_| {
                self.shared.entries.load(SeqCst) == 0
            })
            .unwrap();
        assert!(!timeout.timed_out(), "the vCPU never entered the guest");
        assert_eq!(self.ctl.mode(), Mode::InGuest);
    }

    /// Ask the thread to exit and return how its loop ended.
    pub fn finish(&mut self) -> Result<RunEnd, RunError<String>> {
        self.ctl.request_exit();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        *self.shared.hold.lock().unwrap() = false;
        self.shared.cv.notify_all();
        self.ctl.request_exit();
        if let Some(t) = self.thread.take() {
            let end = t.join().unwrap();
            if !thread::panicking() {
                assert_eq!(end, Ok(RunEnd::ExitRequested));
            }
        }
    }
}

/// Poll `cond` (yielding) for at most 10 s; the tests never wait unbounded.
pub fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        thread::yield_now();
    }
}

pub fn soon() -> Deadline {
    Deadline::after(Duration::from_secs(10))
}

pub fn short() -> Deadline {
    Deadline::after(Duration::from_millis(200))
}
