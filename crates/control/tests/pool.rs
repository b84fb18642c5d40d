//! M:N: many stand-in vCPUs over a few pool threads keep every promise of
//! the control plane (kicks, interrupts, stop, run_on, idle tasks, exit),
//! and a vCPU on no thread is woken without a signal.

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use brisk_control::*;
use common::*;

/// A pool running stand-in vCPUs; ends (and checks) every vCPU on drop.
struct PoolRig {
    ctls: Vec<Arc<VcpuCtl<Fake>>>,
    shared: Vec<Arc<Shared>>,
    ends: mpsc::Receiver<(usize, Result<RunEnd, RunError<String>>)>,
    pool: Option<Pool>,
}

fn handler() -> ExitHandler<Fake> {
    Box::new(|_, exit: FakeExit| {
        Ok(if exit.0 == ExitKind::Halt {
            Flow::Halt
        } else {
            Flow::Continue
        })
    })
}

impl PoolRig {
    fn start(threads: usize, behaviours: &[Behaviour], if_flag: bool) -> PoolRig {
        Self::start_with(
            threads,
            behaviours,
            if_flag,
            Some(Duration::from_millis(1)),
            None,
        )
    }

    fn start_with(
        threads: usize,
        behaviours: &[Behaviour],
        if_flag: bool,
        slice: Option<Duration>,
        on_thread_start: Option<ThreadStart>,
    ) -> PoolRig {
        let (tx, ends) = mpsc::channel();
        let mut ctls = Vec::new();
        let mut shared = Vec::new();
        let mut vcpus = Vec::new();
        for (id, &behaviour) in behaviours.iter().enumerate() {
            let ctl = Arc::new(VcpuCtl::new(id));
            let s = Arc::new(Shared::default());
            s.if_flag.store(if_flag, SeqCst);
            let tx = tx.clone();
            vcpus.push(PoolVcpu {
                ctl: ctl.clone(),
                guest: Fake {
                    behaviour,
                    shared: s.clone(),
                    occupancy: Arc::default(),
                    progress: 0,
                },
                on_exit: handler(),
                on_end: Box::new(move |end| {
                    let _ = tx.send((id, end));
                }),
            });
            ctls.push(ctl);
            shared.push(s);
        }
        let config = PoolConfig {
            threads,
            slice,
            on_thread_start,
        };
        let pool = Pool::start(config, vcpus).expect("pool threads");
        PoolRig {
            ctls,
            shared,
            ends,
            pool: Some(pool),
        }
    }

    /// Ask every vCPU to exit; return how each loop ended, by id.
    fn finish(&mut self) -> Vec<Result<RunEnd, RunError<String>>> {
        for c in &self.ctls {
            c.request_exit();
        }
        let mut ends: Vec<_> = (0..self.ctls.len()).map(|_| None).collect();
        for _ in 0..self.ctls.len() {
            let (id, end) = self
                .ends
                .recv_timeout(Duration::from_secs(10))
                .expect("every vCPU's loop ends");
            ends[id] = Some(end);
        }
        self.pool.take().unwrap().join();
        ends.into_iter().map(Option::unwrap).collect()
    }

    fn all_halted(&self) {
        until("every vCPU halted", || {
            self.ctls.iter().all(|c| c.state() == VcpuState::Halted)
        });
    }
}

impl Drop for PoolRig {
    fn drop(&mut self) {
        for s in &self.shared {
            *s.hold.lock().unwrap() = false;
            s.cv.notify_all();
        }
        if self.pool.is_some() {
            let ends = self.finish();
            if !std::thread::panicking() {
                assert!(ends.iter().all(|e| *e == Ok(RunEnd::ExitRequested)));
            }
        }
    }
}

#[test]
fn sixteen_halting_vcpus_on_two_threads_take_every_interrupt() {
    let rig = PoolRig::start(2, &[Behaviour::Halt; 16], true);
    rig.all_halted();
    for round in 1..=20u64 {
        for (ctl, s) in rig.ctls.iter().zip(&rig.shared) {
            s.raise(ctl);
        }
        for (i, s) in rig.shared.iter().enumerate() {
            until(&format!("vCPU {i} took interrupt {round}"), || {
                s.injected.load(SeqCst) >= round
            });
        }
    }
    for ctl in &rig.ctls {
        let c = ctl.counters().snapshot();
        // Each woke from a halt on no thread: a queue entry, no signal.
        assert_eq!(c.signals_sent, 0, "vCPU {}: {c:?}", ctl.id());
    }
}

