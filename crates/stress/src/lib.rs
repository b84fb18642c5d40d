//! Randomized stress of the control plane against real KVM vCPUs.
//!
//! Two guests:
//! - `stress-irq` (user irqchip; the default there): vCPU i, by i mod 4,
//!   spins, loops on PIO (ringing vCPU i+2's doorbell every 64 reads), or
//!   idles in `sti; hlt` woken only by interrupts: its own periodic timer,
//!   or doorbell rings. Interrupts stay enabled, and every vector goes to
//!   one handler that counts it.
//! - `stress` (the kernel irqchip's default): vCPU i spins, loops on PIO or
//!   halts with interrupts off, by i mod 3.
//!
//! Controller threads issue random operations at random moments until the
//! operation budget is spent. Controller c owns vCPUs i with i mod C == c.
//! Only c stops, resumes and pauses them, runs idle tasks on their own
//! queues, and switches them in its exclusive groups. So "frozen while
//! stopped" and "progress after resume" stay checkable, and so does "never
//! two members of an exclusive group running". Kicks, run_on, run_on_async
//! and interrupt raises go to any vCPU, and idle-group tasks to the group
//! of all halting vCPUs. Every synchronous operation must return within the
//! deadline.
//!
//! Nothing re-kicks a halted vCPU. In `stress-irq` no kick goes to a vCPU
//! that halts: it gets past its HLT only through an interrupt. A
//! lost-wake-up detector (a thread) fails the run when an interrupt stays
//! pending, with no injection, for longer than the deadline while its vCPU
//! is not paused by any controller. Afterwards the counters must add up.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use brisk_control::{
    pause_all, resume_all, Deadline, Error, ExclusiveGroup, ExitKind, IdleGroup, Mode, Request,
    RunOnTicket,
};
use brisk_guests::{StressIrqRole, StressRole};

use brisk_vmm::{Irqchip, KvmVcpu, Output, Vcpu, Vm, VmConfig};

/// The guest a stress runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StressGuest {
    /// `stress`: spin, PIO, or HLT with interrupts off, by vCPU id mod 3.
    Stress,
    /// `stress-irq` (user irqchip only): spin and PIO with interrupts on,
    /// and `sti; hlt` woken by a timer or by doorbell rings, by id mod 4.
    StressIrq,
}

impl StressGuest {
    /// The built-in guest's name.
    pub fn name(self) -> &'static str {
        match self {
            StressGuest::Stress => "stress",
            StressGuest::StressIrq => "stress-irq",
        }
    }

    /// The guest called `name`, if it is one of the two.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "stress" => Some(StressGuest::Stress),
            "stress-irq" => Some(StressGuest::StressIrq),
            _ => None,
        }
    }

    /// The default for `irqchip`: `stress-irq` when interrupts come from
    /// brisk's devices, `stress` with KVM's irqchip.
    pub fn for_irqchip(irqchip: Irqchip) -> Self {
        match irqchip {
            Irqchip::User => StressGuest::StressIrq,
            Irqchip::Kernel => StressGuest::Stress,
        }
    }
}

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
    /// `None`: [`StressGuest::for_irqchip`].
    pub guest: Option<StressGuest>,
    /// Bound on every synchronous operation, and on how long an interrupt
    /// may stay pending while its vCPU runs.
    pub deadline: Duration,
    /// M:N: run the vCPUs on a pool of this many threads.
    pub vcpu_threads: Option<usize>,
}

impl Default for StressConfig {
    fn default() -> Self {
        StressConfig {
            ops: 100_000,
            seed: 1,
            cpus: 4,
            controllers: 2,
            irqchip: Irqchip::User,
            guest: None,
            deadline: Duration::from_secs(5),
            vcpu_threads: None,
        }
    }
}

impl StressConfig {
    /// The guest this configuration runs.
    pub fn guest(&self) -> StressGuest {
        self.guest
            .unwrap_or_else(|| StressGuest::for_irqchip(self.irqchip))
    }
}

/// Every operation kind, in the order of [`OPS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Kick,
    Stop,
    Resume,
    PauseAll,
    ResumeAll,
    RunOn,
    RunOnAsync,
    TicketWait,
    SwitchTo,
    Raise,
    RunWhenIdle,
    IdleGroup,
    IdleWait,
}

const KINDS: [Kind; 13] = [
    Kind::Kick,
    Kind::Stop,
    Kind::Resume,
    Kind::PauseAll,
    Kind::ResumeAll,
    Kind::RunOn,
    Kind::RunOnAsync,
    Kind::TicketWait,
    Kind::SwitchTo,
    Kind::Raise,
    Kind::RunWhenIdle,
    Kind::IdleGroup,
    Kind::IdleWait,
];

/// The operations' names, indexed like the kinds.
pub const OPS: [&str; 13] = [
    "kick",
    "stop",
    "resume",
    "pause_all",
    "resume_all",
    "run_on",
    "run_on_async",
    "ticket_wait",
    "switch_to",
    "raise",
    "run_when_idle",
    "idle_group",
    "idle_wait",
];

/// The kinds `guest` uses: interrupts and idle tasks need `stress-irq`
/// (interrupts from brisk's devices, halts in user space).
fn kinds_for(guest: StressGuest) -> &'static [Kind] {
    match guest {
        StressGuest::StressIrq => &KINDS,
        StressGuest::Stress => &KINDS[..9],
    }
}

/// What a vCPU does, whichever guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Spin,
    Pio,
    /// `cli; hlt` (`stress`): only a kick (user irqchip) gets it past HLT.
    MaskedHalt,
    /// `sti; hlt` woken by its timer (`stress-irq`).
    TimerHalt,
    /// `sti; hlt` woken by doorbell rings (`stress-irq`).
    DoorbellHalt,
}

