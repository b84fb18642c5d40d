//! Randomized stress of the control plane against real KVM vCPUs.
//!
//! One VM runs the `stress` guest (vCPU i spins, loops on PIO or halts, by
//! i mod 3). Controller threads issue random operations at random moments
//! until the operation budget is spent. Controller c owns vCPUs i with
//! i mod C == c for stop/resume/pause_all (so "frozen while stopped" and
//! "progress after resume" stay checkable); kick, run_on and run_on_async
//! go to any vCPU. Every synchronous operation must return within the
//! deadline; afterwards the counters must add up.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use brisk_control::{pause_all, resume_all, Deadline, Request, RunOnTicket};

use crate::{Irqchip, Output, Vcpu, Vm, VmConfig};

/// What to run.
#[derive(Clone, Debug)]
pub struct StressConfig {
    /// Total operations, over all controllers.
    pub ops: u64,
    /// Seed of the random choices (controller c uses `seed + c`).
    pub seed: u64,
    pub cpus: usize,
    pub controllers: usize,
    pub irqchip: Irqchip,
    /// Bound on every synchronous operation.
    pub deadline: Duration,
}

impl Default for StressConfig {
    fn default() -> Self {
        StressConfig {
            ops: 100_000,
            seed: 1,
            cpus: 4,
            controllers: 2,
            irqchip: Irqchip::User,
            deadline: Duration::from_secs(5),
        }
    }
}

/// The operations, in the order of [`StressReport::ops_by_kind`].
pub const OPS: [&str; 8] = [
    "kick",
    "stop",
    "resume",
    "pause_all",
    "resume_all",
    "run_on",
    "run_on_async",
    "ticket_wait",
];

/// What a passing run did.
#[derive(Clone, Debug)]
pub struct StressReport {
    pub ops: u64,
    pub ops_by_kind: [u64; OPS.len()],
    /// Closures run on vCPUs (each checked to run exactly once).
    pub run_on_executed: u64,
    /// Resumes whose guest progress was verified.
    pub resumes_verified: u64,
    pub signals_sent: u64,
    pub signals_elided: u64,
    pub elapsed: Duration,
    /// Median and p99 latency of `stop` and `run_on`, in ns.
    pub stop_ns: (u64, u64),
    pub run_on_ns: (u64, u64),
}

impl fmt::Display for StressReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} operations in {:.2?} ({:.0} ops/s), no deadline missed",
            self.ops,
            self.elapsed,
            self.ops as f64 / self.elapsed.as_secs_f64()
        )?;
        for (name, n) in OPS.iter().zip(self.ops_by_kind) {
            writeln!(f, "  {name:<13} {n}")?;
        }
        writeln!(
            f,
            "run_on closures executed exactly once: {}; resumes followed by guest progress: {}",
            self.run_on_executed, self.resumes_verified
        )?;
        writeln!(
            f,
            "signals sent {}, elided {}",
            self.signals_sent, self.signals_elided
        )?;
        write!(
            f,
            "latency (median / p99): stop {} / {} us, run_on {} / {} us",
            self.stop_ns.0 / 1000,
            self.stop_ns.1 / 1000,
            self.run_on_ns.0 / 1000,
            self.run_on_ns.1 / 1000
        )
    }
}

/// A violated property.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StressFailure(pub String);

impl fmt::Display for StressFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StressFailure {}

struct Shared {
    vm: Vm,
    config: StressConfig,
    next_op: AtomicU64,
    abort: AtomicBool,
    run_on_issued: AtomicU64,
    run_on_ran: Arc<AtomicU64>,
    resumes_verified: AtomicU64,
    ops_by_kind: [AtomicU64; OPS.len()],
    stop_ns: Mutex<Vec<u64>>,
    run_on_ns: Mutex<Vec<u64>>,
}

type Check = Result<(), StressFailure>;

fn fail<T>(msg: String) -> Result<T, StressFailure> {
    Err(StressFailure(msg))
}