#[test]
fn a_kick_to_a_vcpu_on_no_thread_sends_no_signal_and_wakes_it() {
    let rig = PoolRig::start(1, &[Behaviour::Halt; 3], false);
    rig.all_halted();
    let before = rig.shared[1].entries.load(SeqCst);
    rig.ctls[1].kick(Request::Kick);
    until("the kicked vCPU re-entered", || {
        rig.shared[1].entries.load(SeqCst) > before
    });
    let c = rig.ctls[1].counters().snapshot();
    assert_eq!(c.signals_sent, 0);
    assert!(c.wakeups >= 1);
    // The halt it left a thread in is counted when it ends.
    assert!(c.halted_ns > 0, "{c:?}");
}

#[test]
fn spinning_vcpus_share_one_thread_by_time_slices() {
    let rig = PoolRig::start(1, &[Behaviour::Spin; 4], false);
    // A spinning guest leaves only when kicked: each one running again
    // means the slicer preempted the others for it.
    for round in 1..=3u64 {
        for (i, s) in rig.shared.iter().enumerate() {
            until(&format!("vCPU {i} entered {round} times"), || {
                s.entries.load(SeqCst) >= round
            });
        }
    }
    let preempted: u64 = rig
        .ctls
        .iter()
        .map(|c| c.counters().snapshot().kicked_exits)
        .sum();
    assert!(preempted >= 3, "{preempted} preemptions");
}

#[test]
fn no_slicer_no_preemption_when_threads_suffice() {
    // As many threads as vCPUs: nobody ever waits, so nothing is kicked.
    let rig = PoolRig::start(2, &[Behaviour::Spin; 2], false);
    for s in &rig.shared {
        until("both vCPUs in the guest", || s.entries.load(SeqCst) >= 1);
    }
    for c in &rig.ctls {
        assert_eq!(c.counters().snapshot().signals_sent, 0);
    }
}

#[test]
fn stop_run_on_and_resume_a_vcpu_that_holds_no_thread() {
    let rig = PoolRig::start(1, &[Behaviour::Halt; 4], false);
    rig.all_halted();
    let v = &rig.ctls[2];
    v.stop(soon()).unwrap();
    assert!(v.is_parked());
    assert_eq!(v.halted_while_parked(), Some(true));
    // run_on on a parked vCPU on no thread runs on a pool thread.
    let progress = v.run_on(|f: &mut Fake| f.progress, soon()).unwrap();
    assert!(progress >= 1);
    let frozen = rig.shared[2].entries.load(SeqCst);
    rig.ctls[2].kick(Request::Kick);
    assert_eq!(rig.shared[2].entries.load(SeqCst), frozen);
    v.resume();
    // The kick posted while parked ends its halt after the resume.
    until("the resumed vCPU ran", || {
        rig.shared[2].entries.load(SeqCst) > frozen
    });
    pause_all(rig.ctls.iter().map(|c| &**c), soon()).unwrap();
    assert!(rig.ctls.iter().all(|c| c.is_parked()));
    resume_all(rig.ctls.iter().map(|c| &**c));
    rig.all_halted();
}

#[test]
fn idle_tasks_run_on_the_pool_while_the_guest_is_halted() {
    let rig = PoolRig::start(2, &[Behaviour::Halt; 8], false);
    rig.all_halted();
    let group = IdleGroup::new(rig.ctls.clone()).unwrap();
    let tickets: Vec<_> = (0..32)
        .map(|i| group.run_when_idle(move |_: &mut Fake| i * 2).unwrap())
        .collect();
    let own = rig.ctls[5]
        .run_when_idle(|f: &mut Fake| f.progress)
        .unwrap();
    for (i, t) in tickets.into_iter().enumerate() {
        assert_eq!(t.wait(soon()).unwrap(), i * 2);
    }
    assert!(own.wait(soon()).unwrap() >= 1);
    let tasks: u64 = rig
        .ctls
        .iter()
        .map(|c| c.counters().snapshot().idle_tasks)
        .sum();
    assert_eq!(tasks, 33);
}