impl Role {
    fn of(guest: StressGuest, id: usize) -> Role {
        match guest {
            StressGuest::Stress => match brisk_guests::stress_role(id) {
                StressRole::Spin => Role::Spin,
                StressRole::Pio => Role::Pio,
                StressRole::Halt => Role::MaskedHalt,
            },
            StressGuest::StressIrq => match brisk_guests::stress_irq_role(id) {
                StressIrqRole::Spin => Role::Spin,
                StressIrqRole::Pio => Role::Pio,
                StressIrqRole::TimerHalt => Role::TimerHalt,
                StressIrqRole::DoorbellHalt => Role::DoorbellHalt,
            },
        }
    }

    /// Woken from HLT only by interrupts: never kicked by the stress.
    fn interrupt_driven(self) -> bool {
        matches!(self, Role::TimerHalt | Role::DoorbellHalt)
    }

    fn name(self) -> &'static str {
        match self {
            Role::Spin => "spin",
            Role::Pio => "pio",
            Role::MaskedHalt => "cli-hlt",
            Role::TimerHalt => "timer-halt",
            Role::DoorbellHalt => "doorbell-halt",
        }
    }
}

/// Interrupt accounting over all vCPUs (`stress-irq`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterruptReport {
    /// `raise` calls on the pending sets (timer, doorbell, the stress).
    pub raised: u64,
    /// Of those, raised by the stress controllers themselves.
    pub raised_by_stress: u64,
    /// Raises merged into a vector still pending.
    pub coalesced: u64,
    /// Vectors handed to KVM_INTERRUPT.
    pub injected: u64,
    /// Interrupts the guest's handler counted.
    pub handled: u64,
    pub timer_ticks: u64,
    pub doorbell_rings: u64,
    /// Largest raise-to-KVM_INTERRUPT time (it includes time the vCPU
    /// spent parked by a controller).
    pub max_latency: Duration,
}

/// What the lost-wake-up detector saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DetectorReport {
    /// Passes over all vCPUs.
    pub samples: u64,
    /// The longest time an interrupt was seen pending, with no injection,
    /// while its vCPU was not paused (always below the deadline in a
    /// passing run), and the vCPU.
    pub longest_pending_running: Duration,
    pub longest_vcpu: usize,
}

