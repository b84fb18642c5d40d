//! kick: latency from a kick to the vCPU thread being out of KVM_RUN, for
//! a spinning vCPU and for one halted inside KVM's irqchip, under three
//! strategies; and the cost of stopping a vCPU that is already parked.

use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use brisk_control::{Deadline, Flow, Guest, Interrupt, Request, VcpuCtl};
use brisk_kvm::{Irqchip, SignalInterrupt};

use crate::rig::{answer, Flag, Rig, Timed};
use crate::sigmask;
use crate::stats::{Row, Table};
use crate::Opts;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Strategy {
    /// Set the request, CAS InGuest -> Exiting, signal only if won.
    Brisk,
    /// Set the flag and always signal (NVMM as in seed 000), with
    /// immediate_exit closing the race.
    AlwaysSignal,
    /// Set the flag and signal; the vCPU runs with KVM_SET_SIGNAL_MASK and
    /// eats the signal with sigtimedwait (pre-immediate_exit QEMU).
    SignalMask,
}

const STRATEGIES: [(Strategy, &str); 3] = [
    (Strategy::Brisk, "brisk (mode check + immediate_exit)"),
    (Strategy::AlwaysSignal, "always-signal (NVMM)"),
    (Strategy::SignalMask, "signal-mask (old QEMU)"),
];

/// A vCPU thread under one strategy, and how to kick it.
pub(crate) struct Kickable {
    pub(crate) kick: Box<dyn Fn()>,
    pub(crate) returns: Receiver<u64>,
    pub(crate) epoch: Instant,
    pub(crate) stop: Box<dyn FnOnce()>,
}

fn start(strategy: Strategy, guest: &str, irqchip: Irqchip) -> Kickable {
    let mut rig = Rig::new(guest, 1, irqchip);
    let bus = rig.bus.clone();
    let vcpu = rig.vcpus.pop().unwrap();
    let epoch = Instant::now();
    let (tx, returns) = mpsc::channel();
    let mut timed = Timed::kicks(vcpu, epoch, tx);
    match strategy {
        Strategy::Brisk => brisk_loop(rig, timed, returns, epoch).0,
        Strategy::AlwaysSignal | Strategy::SignalMask => {
            let (flag, exit) = (Arc::new(Flag::default()), Arc::new(Flag::default()));
            let (f, e) = (flag.clone(), exit.clone());
            let (itx, irx) = mpsc::channel();
            let t = thread::spawn(move || {
                let _rig = rig;
                if strategy == Strategy::SignalMask {
                    sigmask::install(&timed.inner);
                } else {
                    timed.inner.bind_thread(); // the handler sets immediate_exit
                }
                itx.send(SignalInterrupt::current_thread()).unwrap();
                while !e.get() {
                    f.take();
                    timed.inner.set_immediate_exit(false);
                    let r = timed.inner.enter().expect("KVM_RUN");
                    timed.returned(r.is_none());
                    match r {
                        None if strategy == Strategy::SignalMask => sigmask::eat_signal(),
                        None => {}
                        Some(exit) => {
                            assert_eq!(answer(&mut timed.inner, exit, &bus), Flow::Continue)
                        }
                    }
                }
            });
            let interrupt = Arc::new(irx.recv().unwrap());
            let i = interrupt.clone();
            Kickable {
                kick: Box::new(move || {
                    flag.set();
                    i.interrupt();
                }),
                returns,
                epoch,
                stop: Box::new(move || {
                    exit.set();
                    interrupt.interrupt();
                    t.join().unwrap();
                }),
            }
        }
    }
}

/// brisk's own loop (`VcpuCtl::run` + brisk's exit dispatch) on `timed`,
/// kicked with `VcpuCtl::kick`; also returns the control block.
fn brisk_loop(
    rig: Rig,
    timed: Timed,
    returns: Receiver<u64>,
    epoch: Instant,
) -> (Kickable, Arc<VcpuCtl<Timed>>) {
    let bus = rig.bus.clone();
    let ctl = Arc::new(VcpuCtl::<Timed>::new(0));
    let c = ctl.clone();
    let t = thread::spawn(move || {
        let _rig = rig;
        c.run(timed, |t, exit| Ok(answer(&mut t.inner, exit, &bus)))
    });
    let kickable = Kickable::of_vcpu(ctl.clone(), returns, epoch, move || {
        t.join().unwrap().expect("brisk loop");
    });
    (kickable, ctl)
}