#[test]
fn a_panicking_exit_handler_ends_only_its_vcpu() {
    let (tx, ends) = mpsc::channel();
    let mut vcpus = Vec::new();
    let mut ctls = Vec::new();
    for id in 0..3 {
        let ctl = Arc::new(VcpuCtl::new(id));
        let tx = tx.clone();
        let on_exit: ExitHandler<Fake> = if id == 1 {
            Box::new(|_, _| panic!("exit handler bug"))
        } else {
            handler()
        };
        vcpus.push(PoolVcpu {
            ctl: ctl.clone(),
            guest: Fake {
                behaviour: Behaviour::Io,
                shared: Arc::default(),
                occupancy: Arc::default(),
                progress: 0,
            },
            on_exit,
            on_end: Box::new(move |end| {
                let _ = tx.send((id, end));
            }),
        });
        ctls.push(ctl);
    }
    let config = PoolConfig {
        threads: 1,
        slice: Some(Duration::from_millis(1)),
        on_thread_start: None,
    };
    let pool = Pool::start(config, vcpus).unwrap();
    let (id, end) = ends.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!((id, end), (1, Err(RunError::Panicked { vcpu: 1 })));
    assert_eq!(ctls[1].state(), VcpuState::Exited);
    // The others still run on the same thread.
    let seen = ctls[0].counters().snapshot().entries;
    until("vCPU 0 goes on", || {
        ctls[0].counters().snapshot().entries > seen
    });
    ctls[0].request_exit();
    ctls[2].request_exit();
    for _ in 0..2 {
        let (_, end) = ends.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(end, Ok(RunEnd::ExitRequested));
    }
    pool.join();
}

#[test]
fn with_no_thread_able_to_start_every_vcpu_ends_at_once() {
    let refuse: ThreadStart = Arc::new(|_| false);
    let mut rig = PoolRig::start_with(2, &[Behaviour::Io; 3], false, None, Some(refuse));
    let ends = rig.finish();
    for (id, end) in ends.into_iter().enumerate() {
        assert_eq!(end, Err(RunError::NoThread { vcpu: id }));
    }
    assert!(rig.ctls.iter().all(|c| c.state() == VcpuState::Exited));
}

#[test]
fn exit_ends_halted_parked_and_running_vcpus_and_the_threads() {
    let mut rig = PoolRig::start(
        2,
        &[
            Behaviour::Halt,
            Behaviour::Spin,
            Behaviour::Io,
            Behaviour::Halt,
        ],
        false,
    );
    until("vCPU 0 halted", || rig.ctls[0].state() == VcpuState::Halted);
    rig.ctls[3].stop(soon()).unwrap();
    let ends = rig.finish();
    assert!(ends.iter().all(|e| *e == Ok(RunEnd::ExitRequested)));
}

/// A halted vCPU on no thread that is parked and resumed counts the park
/// as parked time only: halted and parked time never add up to more than
/// the time that passed.
#[test]
fn a_park_of_a_halted_vcpu_is_not_counted_as_halted_too() {
    let t0 = std::time::Instant::now();
    let rig = PoolRig::start(1, &[Behaviour::Halt], false);
    rig.all_halted();
    let v = &rig.ctls[0];
    v.stop(soon()).unwrap();
    // However long this takes, it is parked time.
    std::thread::sleep(Duration::from_millis(30));
    v.resume();
    rig.all_halted();
    v.stop(soon()).unwrap();
    let c = v.counters().snapshot();
    let elapsed = t0.elapsed().as_nanos() as u64;
    assert!(c.parked_ns > 0 && c.halted_ns > 0, "{c:?}");
    assert!(
        c.halted_ns + c.parked_ns <= elapsed,
        "halted {} + parked {} > {elapsed} ns elapsed",
        c.halted_ns,
        c.parked_ns
    );
    v.resume();
}