/// What a passing run did.
#[derive(Clone, Debug)]
pub struct StressReport {
    pub guest: StressGuest,
    pub irqchip: Irqchip,
    pub cpus: usize,
    pub controllers: usize,
    pub ops: u64,
    /// The operations this guest uses, with how often each was chosen.
    pub ops_by_kind: Vec<(&'static str, u64)>,
    /// Closures run on vCPUs (each checked to run exactly once).
    pub run_on_executed: u64,
    /// Resumes whose guest progress was verified.
    pub resumes_verified: u64,
    /// Idle tasks that reported their result (each ran exactly once, on a
    /// halted vCPU of its queue).
    pub idle_tasks_ran: u64,
    /// Idle tasks on a parked vCPU whose wait reported Timeout (none had
    /// run then; each ran at most once later).
    pub idle_timeouts: u64,
    /// Idle tasks queued at shutdown that reported Exited, unrun.
    pub idle_exited: u64,
    /// Exclusive groups formed, and switches checked to leave every other
    /// member parked.
    pub exclusive_groups: u64,
    pub exclusive_switches: u64,
    pub signals_sent: u64,
    pub signals_elided: u64,
    pub interrupts: Option<InterruptReport>,
    pub detector: Option<DetectorReport>,
    pub elapsed: Duration,
    /// Median and p99 latency of `stop`, `run_on` and `switch_to`, in ns.
    pub stop_ns: (u64, u64),
    pub run_on_ns: (u64, u64),
    pub switch_ns: (u64, u64),
}

impl fmt::Display for StressReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "guest {} on {} vCPUs ({:?} irqchip), {} controllers",
            self.guest.name(),
            self.cpus,
            self.irqchip,
            self.controllers
        )?;
        writeln!(
            f,
            "{} operations in {:.2?} ({:.0} ops/s), no deadline missed",
            self.ops,
            self.elapsed,
            self.ops as f64 / self.elapsed.as_secs_f64()
        )?;
        for (name, n) in &self.ops_by_kind {
            writeln!(f, "  {name:<13} {n}")?;
        }
        writeln!(
            f,
            "run_on closures executed exactly once: {}; resumes followed by guest progress: {}",
            self.run_on_executed, self.resumes_verified
        )?;
        if self.guest == StressGuest::StressIrq {
            writeln!(
                f,
                "idle tasks: {} ran exactly once while halted, {} timed out on a parked vCPU (unrun), {} reported Exited at shutdown (unrun)",
                self.idle_tasks_ran, self.idle_timeouts, self.idle_exited
            )?;
        }
        writeln!(
            f,
            "exclusive groups: {} formed, {} switches, never two members running",
            self.exclusive_groups, self.exclusive_switches
        )?;
        writeln!(
            f,
            "signals sent {}, elided {}",
            self.signals_sent, self.signals_elided
        )?;
        if let Some(i) = &self.interrupts {
            writeln!(
                f,
                "interrupts: raised {} ({} by the stress, {} timer ticks, {} doorbell rings), coalesced {}, injected {}, handled by the guest {}",
                i.raised, i.raised_by_stress, i.timer_ticks, i.doorbell_rings, i.coalesced, i.injected, i.handled
            )?;
            writeln!(
                f,
                "max raise->inject latency {:.2?} (including time parked by a controller)",
                i.max_latency
            )?;
        }
        if let Some(d) = &self.detector {
            writeln!(
                f,
                "lost-wake-up detector: PASS, no interrupt pending past the deadline on a running vCPU ({} samples; longest pending with no injection while running: {:.2?}, vCPU {}); no halting vCPU woken except by an interrupt",
                d.samples, d.longest_pending_running, d.longest_vcpu
            )?;
        }
        write!(
            f,
            "latency (median / p99): stop {} / {} us, run_on {} / {} us, switch_to {} / {} us",
            self.stop_ns.0 / 1000,
            self.stop_ns.1 / 1000,
            self.run_on_ns.0 / 1000,
            self.run_on_ns.1 / 1000,
            self.switch_ns.0 / 1000,
            self.switch_ns.1 / 1000
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

/// Whether a vCPU is paused by its controller, as the controller tracks
/// it for the detector: `paused` is set before a stop starts, cleared
/// (with `resumed`) after a resume has returned, so the detector's view of
/// "running" is never wider than the truth.
struct Watch {
    paused: bool,
    resumed: Instant,
}

/// Tells the detector thread to finish.
#[derive(Default)]
struct Stopper {
    done: Mutex<bool>,
    cv: Condvar,
}

struct Shared {
    vm: Vm,
    config: StressConfig,
    guest: StressGuest,
    roles: Vec<Role>,
    ctls: Arc<[Arc<Vcpu>]>,
    /// The group of every halting vCPU of `stress-irq`.
    idle_group: Option<IdleGroup<KvmVcpu>>,
    watch: Vec<Mutex<Watch>>,
    next_op: AtomicU64,
    abort: AtomicBool,
    failure: Mutex<Option<StressFailure>>,
    run_on_issued: AtomicU64,
    run_on_ran: Arc<AtomicU64>,
    /// Idle tasks executed (any), counted by the tasks.
    idle_ran: Arc<AtomicU64>,
    idle_ok: AtomicU64,
    /// Tasks whose wait timed out: each may run at most once later.
    idle_timed_out: Mutex<Vec<Arc<AtomicU32>>>,
    resumes_verified: AtomicU64,
    raised_by_stress: AtomicU64,
    exclusive_groups: AtomicU64,
    exclusive_switches: AtomicU64,
    ops_by_kind: [AtomicU64; OPS.len()],
    stop_ns: Mutex<Vec<u64>>,
    run_on_ns: Mutex<Vec<u64>>,
    switch_ns: Mutex<Vec<u64>>,
}

type Check = Result<(), StressFailure>;

fn fail<T>(msg: String) -> Result<T, StressFailure> {
    Err(StressFailure(msg))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Keep the first failure; stop every controller.
    fn record(&self, f: StressFailure) {
        let mut first = lock(&self.failure);
        if first.is_none() {
            *first = Some(f);
        }
        self.abort.store(true, SeqCst);
    }

    fn mark_paused(&self, id: usize) {
        lock(&self.watch[id]).paused = true;
    }

    fn mark_running(&self, id: usize) {
        let mut w = lock(&self.watch[id]);
        w.paused = false;
        w.resumed = Instant::now();
    }

    /// What a device does: mark the vector pending, kick if it is fresh.
    fn raise(&self, id: usize) {
        let pending = self
            .vm
            .pending_interrupts(id)
            .expect("stress-irq runs with the user irqchip");
        self.raised_by_stress.fetch_add(1, SeqCst);
        if pending.raise(brisk_guests::STRESS_RAISE_VECTOR) {
            self.vm.vcpu(id).kick(Request::Interrupt);
        }
    }

    /// Everything about vCPU `id` that explains a failure.
    fn describe(&self, id: usize) -> String {
        let v = self.vm.vcpu(id);
        let mut s = format!(
            "role {}, mode {}, state {:?}, paused {}, progress {}",
            self.roles[id].name(),
            v.mode().name(),
            v.state(),
            v.is_paused(),
            self.vm.progress(id)
        );
        if let Some(p) = self.vm.pending_interrupts(id) {
            s += &format!(
                ", interrupt pending {}, {:?}, handled by the guest {}",
                p.any(),
                p.stats(),
                self.vm.last_read(id)
            );
        }
        s + &format!(", counters {:?}", v.counters().snapshot())
    }
}

/// Run the stress; `Err` names the first property that failed.
pub fn run(config: &StressConfig) -> Result<StressReport, StressFailure> {
    if config.controllers == 0 || config.cpus < config.controllers {
        return fail("need at least one controller and one vCPU per controller".into());
    }
    let guest = config.guest();
    let vm_config = VmConfig {
        payload: brisk_vmm::Payload::builtin(guest.name()),
        cpus: config.cpus,
        irqchip: config.irqchip,
        vcpu_threads: config.vcpu_threads,
        ..VmConfig::default()
    };
    let vm = Vm::start(&vm_config, Output::Null).map_err(|e| StressFailure(e.to_string()))?;
    let roles: Vec<Role> = (0..config.cpus).map(|id| Role::of(guest, id)).collect();
    let ctls: Arc<[Arc<Vcpu>]> = vm.vcpus().to_vec().into();
    let halting: Vec<Arc<Vcpu>> = (0..config.cpus)
        .filter(|&id| roles[id].interrupt_driven())
        .map(|id| ctls[id].clone())
        .collect();
    let idle_group = if halting.is_empty() {
        None
    } else {
        Some(IdleGroup::new(halting).map_err(|e| StressFailure(format!("IdleGroup::new: {e}")))?)
    };
    let now = Instant::now();
    let shared = Arc::new(Shared {
        vm,
        config: config.clone(),
        guest,
        roles,
        ctls,
        idle_group,
        watch: (0..config.cpus)
            .map(|_| {
                Mutex::new(Watch {
                    paused: false,
                    resumed: now,
                })
            })
            .collect(),
        next_op: AtomicU64::new(0),
        abort: AtomicBool::new(false),
        failure: Mutex::new(None),
        run_on_issued: AtomicU64::new(0),
        run_on_ran: Arc::new(AtomicU64::new(0)),
        idle_ran: Arc::new(AtomicU64::new(0)),
        idle_ok: AtomicU64::new(0),
        idle_timed_out: Mutex::new(Vec::new()),
        resumes_verified: AtomicU64::new(0),
        raised_by_stress: AtomicU64::new(0),
        exclusive_groups: AtomicU64::new(0),
        exclusive_switches: AtomicU64::new(0),
        ops_by_kind: Default::default(),
        stop_ns: Mutex::new(Vec::new()),
        run_on_ns: Mutex::new(Vec::new()),
        switch_ns: Mutex::new(Vec::new()),
    });
    let start = Instant::now();
    let stopper = Arc::new(Stopper::default());
    let detector = (config.irqchip == Irqchip::User).then(|| {
        let (shared, stopper) = (shared.clone(), stopper.clone());
        std::thread::spawn(move || {
            let r = detect(&shared, &stopper);
            if let Err(e) = &r {
                shared.record(e.clone());
            }
            r
        })
    });
    let threads: Vec<_> = (0..config.controllers)
        .map(|c| {
            let shared = shared.clone();
            std::thread::spawn(move || {
                if let Err(e) = Controller::new(&shared, c).run() {
                    shared.record(e);
                }
            })
        })
        .collect();
    for t in threads {
        if t.join().is_err() {
            shared.record(StressFailure("a controller thread panicked".into()));
        }
    }
    let elapsed = start.elapsed();
    if lock(&shared.failure).is_none() && config.irqchip == Irqchip::User {
        // Every vCPU runs now: what is pending must be injected.
        if let Err(e) = drain(&shared) {
            shared.record(e);
        }
    }
    *lock(&stopper.done) = true;
    stopper.cv.notify_all();
    let detector = match detector.map(|t| t.join()) {
        None => None,
        Some(Ok(Ok(d))) => Some(d),
        Some(Ok(Err(_))) => None, // recorded
        Some(Err(_)) => {
            shared.record(StressFailure("the detector thread panicked".into()));
            None
        }
    };
    if let Some(f) = lock(&shared.failure).take() {
        return Err(f);
    }
    let mut report = final_checks(&shared, elapsed)?;
    report.detector = detector.filter(|_| guest == StressGuest::StressIrq);
    let Ok(s) = Arc::try_unwrap(shared) else {
        return fail("controller threads still hold the VM".into());
    };
    report.idle_exited = exited_at_shutdown(s)?;
    Ok(report)
}

/// The lost-wake-up detector: every millisecond, for each vCPU, whether an
/// interrupt is pending and how many were injected. An interrupt seen
/// pending with no injection since, on a vCPU that is not paused and was
/// last resumed before that, for longer than the deadline, is lost: fail.
fn detect(s: &Shared, stopper: &Stopper) -> Result<DetectorReport, StressFailure> {
    let n = s.config.cpus;
    let mut report = DetectorReport::default();
    // Per vCPU: injections at the last sample, and since when it has been
    // seen running with something pending and no injection.
    let mut injected = vec![0u64; n];
    let mut stuck_since: Vec<Option<Instant>> = vec![None; n];
    let mut done = lock(&stopper.done);
    loop {
        done = stopper
            .cv
            .wait_timeout(done, Duration::from_millis(1))
            .unwrap_or_else(|p| p.into_inner())
            .0;
        if *done || s.abort.load(SeqCst) {
            return Ok(report);
        }
        report.samples += 1;
        for id in 0..n {
            let Some(pending) = s.vm.pending_interrupts(id) else {
                continue;
            };
            // Watch first: a resume stamped after this look only makes
            // the vCPU look paused for longer.
            let (paused, resumed) = {
                let w = lock(&s.watch[id]);
                (w.paused, w.resumed)
            };
            let now_injected = pending.stats().injected;
            let any = pending.any();
            let now = Instant::now();
            if paused || !any || now_injected != injected[id] {
                injected[id] = now_injected;
                stuck_since[id] = (!paused && any).then_some(now);
                continue;
            }
            // No injection since the last sample, so the vector pending
            // then is pending still; the vCPU has run since `resumed`.
            let from = (*stuck_since[id].get_or_insert(now)).max(resumed);
            let stuck = now - from;
            if stuck > report.longest_pending_running {
                report.longest_pending_running = stuck;
                report.longest_vcpu = id;
            }
            if stuck > s.config.deadline {
                return fail(format!(
                    "lost wake-up: vCPU {id} has had an interrupt pending for {stuck:.2?} with no injection while not paused (resumed {:.2?} ago; deadline {:?}): {}",
                    now - resumed,
                    s.config.deadline,
                    s.describe(id)
                ));
            }
        }
    }
}

/// With every controller done (and every vCPU resumed), each vCPU with an
/// interrupt pending must inject one within the deadline.
fn drain(s: &Shared) -> Check {
    for id in 0..s.config.cpus {
        let pending = s.vm.pending_interrupts(id).expect("user irqchip");
        let before = pending.stats().injected;
        let deadline = Deadline::after(s.config.deadline);
        while pending.any() && pending.stats().injected == before {
            if deadline.passed() {
                return fail(format!(
                    "lost wake-up after the last operation: vCPU {id} injected nothing within {:?} with an interrupt pending: {}",
                    s.config.deadline,
                    s.describe(id)
                ));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    Ok(())
}

fn percentiles(v: &Mutex<Vec<u64>>) -> (u64, u64) {
    let mut v = lock(v).clone();
    v.sort_unstable();
    let at = |q: f64| {
        v.get(((v.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0)
    };
    (at(0.5), at(0.99))
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
    let (mut sent, mut elided, mut work, mut idle) = (0, 0, 0, 0);
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
        idle += c.idle_tasks;
    }
    if work != ran {
        return fail(format!("work_run counters say {work}, closures say {ran}"));
    }
    let idle_ran = s.idle_ran.load(SeqCst);
    if idle != idle_ran {
        return fail(format!(
            "idle_tasks counters say {idle}, the tasks say {idle_ran}"
        ));
    }
    for t in lock(&s.idle_timed_out).iter() {
        if t.load(SeqCst) > 1 {
            return fail("an idle task whose wait timed out ran twice".into());
        }
    }
    let interrupts = match s.guest {
        StressGuest::StressIrq => Some(interrupt_checks(s)?),
        StressGuest::Stress => None,
    };
    let ops_by_kind = kinds_for(s.guest)
        .iter()
        .map(|&k| (OPS[k as usize], s.ops_by_kind[k as usize].load(SeqCst)))
        .collect();
    Ok(StressReport {
        guest: s.guest,
        irqchip: s.config.irqchip,
        cpus: s.config.cpus,
        controllers: s.config.controllers,
        ops: s.ops_by_kind.iter().map(|n| n.load(SeqCst)).sum(),
        ops_by_kind,
        run_on_executed: ran,
        resumes_verified: s.resumes_verified.load(SeqCst),
        idle_tasks_ran: s.idle_ok.load(SeqCst),
        idle_timeouts: lock(&s.idle_timed_out).len() as u64,
        idle_exited: 0,
        exclusive_groups: s.exclusive_groups.load(SeqCst),
        exclusive_switches: s.exclusive_switches.load(SeqCst),
        signals_sent: sent,
        signals_elided: elided,
        interrupts,
        detector: None,
        elapsed,
        stop_ns: percentiles(&s.stop_ns),
        run_on_ns: percentiles(&s.run_on_ns),
        switch_ns: percentiles(&s.switch_ns),
    })
}

/// Every vCPU parked: each injected interrupt reached the guest's handler
/// (one may be in flight: injected, not yet taken), and each halting vCPU
/// got past its HLT only by taking an interrupt.
fn interrupt_checks(s: &Shared) -> Result<InterruptReport, StressFailure> {
    let mut r = InterruptReport {
        raised_by_stress: s.raised_by_stress.load(SeqCst),
        doorbell_rings: s.vm.doorbell_rings().unwrap_or(0),
        ..Default::default()
    };
    for id in 0..s.config.cpus {
        let p = s.vm.pending_interrupts(id).expect("user irqchip");
        let st = p.stats();
        let handled = s.vm.last_read(id);
        if handled > st.injected || st.injected - handled > 1 {
            return fail(format!(
                "vCPU {id}: {} interrupts injected but the guest handled {handled}: {}",
                st.injected,
                s.describe(id)
            ));
        }
        if st.coalesced + st.injected > st.raised {
            return fail(format!(
                "vCPU {id}: more interrupts coalesced and injected than raised: {st:?}"
            ));
        }
        if s.roles[id].interrupt_driven() {
            let progress = s.vm.progress(id);
            let halts = s.vm.vcpu(id).counters().snapshot().exits_of(ExitKind::Halt);
            // The handler counts progress, then `handled`: a park may
            // fall between the two.
            if progress != handled && progress != handled + 1 {
                return fail(format!(
                    "vCPU {id} progressed {progress} times but handled {handled} interrupts: {}",
                    s.describe(id)
                ));
            }
            // Each HLT after the first follows a return from the one
            // before, which only an interrupt allows.
            if halts > handled + 1 {
                return fail(format!(
                    "vCPU {id} executed HLT {halts} times but took only {handled} interrupts: it was woken without one: {}",
                    s.describe(id)
                ));
            }
        }
        r.raised += st.raised;
        r.coalesced += st.coalesced;
        r.injected += st.injected;
        r.handled += handled;
        r.timer_ticks += s.vm.timer_ticks(id).unwrap_or(0);
        r.max_latency = r.max_latency.max(Duration::from_nanos(st.max_latency_ns));
    }
    Ok(r)
}

/// With every vCPU parked, queue idle tasks that cannot run (on each
/// halting vCPU's own queue and on the idle group), then shut the VM
/// down: each must report Exited and none may have run.
fn exited_at_shutdown(s: Shared) -> Result<u64, StressFailure> {
    let Shared {
        vm,
        idle_group,
        roles,
        config,
        ..
    } = s;
    let ran = Arc::new(AtomicU64::new(0));
    let task = || {
        let ran = ran.clone();
        move |_: &mut KvmVcpu| {
            ran.fetch_add(1, SeqCst);
        }
    };
    let mut tickets = Vec::new();
    for id in (0..config.cpus).filter(|&id| roles[id].interrupt_driven()) {
        for _ in 0..4 {
            let t = vm
                .vcpu(id)
                .run_when_idle(task())
                .map_err(|e| StressFailure(format!("run_when_idle at the end: {e}")))?;
            tickets.push(t);
        }
    }
    if let Some(g) = &idle_group {
        for _ in 0..4 {
            let t = g
                .run_when_idle(task())
                .map_err(|e| StressFailure(format!("IdleGroup::run_when_idle at the end: {e}")))?;
            tickets.push(t);
        }
    }
    vm.shutdown().map_err(|e| StressFailure(e.to_string()))?;
    let n = tickets.len() as u64;
    for t in tickets {
        match t.wait(Deadline::after(config.deadline)) {
            Err(Error::Exited { .. }) => {}
            other => {
                return fail(format!(
                    "an idle task queued on a parked vCPU at shutdown: {other:?}, not Exited"
                ))
            }
        }
    }
    if ran.load(SeqCst) != 0 {
        return fail("an idle task queued on a parked vCPU ran during shutdown".into());
    }
    drop(idle_group);
    Ok(n)
}

/// An outstanding run_on_async: (vCPU, token, ticket for (vCPU id, token)).
type Pending = (usize, u64, RunOnTicket<(usize, u64)>);

/// Where an idle task may run.
#[derive(Clone, Copy, Debug)]
enum IdleQueue {
    /// The own queue of the owned vCPU at this index.
    Own(usize),
    Group,
}

/// An outstanding idle task: its queue, its run count, its ticket for the
/// (vCPU id, mode there) it ran with.
struct IdleTicket {
    queue: IdleQueue,
    ran: Arc<AtomicU32>,
    ticket: RunOnTicket<(usize, Mode)>,
}

/// An exclusive group over some of the controller's vCPUs.
struct Exclusive {
    group: ExclusiveGroup<KvmVcpu>,
    /// Owned indices of the members.
    members: Vec<usize>,
    /// The owned index of the one running.
    running: usize,
}

/// Idle tasks a controller keeps outstanding at most.
const MAX_IDLE: usize = 32;

struct Controller<'a> {
    s: &'a Shared,
    rng: fastrand::Rng,
    kinds: &'static [Kind],
    owned: Vec<usize>,
    /// Per owned vCPU: stopped by us (or parked by our exclusive group)?
    stopped: Vec<bool>,
    /// Per owned vCPU: guest progress when we last resumed it, until we
    /// have seen it move past that.
    resumed_at: Vec<Option<u64>>,
    tickets: VecDeque<Pending>,
    idle: VecDeque<IdleTicket>,
    exclusive: Option<Exclusive>,
    /// Any vCPU that a kick may go to (never one that halts waiting for
    /// interrupts).
    kickable: Vec<usize>,
    /// Owned indices of our vCPUs in the idle group.
    halting: Vec<usize>,
}

impl<'a> Controller<'a> {
    fn new(s: &'a Shared, c: usize) -> Self {
        let owned: Vec<usize> = (0..s.config.cpus)
            .filter(|i| i % s.config.controllers == c)
            .collect();
        let halting = (0..owned.len())
            .filter(|&k| s.roles[owned[k]].interrupt_driven())
            .collect();
        Controller {
            s,
            rng: fastrand::Rng::with_seed(s.config.seed.wrapping_add(c as u64)),
            kinds: kinds_for(s.guest),
            stopped: vec![false; owned.len()],
            resumed_at: vec![None; owned.len()],
            owned,
            tickets: VecDeque::new(),
            idle: VecDeque::new(),
            exclusive: None,
            kickable: (0..s.config.cpus)
                .filter(|&id| !s.roles[id].interrupt_driven())
                .collect(),
            halting,
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
            let kind = self.kinds[self.rng.usize(..self.kinds.len())];
            self.s.ops_by_kind[kind as usize].fetch_add(1, SeqCst);
            self.op(kind)?;
        }
        while let Some(t) = self.tickets.pop_front() {
            Self::check_ticket(t, self.deadline())?;
        }
        // The group's parked members stay paused: resumed below.
        self.exclusive = None;
        for k in 0..self.owned.len() {
            if self.stopped[k] {
                self.resume(k);
            }
            self.verify_progress(k)?;
        }
        while let Some(t) = self.idle.pop_front() {
            self.check_idle(t)?;
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

    /// Owned indices not in our exclusive group: ours to stop and resume.
    fn free(&self) -> Vec<usize> {
        (0..self.owned.len())
            .filter(|k| {
                self.exclusive
                    .as_ref()
                    .is_none_or(|e| !e.members.contains(k))
            })
            .collect()
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> Option<T> {
        (!from.is_empty()).then(|| from[self.rng.usize(..from.len())])
    }

    fn op(&mut self, kind: Kind) -> Check {
        let any = self.rng.usize(..self.s.config.cpus);
        let free = self.free();
        match kind {
            Kind::Kick => {
                let kickable = self.kickable.clone();
                if let Some(id) = self.pick(&kickable) {
                    self.vcpu(id).kick(Request::Kick);
                }
            }
            Kind::Stop => {
                if let Some(k) = self.pick(&free) {
                    self.stop(k)?;
                }
            }
            Kind::Resume => {
                if let Some(k) = self.pick(&free) {
                    if self.stopped[k] {
                        self.resume(k);
                    }
                }
            }
            Kind::PauseAll => {
                if free.is_empty() {
                    return Ok(());
                }
                for &k in &free {
                    self.verify_progress(k)?;
                    self.s.mark_paused(self.owned[k]);
                }
                let mine = free.iter().map(|&k| self.vcpu(self.owned[k]));
                pause_all(mine, self.deadline())
                    .map_err(|e| StressFailure(format!("pause_all: {e}")))?;
                for &k in &free {
                    self.stopped[k] = true;
                }
                let k = free[self.rng.usize(..free.len())];
                self.check_frozen(k)?;
            }
            Kind::ResumeAll => {
                let resumed: Vec<usize> = free.into_iter().filter(|&k| self.stopped[k]).collect();
                for &k in &resumed {
                    self.resumed_at[k] = Some(self.s.vm.progress(self.owned[k]));
                    self.stopped[k] = false;
                }
                resume_all(resumed.iter().map(|&k| self.vcpu(self.owned[k])));
                for &k in &resumed {
                    self.s.mark_running(self.owned[k]);
                }
            }
            Kind::RunOn => {
                let token = self.rng.u64(..);
                let ran = self.s.run_on_ran.clone();
                self.s.run_on_issued.fetch_add(1, SeqCst);
                let t = Instant::now();
                let got = self.vcpu(any).run_on(
                    move |v: &mut KvmVcpu| {
                        ran.fetch_add(1, SeqCst);
                        (v.id(), token)
                    },
                    self.deadline(),
                );
                lock(&self.s.run_on_ns).push(t.elapsed().as_nanos() as u64);
                match got {
                    Ok(r) if r == (any, token) => {}
                    other => return fail(format!("run_on on vCPU {any}: {other:?}")),
                }
            }
            Kind::RunOnAsync => {
                let token = self.rng.u64(..);
                let ran = self.s.run_on_ran.clone();
                self.s.run_on_issued.fetch_add(1, SeqCst);
                let ticket = self
                    .vcpu(any)
                    .run_on_async(move |v: &mut KvmVcpu| {
                        ran.fetch_add(1, SeqCst);
                        (v.id(), token)
                    })
                    .map_err(|e| StressFailure(format!("run_on_async: {e}")))?;
                self.tickets.push_back((any, token, ticket));
            }
            Kind::TicketWait => {
                if let Some(t) = self.tickets.pop_front() {
                    Self::check_ticket(t, self.deadline())?;
                }
            }
            Kind::SwitchTo => self.switch()?,
            Kind::Raise => self.s.raise(any),
            Kind::RunWhenIdle => {
                let halting = self.halting.clone();
                if let Some(k) = self.pick(&halting) {
                    if self.stopped[k] && self.rng.bool() {
                        self.idle_timeout_probe(k)?;
                    } else if self.idle.len() < MAX_IDLE {
                        self.idle_task(IdleQueue::Own(k))?;
                    }
                }
            }
            Kind::IdleGroup => {
                if self.s.idle_group.is_some() && self.idle.len() < MAX_IDLE {
                    self.idle_task(IdleQueue::Group)?;
                }
            }
            Kind::IdleWait => {
                if let Some(t) = self.idle.pop_front() {
                    if self.can_run(t.queue) {
                        self.check_idle(t)?;
                    } else {
                        self.idle.push_back(t);
                    }
                }
            }
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
        let id = self.owned[k];
        self.s.mark_paused(id);
        let t = Instant::now();
        self.vcpu(id)
            .stop(self.deadline())
            .map_err(|e| StressFailure(format!("stop: {e}")))?;
        lock(&self.s.stop_ns).push(t.elapsed().as_nanos() as u64);
        self.stopped[k] = true;
        self.check_frozen(k)
    }

    fn resume(&mut self, k: usize) {
        let id = self.owned[k];
        self.resumed_at[k] = Some(self.s.vm.progress(id));
        self.stopped[k] = false;
        self.vcpu(id).resume();
        self.s.mark_running(id);
    }

    /// A vCPU we stopped makes no guest progress, even across a run_on
    /// (and interrupts raised meanwhile stay pending).
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

    /// After our resume, the guest must move, by itself: nothing kicks a
    /// vCPU that waits for interrupts. A doorbell-halt vCPU gets one
    /// interrupt raised (a device's path: pending, then one kick if
    /// fresh), since its ringer may be paused; a timer-halt vCPU has its
    /// timer. Only `stress`'s `cli; hlt` vCPUs (user irqchip) get a kick:
    /// one, once seen halted, as nothing else lets them pass HLT.
    fn verify_progress(&mut self, k: usize) -> Check {
        let Some(at) = self.resumed_at[k].take() else {
            return Ok(());
        };
        let id = self.owned[k];
        let role = self.s.roles[id];
        let masked = role == Role::MaskedHalt;
        if masked && self.s.config.irqchip == Irqchip::Kernel {
            // HLT with IF=0 in the in-kernel irqchip never returns: no
            // kick can make this guest progress, by design.
            return Ok(());
        }
        if role == Role::DoorbellHalt {
            self.s.raise(id);
        }
        let deadline = self.deadline();
        let mut kicked = false;
        while self.s.vm.progress(id) <= at {
            if deadline.passed() || self.s.abort.load(SeqCst) {
                return fail(format!(
                    "vCPU {id} made no progress past {at} within {:?} of its resume{}: {}",
                    self.s.config.deadline,
                    if kicked { " and one kick" } else { "" },
                    self.s.describe(id)
                ));
            }
            if masked && !kicked && self.vcpu(id).mode() == Mode::Halted {
                self.vcpu(id).kick(Request::Kick);
                kicked = true;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        self.s.resumes_verified.fetch_add(1, SeqCst);
        Ok(())
    }

    /// Form an exclusive group over some of our vCPUs, switch it, or
    /// dissolve it (its parked members then stay stopped, ours to resume).
    /// After each step every member but the running one must be parked.
    fn switch(&mut self) -> Check {
        let Some(ex) = &self.exclusive else {
            if self.owned.len() < 2 {
                return Ok(());
            }
            let mut members: Vec<usize> = (0..self.owned.len()).collect();
            self.rng.shuffle(&mut members);
            members.truncate(self.rng.usize(2..=self.owned.len()));
            let first = members[0];
            for &k in &members[1..] {
                self.verify_progress(k)?;
                self.s.mark_paused(self.owned[k]);
            }
            let ctls = members
                .iter()
                .map(|&k| self.s.ctls[self.owned[k]].clone())
                .collect();
            let group = ExclusiveGroup::new(ctls, self.owned[first], self.deadline())
                .map_err(|e| StressFailure(format!("ExclusiveGroup::new: {e}")))?;
            for &k in &members[1..] {
                self.stopped[k] = true;
            }
            if self.stopped[first] {
                self.resumed_at[first] = Some(self.s.vm.progress(self.owned[first]));
                self.stopped[first] = false;
            }
            self.s.mark_running(self.owned[first]);
            self.s.exclusive_groups.fetch_add(1, SeqCst);
            self.exclusive = Some(Exclusive {
                group,
                members,
                running: first,
            });
            return self.check_exclusive();
        };
        if self.rng.u8(..8) == 0 {
            self.exclusive = None;
            return Ok(());
        }
        let target = ex.members[self.rng.usize(..ex.members.len())];
        let current = ex.running;
        if target != current {
            self.verify_progress(current)?;
            self.s.mark_paused(self.owned[current]);
        }
        let (to, deadline) = (self.owned[target], self.deadline());
        let ex = self.exclusive.as_mut().expect("checked above");
        let t = Instant::now();
        ex.group
            .switch_to(to, deadline)
            .map_err(|e| StressFailure(format!("switch_to({to}): {e}")))?;
        lock(&self.s.switch_ns).push(t.elapsed().as_nanos() as u64);
        ex.running = target;
        self.s.exclusive_switches.fetch_add(1, SeqCst);
        if target != current {
            self.stopped[current] = true;
            self.resumed_at[target] = Some(self.s.vm.progress(self.owned[target]));
            self.stopped[target] = false;
            self.s.mark_running(self.owned[target]);
        }
        self.check_exclusive()?;
        if target != current && self.rng.u8(..4) == 0 {
            self.check_frozen(current)?;
        }
        Ok(())
    }

    /// The group runs the member we switched to, and every other member
    /// is parked.
    fn check_exclusive(&self) -> Check {
        let ex = self.exclusive.as_ref().expect("a group");
        let running = self.owned[ex.running];
        if ex.group.running() != Some(running) {
            return fail(format!(
                "exclusive group runs {:?}, not vCPU {running}",
                ex.group.running()
            ));
        }
        for &k in &ex.members {
            let id = self.owned[k];
            if k != ex.running && !self.vcpu(id).is_parked() {
                return fail(format!(
                    "exclusive group: vCPU {id} is not parked while vCPU {running} runs: {}",
                    self.s.describe(id)
                ));
            }
        }
        Ok(())
    }

    /// Whether we may wait for an idle task of `queue` without waiting on
    /// another controller: one of its vCPUs is ours and not stopped.
    fn can_run(&self, queue: IdleQueue) -> bool {
        match queue {
            IdleQueue::Own(k) => !self.stopped[k],
            IdleQueue::Group => self.halting.iter().any(|&k| !self.stopped[k]),
        }
    }

    fn idle_closure(
        &self,
        ran: &Arc<AtomicU32>,
    ) -> impl FnOnce(&mut KvmVcpu) -> (usize, Mode) + Send + 'static {
        let (ran, all, ctls) = (ran.clone(), self.s.idle_ran.clone(), self.s.ctls.clone());
        move |v: &mut KvmVcpu| {
            ran.fetch_add(1, SeqCst);
            all.fetch_add(1, SeqCst);
            (v.id(), ctls[v.id()].mode())
        }
    }

    fn idle_task(&mut self, queue: IdleQueue) -> Check {
        let ran = Arc::new(AtomicU32::new(0));
        let f = self.idle_closure(&ran);
        let ticket = match queue {
            IdleQueue::Own(k) => self.vcpu(self.owned[k]).run_when_idle(f),
            IdleQueue::Group => self
                .s
                .idle_group
                .as_ref()
                .expect("asked for only with a group")
                .run_when_idle(f),
        }
        .map_err(|e| StressFailure(format!("run_when_idle ({queue:?}): {e}")))?;
        self.idle.push_back(IdleTicket { queue, ran, ticket });
        Ok(())
    }

    /// The task ran exactly once, on a vCPU of its queue, while halted.
    fn check_idle(&self, t: IdleTicket) -> Check {
        let (id, mode) = t
            .ticket
            .wait(self.deadline())
            .map_err(|e| StressFailure(format!("idle task ({:?}): {e}", t.queue)))?;
        let ok = match t.queue {
            IdleQueue::Own(k) => id == self.owned[k],
            IdleQueue::Group => self.s.roles[id].interrupt_driven(),
        };
        if !ok {
            return fail(format!(
                "idle task of {:?} ran on vCPU {id}, outside its queue",
                t.queue
            ));
        }
        if mode != Mode::Halted {
            return fail(format!(
                "idle task ran on vCPU {id} in mode {}",
                mode.name()
            ));
        }
        let n = t.ran.load(SeqCst);
        if n != 1 {
            return fail(format!("idle task reported its result but ran {n} times"));
        }
        self.s.idle_ok.fetch_add(1, SeqCst);
        Ok(())
    }

    /// A task queued on a vCPU we keep parked cannot run: its wait times
    /// out (whatever the timing) and it has not run. It may run once after
    /// a resume.
    fn idle_timeout_probe(&mut self, k: usize) -> Check {
        let ran = Arc::new(AtomicU32::new(0));
        let id = self.owned[k];
        let ticket = self
            .vcpu(id)
            .run_when_idle(self.idle_closure(&ran))
            .map_err(|e| StressFailure(format!("run_when_idle on parked vCPU {id}: {e}")))?;
        match ticket.wait(Deadline::after(Duration::from_micros(100))) {
            Err(Error::Timeout { .. }) => {}
            other => {
                return fail(format!(
                    "idle task on parked vCPU {id}: {other:?}, not Timeout"
                ))
            }
        }
        if ran.load(SeqCst) != 0 {
            return fail(format!("an idle task ran on parked vCPU {id}"));
        }
        lock(&self.s.idle_timed_out).push(ran);
        Ok(())
    }
}