impl Kickable {
    /// A vCPU in brisk's loop (on its own thread or a pool's), kicked with
    /// `VcpuCtl::kick`; stopped by an exit request, then `finish` (its
    /// join).
    pub(crate) fn of_vcpu(
        ctl: Arc<VcpuCtl<Timed>>,
        returns: Receiver<u64>,
        epoch: Instant,
        finish: impl FnOnce() + 'static,
    ) -> Kickable {
        let k = ctl.clone();
        Kickable {
            kick: Box::new(move || k.kick(Request::Kick)),
            returns,
            epoch,
            stop: Box::new(move || {
                ctl.request_exit();
                finish();
            }),
        }
    }
}

/// Kick `n` times, a gap apart (the vCPU is back in the guest, or blocked
/// in HLT, by then); latency = kick call -> KVM_RUN returned on the vCPU.
pub(crate) fn latencies(k: &Kickable, n: usize, gap: Duration) -> Vec<u64> {
    let mut out = Vec::with_capacity(n);
    thread::sleep(Duration::from_millis(20));
    for _ in 0..n {
        thread::sleep(gap);
        while k.returns.try_recv().is_ok() {}
        let t0 = k.epoch.elapsed().as_nanos() as u64;
        (k.kick)();
        // An event stamped before the kick belongs to earlier activity.
        while let Ok(t1) = k.returns.recv_timeout(Duration::from_secs(1)) {
            if t1 >= t0 {
                out.push(t1 - t0);
                break;
            }
        }
    }
    out
}

pub fn run(opts: &Opts) -> Vec<Table> {
    let n = if opts.quick { 150 } else { 1500 };
    let mut tables = Vec::new();
    for (scenario, guest, irqchip, gap) in [
        (
            "spinning vCPU",
            "spin",
            Irqchip::User,
            Duration::from_micros(500),
        ),
        (
            "vCPU halted in KVM's irqchip (HLT, IF=0)",
            "halt",
            Irqchip::Kernel,
            Duration::from_millis(1),
        ),
    ] {
        // Interleave strategies in rounds against machine noise.
        let mut samples: Vec<Vec<u64>> = vec![Vec::new(); STRATEGIES.len()];
        for _ in 0..3 {
            for (i, (s, _)) in STRATEGIES.iter().enumerate() {
                let k = start(*s, guest, irqchip);
                samples[i].extend(latencies(&k, n / 3, gap));
                (k.stop)();
            }
        }
        let rows = STRATEGIES
            .iter()
            .zip(samples)
            .map(|((_, name), s)| Row::new(*name, s))
            .collect();
        tables.push(Table::new(
            &format!("kick: kick() -> out of KVM_RUN, {scenario}"),
            "latency from the kick call to KVM_RUN returning on the vCPU thread",
            rows,
        ));
    }
    tables.push(halted_wake(opts));
    tables.push(stop_parked(opts));
    tables
}