/// Run the stress; `Err` names the first property that failed.
pub fn run(config: &StressConfig) -> Result<StressReport, StressFailure> {
    if config.controllers == 0 || config.cpus < config.controllers {
        return fail("need at least one controller and one vCPU per controller".into());
    }
    let vm_config = VmConfig {
        guest: "stress".into(),
        cpus: config.cpus,
        irqchip: config.irqchip,
        ..VmConfig::default()
    };
    let vm = Vm::start(&vm_config, Output::Null).map_err(|e| StressFailure(e.to_string()))?;
    let shared = Arc::new(Shared {
        vm,
        config: config.clone(),
        next_op: AtomicU64::new(0),
        abort: AtomicBool::new(false),
        run_on_issued: AtomicU64::new(0),
        run_on_ran: Arc::new(AtomicU64::new(0)),
        resumes_verified: AtomicU64::new(0),
        ops_by_kind: Default::default(),
        stop_ns: Mutex::new(Vec::new()),
        run_on_ns: Mutex::new(Vec::new()),
    });
    let start = Instant::now();
    let threads: Vec<_> = (0..config.controllers)
        .map(|c| {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let r = Controller::new(&shared, c).run();
                if r.is_err() {
                    shared.abort.store(true, SeqCst);
                }
                r
            })
        })
        .collect();
    let mut first_error = Ok(());
    for t in threads {
        let r = t
            .join()
            .unwrap_or_else(|_| fail("a controller thread panicked".into()));
        if first_error.is_ok() {
            first_error = r;
        }
    }
    let elapsed = start.elapsed();
    first_error?;
    let report = final_checks(&shared, elapsed)?;
    match Arc::try_unwrap(shared) {
        Ok(s) => s
            .vm
            .shutdown()
            .map_err(|e| StressFailure(e.to_string()))?,
        Err(_) => return fail("controller threads still hold the VM".into()),
    }
    Ok(report)
}

fn final_checks(s: &Shared, elapsed: Duration) -> Result<StressReport, StressFailure> {
    if let Some(end) = s.vm.ended() {
        return fail(format!("the guest ended during the stress: {end}"));
    }
    let deadline = Deadline::after(s.config.deadline);
    pause_all(s.vm.vcpus().iter().map(|v| &**v), deadline)
        .map_err(|e| StressFailure(format!("final pause_all: {e}")))?;
    let (issued, ran) = (s.run_on_issued.load(SeqCst), s.run_on_ran.load(SeqCst));
    if issued != ran {
        return fail(format!("{issued} run_on issued but {ran} executed"));
    }
    let (mut sent, mut elided, mut work) = (0, 0, 0);
    for v in s.vm.vcpus() {
        let c = v.counters().snapshot();
        if c.signals_sent + c.signals_elided != c.kicks {
            return fail(format!("vCPU {}: sent + elided != kicks: {c:?}", v.id()));
        }
        // Every kicker has returned, so every signal counted was for an
        // InGuest publication of this run.
        if c.signals_sent > c.entries + c.cancelled_entries {
            return fail(format!("vCPU {}: more signals than entries: {c:?}", v.id()));
        }
        sent += c.signals_sent;
        elided += c.signals_elided;
        work += c.work_run;
    }
    if work != ran {
        return fail(format!("work_run counters say {work}, closures say {ran}"));
    }
    let pct = |v: &Mutex<Vec<u64>>| {
        let mut v = v.lock().unwrap().clone();
        v.sort_unstable();
        let at = |q: f64| {
            v.get(((v.len() as f64 - 1.0) * q) as usize)
                .copied()
                .unwrap_or(0)
        };
        (at(0.5), at(0.99))
    };
    Ok(StressReport {
        ops: s.ops_by_kind.iter().map(|n| n.load(SeqCst)).sum(),
        ops_by_kind: std::array::from_fn(|i| s.ops_by_kind[i].load(SeqCst)),
        run_on_executed: ran,
        resumes_verified: s.resumes_verified.load(SeqCst),
        signals_sent: sent,
        signals_elided: elided,
        elapsed,
        stop_ns: pct(&s.stop_ns),
        run_on_ns: pct(&s.run_on_ns),
    })
}

/// An outstanding run_on_async: (vCPU, token, ticket for (vCPU id, token)).
type Pending = (usize, u64, RunOnTicket<(usize, u64)>);

struct Controller<'a> {
    s: &'a Shared,
    rng: fastrand::Rng,
    owned: Vec<usize>,
    /// Per owned vCPU: stopped by us?
    stopped: Vec<bool>,
    /// Per owned vCPU: guest progress when we last resumed it, until we
    /// have seen it move past that.
    resumed_at: Vec<Option<u64>>,
    tickets: VecDeque<Pending>,
}

impl<'a> Controller<'a> {
    fn new(s: &'a Shared, c: usize) -> Self {
        let owned: Vec<usize> = (0..s.config.cpus)
            .filter(|i| i % s.config.controllers == c)
            .collect();
        Controller {
            s,
            rng: fastrand::Rng::with_seed(s.config.seed.wrapping_add(c as u64)),
            stopped: vec![false; owned.len()],
            resumed_at: vec![None; owned.len()],
            owned,
            tickets: VecDeque::new(),
        }
    }

    fn deadline(&self) -> Deadline {
        Deadline::after(self.s.config.deadline)
    }

    fn vcpu(&self, id: usize) -> &'a Vcpu {
        self.s.vm.vcpu(id)
    }

    fn run(mut self) -> Check {
        while self.s.next_op.fetch_add(1, SeqCst) < self.s.config.ops {
            if self.s.abort.load(SeqCst) {
                return Ok(());
            }
            self.random_pause();
            let op = self.rng.usize(..OPS.len());
            self.s.ops_by_kind[op].fetch_add(1, SeqCst);
            self.op(op)?;
        }
        while let Some(t) = self.tickets.pop_front() {
            Self::check_ticket(t, self.deadline())?;
        }
        for k in 0..self.owned.len() {
            if self.stopped[k] {
                self.resume(k);
            }
            self.verify_progress(k)?;
        }
        Ok(())
    }

    /// A random moment: from nothing to a few microseconds, sometimes a yield.
    fn random_pause(&mut self) {
        match self.rng.u8(..8) {
            0 => std::thread::yield_now(),
            1..=3 => {
                for _ in 0..self.rng.u32(..2000) {
                    std::hint::spin_loop();
                }
            }
            _ => {}
        }
    }

    fn op(&mut self, op: usize) -> Check {
        let any = self.rng.usize(..self.s.config.cpus);
        let k = self.rng.usize(..self.owned.len());
        match OPS[op] {
            "kick" => self.vcpu(any).kick(Request::Kick),
            "stop" => self.stop(k)?,
            "resume" if self.stopped[k] => self.resume(k),
            "pause_all" => {
                for k in 0..self.owned.len() {
                    self.verify_progress(k)?;
                }
                let mine = self.owned.iter().map(|&i| self.vcpu(i));
                pause_all(mine, self.deadline())
                    .map_err(|e| StressFailure(format!("pause_all: {e}")))?;
                self.stopped.iter_mut().for_each(|s| *s = true);
                self.check_frozen(k)?;
            }
            "resume_all" => {
                for k in 0..self.owned.len() {
                    if self.stopped[k] {
                        self.resumed_at[k] = Some(self.s.vm.progress(self.owned[k]));
                        self.stopped[k] = false;
                    }
                }
                resume_all(self.owned.iter().map(|&i| self.vcpu(i)));
            }
            "run_on" => {
                let token = self.rng.u64(..);
                let ran = self.s.run_on_ran.clone();
                self.s.run_on_issued.fetch_add(1, SeqCst);
                let t = Instant::now();
                let got = self.vcpu(any).run_on(
                    move |v: &mut crate::KvmVcpu| {
                        ran.fetch_add(1, SeqCst);
                        (v.id(), token)
                    },
                    self.deadline(),
                );
                self.s
                    .run_on_ns
                    .lock()
                    .unwrap()
                    .push(t.elapsed().as_nanos() as u64);
                match got {
                    Ok(r) if r == (any, token) => {}
                    other => return fail(format!("run_on on vCPU {any}: {other:?}")),
                }
            }
            "run_on_async" => {
                let token = self.rng.u64(..);
                let ran = self.s.run_on_ran.clone();
                self.s.run_on_issued.fetch_add(1, SeqCst);
                let ticket = self
                    .vcpu(any)
                    .run_on_async(move |v: &mut crate::KvmVcpu| {
                        ran.fetch_add(1, SeqCst);
                        (v.id(), token)
                    })
                    .map_err(|e| StressFailure(format!("run_on_async: {e}")))?;
                self.tickets.push_back((any, token, ticket));
            }
            "ticket_wait" => {
                if let Some(t) = self.tickets.pop_front() {
                    Self::check_ticket(t, self.deadline())?;
                }
            }
            _ => {} // resume of a vCPU that is running: nothing to do
        }
        Ok(())
    }

    fn check_ticket((vcpu, token, ticket): Pending, deadline: Deadline) -> Check {
        match ticket.wait(deadline) {
            Ok(r) if r == (vcpu, token) => Ok(()),
            other => fail(format!("run_on_async on vCPU {vcpu}: {other:?}")),
        }
    }

    fn stop(&mut self, k: usize) -> Check {
        self.verify_progress(k)?;
        let t = Instant::now();
        self.vcpu(self.owned[k])
            .stop(self.deadline())
            .map_err(|e| StressFailure(format!("stop: {e}")))?;
        self.s
            .stop_ns
            .lock()
            .unwrap()
            .push(t.elapsed().as_nanos() as u64);
        self.stopped[k] = true;
        self.check_frozen(k)
    }

    fn resume(&mut self, k: usize) {
        let id = self.owned[k];
        self.resumed_at[k] = Some(self.s.vm.progress(id));
        self.stopped[k] = false;
        self.vcpu(id).resume();
    }

    /// A vCPU we stopped makes no guest progress, even across a run_on.
    fn check_frozen(&mut self, k: usize) -> Check {
        let id = self.owned[k];
        let before = self.s.vm.progress(id);
        self.s.run_on_issued.fetch_add(1, SeqCst);
        let ran = self.s.run_on_ran.clone();
        self.vcpu(id)
            .run_on(move |_| ran.fetch_add(1, SeqCst), self.deadline())
            .map_err(|e| StressFailure(format!("run_on while stopped: {e}")))?;
        let after = self.s.vm.progress(id);
        if before != after {
            return fail(format!(
                "vCPU {id} progressed from {before} to {after} while stopped"
            ));
        }
        Ok(())
    }

    /// After our resume, the guest must move. Halted vCPUs only move when
    /// woken, so they are kicked while we wait (user irqchip); the wait is
    /// bounded.
    fn verify_progress(&mut self, k: usize) -> Check {
        let Some(at) = self.resumed_at[k].take() else {
            return Ok(());
        };
        let id = self.owned[k];
        let halts = brisk_guests::stress_role(id) == brisk_guests::StressRole::Halt;
        if halts && self.s.config.irqchip == Irqchip::Kernel {
            // HLT with IF=0 in the in-kernel irqchip never returns: no
            // kick can make this guest progress, by design.
            return Ok(());
        }
        let deadline = self.deadline();
        while self.s.vm.progress(id) <= at {
            if deadline.passed() {
                return fail(format!(
                    "vCPU {id} made no progress past {at} within {:?} of its resume",
                    self.s.config.deadline
                ));
            }
            if halts {
                self.vcpu(id).kick(Request::Kick);
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        self.s.resumes_verified.fetch_add(1, SeqCst);
        Ok(())
    }
}