/// A halted vCPU woken by brisk's kick: halted in user space (user
/// irqchip: a futex wake, no signal) vs halted inside KVM (kernel irqchip:
/// a signal). Measured to the vCPU thread being back at its entry point.
fn halted_wake(opts: &Opts) -> Table {
    let n = if opts.quick { 150 } else { 1500 };
    let mut samples = [Vec::new(), Vec::new()];
    // (kicks, signals, futex wake-ups) per mode, from brisk's counters: the
    // table shows what each kick cost, not just how long it took.
    let mut cost = [(0u64, 0u64, 0u64); 2];
    for _ in 0..3 {
        for (i, irqchip) in [Irqchip::User, Irqchip::Kernel].into_iter().enumerate() {
            let (kickable, counters) = halted(irqchip);
            samples[i].extend(latencies(&kickable, n / 3, Duration::from_millis(1)));
            let c = counters.counters().snapshot();
            cost[i].0 += c.kicks;
            cost[i].1 += c.signals_sent;
            cost[i].2 += c.wakeups;
            (kickable.stop)();
        }
    }
    let [user, kernel] = samples;
    let per_kick = |(kicks, n, _): (u64, u64, u64)| n as f64 / kicks.max(1) as f64;
    let wakes_per_kick = |(kicks, _, w): (u64, u64, u64)| w as f64 / kicks.max(1) as f64;
    Table::new(
        "kick: halted vCPU woken, kick() -> vCPU thread back at its entry point",
        "user irqchip: HLT exits to brisk, which blocks on a futex (the kick is a wake-up, no signal); kernel irqchip: HLT blocks in KVM_RUN (the kick is a signal)",
        vec![
            Row::new("user-space HLT (futex wake)", user)
                .with("signals/kick", per_kick(cost[0]))
                .with("wakeups/kick", wakes_per_kick(cost[0])),
            Row::new("in-kernel HLT (signal)", kernel)
                .with("signals/kick", per_kick(cost[1]))
                .with("wakeups/kick", wakes_per_kick(cost[1])),
        ],
    )
}

/// The `halt` guest on one vCPU in brisk's own loop on its own thread,
/// reporting when the loop is back at its entry point.
pub(crate) fn halted(irqchip: Irqchip) -> (Kickable, Arc<VcpuCtl<Timed>>) {
    let mut rig = Rig::new("halt", 1, irqchip);
    let epoch = Instant::now();
    let (tx, returns) = mpsc::channel();
    let timed = Timed::entries(rig.vcpus.pop().unwrap(), epoch, tx);
    brisk_loop(rig, timed, returns, epoch)
}

/// stop() on a vCPU that is already parked: brisk needs no signal and no
/// wake-up; always-signal sends one per stop.
fn stop_parked(opts: &Opts) -> Table {
    let n = if opts.quick { 2_000 } else { 20_000 };
    let deadline = || Deadline::after(Duration::from_secs(5));

    // brisk
    let mut rig = Rig::new("spin", 1, Irqchip::User);
    let bus = rig.bus.clone();
    let ctl = Arc::new(VcpuCtl::new(0));
    let c = ctl.clone();
    let vcpu = rig.vcpus.pop().unwrap();
    let t = thread::spawn(move || {
        let _rig = rig;
        c.run(vcpu, |v, exit| Ok(answer(v, exit, &bus)))
    });
    ctl.stop(deadline()).unwrap();
    let before = ctl.counters().snapshot();
    let mut brisk = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        ctl.stop(deadline()).unwrap();
        brisk.push(t0.elapsed().as_nanos() as u64);
    }
    let after = ctl.counters().snapshot();
    ctl.request_exit();
    t.join().unwrap().unwrap();
    let signals = (after.signals_sent - before.signals_sent) as f64 / n as f64;
    let wakes = (after.wakeups - before.wakeups) as f64 / n as f64;

    // always-signal: a parked thread that a stop still signals.
    let parked = Arc::new((Mutex::new(true), Condvar::new()));
    let p = parked.clone();
    let (itx, irx) = mpsc::channel();
    let t = thread::spawn(move || {
        itx.send(SignalInterrupt::current_thread()).unwrap();
        let (m, cv) = &*p;
        let mut g = m.lock().unwrap();
        while *g {
            g = cv.wait(g).unwrap(); // signals interrupt the futex wait
        }
    });
    let interrupt = irx.recv().unwrap();
    let flag = Flag::default();
    let mut always = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        flag.set();
        interrupt.interrupt();
        let _acked = *parked.0.lock().unwrap(); // already parked
        always.push(t0.elapsed().as_nanos() as u64);
    }
    *parked.0.lock().unwrap() = false;
    parked.1.notify_all();
    t.join().unwrap();

    Table::new(
        "kick: stop() on a vCPU already parked (outside guest mode)",
        "time per stop call; brisk's counters show the signals and futex wake-ups it sent",
        vec![
            Row::new("brisk stop()", brisk)
                .with("signals/stop", signals)
                .with("wakeups/stop", wakes),
            Row::new("always-signal stop", always).with("signals/stop", 1.0),
        ],
    )
}
