//! Control-plane tests against a stand-in guest: deterministic, no KVM.

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Barrier};
use std::thread;

use brisk_control::*;
use common::*;

#[test]
fn stop_parks_and_resume_continues_for_every_behaviour() {
    for b in [Behaviour::Spin, Behaviour::Io, Behaviour::Halt] {
        let vm = Running::start(b);
        vm.ctl.stop(soon()).unwrap();
        assert!(vm.ctl.is_parked());
        assert_eq!(vm.ctl.mode(), Mode::Parked);
        let frozen = vm.progress();
        assert_eq!(
            vm.progress(),
            frozen,
            "a parked vCPU must not enter the guest"
        );
        vm.ctl.resume();
        // Spin and Io re-enter after the resume. A halted guest stays
        // halted (only a kick or an interrupt ends a halt), so kick it:
        // whether the stop came before or after its first HLT, it runs.
        if b == Behaviour::Halt {
            vm.ctl.kick(Request::Kick);
        }
        until("progress after resume", || vm.progress() > frozen);
    }
}

#[test]
fn many_racing_kickers_send_exactly_one_signal_per_entry() {
    let vm = Running::start(Behaviour::Spin);
    vm.wait_in_guest();
    *vm.shared.hold.lock().unwrap() = true; // keep it "in the guest" after the signal
    let kickers = 8;
    let barrier = Arc::new(Barrier::new(kickers));
    let handles: Vec<_> = (0..kickers)
        .map(|_| {
            let (ctl, b) = (vm.ctl.clone(), barrier.clone());
            thread::spawn(move || {
                b.wait();
                for _ in 0..100 {
                    ctl.kick(Request::Kick);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let c = vm.ctl.counters().snapshot();
    assert_eq!(c.kicks, 800);
    assert_eq!(
        c.signals_sent, 1,
        "only the kicker that won InGuest->Exiting signals"
    );
    assert_eq!(c.signals_elided, 799);
    assert_eq!(vm.shared.signals.load(SeqCst), 1);
}

#[test]
fn stopping_a_parked_vcpu_sends_no_signal() {
    let vm = Running::start(Behaviour::Spin);
    vm.ctl.stop(soon()).unwrap();
    let before = vm.ctl.counters().snapshot();
    for _ in 0..1000 {
        vm.ctl.stop(soon()).unwrap();
    }
    let after = vm.ctl.counters().snapshot();
    assert_eq!(after.signals_sent, before.signals_sent);
    assert_eq!(after.wakeups, before.wakeups, "not even a futex wake");
    assert_eq!(after.signals_elided, before.signals_elided + 1000);
}

#[test]
fn kicking_a_vcpu_outside_the_guest_sends_no_signal() {
    let vm = Running::start(Behaviour::Spin);
    vm.ctl.stop(soon()).unwrap();
    let before = vm.ctl.counters().snapshot();
    vm.ctl.kick(Request::Kick); // parked: futex wake at most, never a signal
    let after = vm.ctl.counters().snapshot();
    assert_eq!(after.signals_sent, before.signals_sent);
}

#[test]
fn work_queued_on_a_parked_vcpu_always_runs() {
    // Work posted to a parked vCPU runs there (a parked thread is woken for
    // Work), and a resume right after never strands it.
    let vm = Running::start(Behaviour::Spin);
    for _ in 0..200 {
        vm.ctl.stop(soon()).unwrap();
        let ticket = vm.ctl.run_on_async(|f: &mut Fake| f.progress).unwrap();
        vm.ctl.resume();
        ticket.wait(soon()).unwrap();
    }
}

#[test]
fn run_on_returns_the_closure_result_on_the_vcpu_thread() {
    let vm = Running::start(Behaviour::Io);
    let me = thread::current().id();
    let (tid, p) = vm
        .ctl
        .run_on(|f: &mut Fake| (thread::current().id(), f.progress), soon())
        .unwrap();
    assert_ne!(tid, me);
    let p2 = vm.ctl.run_on(|f: &mut Fake| f.progress, soon()).unwrap();
    assert!(p2 >= p);
    assert!(vm.ctl.counters().snapshot().work_run >= 2);
}

#[test]
fn run_on_from_the_vcpu_thread_runs_inline_or_reports_reentry() {
    let vm = Running::start(Behaviour::Io);
    let ctl = vm.ctl.clone();
    // Inside a run_on closure the guest is borrowed: a nested run_on on the
    // same vCPU must report re-entry, not deadlock.
    let nested = vm
        .ctl
        .run_on(
            move |_f: &mut Fake| ctl.run_on(|f: &mut Fake| f.progress, short()),
            soon(),
        )
        .unwrap();
    assert_eq!(nested, Err(Error::Reentrant { vcpu: 0 }));
}

#[test]
fn stop_reports_a_vcpu_that_does_not_acknowledge() {
    let vm = Running::start(Behaviour::Io);
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    // Make the vCPU unresponsive: block its thread inside a run_on closure.
    let ticket = vm
        .ctl
        .run_on_async(move |_f: &mut Fake| release_rx.recv().unwrap())
        .unwrap();
    assert_eq!(
        vm.ctl.stop(short()),
        Err(Error::Timeout {
            op: Op::Stop,
            vcpus: vec![0]
        })
    );
    let r = vm.ctl.run_on(|f: &mut Fake| f.progress, short());
    assert_eq!(
        r,
        Err(Error::Timeout {
            op: Op::RunOn,
            vcpus: vec![0]
        })
    );
    release_tx.send(()).unwrap();
    ticket.wait(soon()).unwrap();
    // Once released it acknowledges the stop it was asked for.
    vm.ctl.stop(soon()).unwrap();
}

#[test]
fn pause_all_names_only_the_vcpus_that_did_not_park() {
    let vms: Vec<Running> = (0..3)
        .map(|i| Running::start_id(i, Behaviour::Spin))
        .collect();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let ticket = vms[1]
        .ctl
        .run_on_async(move |_f: &mut Fake| release_rx.recv().unwrap())
        .unwrap();
    let ctls: Vec<&VcpuCtl<Fake>> = vms.iter().map(|r| &*r.ctl).collect();
    assert_eq!(
        pause_all(ctls.iter().copied(), short()),
        Err(Error::Timeout {
            op: Op::PauseAll,
            vcpus: vec![1]
        })
    );
    assert!(vms[0].ctl.is_parked() && vms[2].ctl.is_parked());
    release_tx.send(()).unwrap();
    ticket.wait(soon()).unwrap();
    pause_all(ctls.iter().copied(), soon()).unwrap();
    resume_all(ctls.iter().copied());
    for v in &vms {
        assert!(!v.ctl.is_paused());
    }
}

#[test]
fn a_halted_vcpu_is_woken_without_a_signal() {
    let vm = Running::start(Behaviour::Halt);
    until("the vCPU to halt", || vm.ctl.mode() == Mode::Halted);
    let before = vm.ctl.counters().snapshot();
    vm.ctl.stop(soon()).unwrap();
    let after = vm.ctl.counters().snapshot();
    assert_eq!(after.signals_sent, before.signals_sent);
    assert_eq!(after.wakeups, before.wakeups + 1);
}

#[test]
fn operations_on_an_exited_vcpu_fail_at_once() {
    let mut vm = Running::start(Behaviour::Io);
    assert_eq!(vm.finish(), Ok(RunEnd::ExitRequested));
    assert_eq!(vm.ctl.mode(), Mode::Exited);
    assert_eq!(
        vm.ctl.stop(soon()),
        Err(Error::Exited {
            op: Op::Stop,
            vcpu: 0
        })
    );
    assert!(matches!(
        vm.ctl.run_on(|f: &mut Fake| f.progress, soon()),
        Err(Error::Exited { .. })
    ));
}

#[test]
fn queued_work_is_released_when_the_vcpu_exits() {
    let mut vm = Running::start(Behaviour::Io);
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let blocker = vm
        .ctl
        .run_on_async(move |_f: &mut Fake| {
            started_tx.send(()).unwrap();
            release_rx.recv().unwrap()
        })
        .unwrap();
    started_rx.recv().unwrap();
    let queued = vm.ctl.run_on_async(|f: &mut Fake| f.progress).unwrap();
    vm.ctl.request_exit();
    release_tx.send(()).unwrap();
    blocker.wait(soon()).unwrap();
    vm.finish().unwrap();
    // Either it ran before the exit request was seen, or it reports Exited:
    // never a wait until the deadline.
    match queued.wait(soon()) {
        Ok(_) | Err(Error::Exited { .. }) => {}
        Err(e) => panic!("unexpected {e}"),
    }
}

#[test]
fn an_exclusive_group_never_runs_two_members_at_once() {
    let occupancy = Arc::new(Occupancy::default());
    let vms: Vec<Running> = (0..3)
        .map(|i| Running::start_in(i, Behaviour::Spin, occupancy.clone()))
        .collect();
    let group =
        ExclusiveGroup::new(vms.iter().map(|r| r.ctl.clone()).collect(), 0, soon()).unwrap();
    assert_eq!(group.running(), Some(0));
    // The members ran freely before the group existed: count from here.
    occupancy.violations.store(0, SeqCst);
    let mut rng = fastrand::Rng::with_seed(0x2545_f491_4f6c_dd1d);
    let mut ran = [false; 3];
    for _ in 0..500 {
        let target = rng.usize(..3);
        group.switch_to(target, soon()).unwrap();
        assert_eq!(group.running(), Some(target));
        for (i, v) in vms.iter().enumerate() {
            if i != target {
                assert!(v.ctl.is_parked(), "vCPU {i} runs beside {target}");
            }
        }
        // Let the target actually enter now and then.
        if rng.u8(..4) == 0 {
            until("the target to enter", || {
                vms[target].ctl.mode() == Mode::InGuest
            });
            ran[target] = true;
        }
    }
    assert_eq!(
        occupancy.violations.load(SeqCst),
        0,
        "two members were in the guest at once"
    );
    assert!(ran.iter().all(|r| *r));
    assert_eq!(
        group.switch_to(7, soon()),
        Err(Error::NotMember { vcpu: 7 })
    );
}

/// Wait (bounded, blocking in poll) for the state eventfd to be readable.
fn readable(fd: std::os::fd::RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

#[test]
fn the_state_eventfd_follows_every_transition() {
    let vm = Running::start(Behaviour::Halt);
    let ctl = &vm.ctl;
    let fd = ctl.state_fd();
    // Created -> Running -> Halted, seen by blocking on the fd.
    let mut seen = 0;
    while ctl.state() != VcpuState::Halted {
        assert!(readable(fd, 10_000), "no transition to Halted");
        seen += ctl.take_transitions();
    }
    // The vCPU may have halted before the loop looked: the fd kept count.
    seen += ctl.take_transitions();
    assert!(seen >= 2, "Created -> Running -> Halted is two transitions");
    let mut rng = fastrand::Rng::with_seed(0x9e37_79b9_7f4a_7c15);
    for _ in 0..300 {
        ctl.take_transitions();
        match rng.u8(..3) {
            0 => {
                let was = ctl.state();
                ctl.stop(soon()).unwrap();
                assert_eq!(ctl.state(), VcpuState::Parked);
                if was != VcpuState::Parked {
                    assert!(readable(fd, 0), "stopping from {was:?} left the fd silent");
                }
            }
            1 if ctl.is_paused() => {
                ctl.resume();
                // Parked -> Running (-> Halted again): each readable.
                assert!(readable(fd, 10_000), "resume left the fd silent");
                assert!(ctl.take_transitions() >= 1);
                until("the guest to halt again", || {
                    ctl.state() == VcpuState::Halted
                });
            }
            _ if ctl.state() == VcpuState::Halted => {
                ctl.kick(Request::Kick); // Halted -> Running -> Halted
                assert!(readable(fd, 10_000), "a wake-up left the fd silent");
                assert!(ctl.take_transitions() >= 1);
            }
            _ => {}
        }
    }
    ctl.request_exit();
    until("exit", || ctl.state() == VcpuState::Exited);
    assert!(readable(fd, 0));
}

#[test]
fn idle_tasks_run_only_while_the_guest_is_halted() {
    let vm = Running::start(Behaviour::Halt);
    let tickets: Vec<_> = (0..100)
        .map(|_| {
            let ctl = vm.ctl.clone();
            vm.ctl
                .run_when_idle(move |f: &mut Fake| (ctl.mode(), ctl.state(), f.progress))
                .unwrap()
        })
        .collect();
    let results: Vec<_> = tickets
        .into_iter()
        .map(|t| t.wait(soon()).unwrap())
        .collect();
    for (mode, state, _) in &results {
        assert_eq!((*mode, *state), (Mode::Halted, VcpuState::Halted));
    }
    // One halt stretch, no guest code in between: the guest did not move.
    assert!(results.windows(2).all(|w| w[0].2 == w[1].2));
    let c = vm.ctl.counters().snapshot();
    assert_eq!(c.idle_tasks, 100);
    assert_eq!(c.signals_sent, 0, "queueing idle work never signals");
}

#[test]
fn idle_tasks_never_run_while_the_guest_runs() {
    let mut vm = Running::start(Behaviour::Spin);
    vm.wait_in_guest();
    let ticket = vm.ctl.run_when_idle(|f: &mut Fake| f.progress).unwrap();
    assert_eq!(
        ticket.wait(short()),
        Err(Error::Timeout {
            op: Op::RunOn,
            vcpus: vec![0]
        })
    );
    let queued = vm.ctl.run_when_idle(|f: &mut Fake| f.progress).unwrap();
    assert_eq!(vm.ctl.counters().snapshot().idle_tasks, 0);
    assert_eq!(
        vm.ctl.counters().snapshot().kicks,
        0,
        "idle work does not kick"
    );
    vm.finish().unwrap();
    assert!(matches!(queued.wait(soon()), Err(Error::Exited { .. })));
}

#[test]
fn a_request_is_served_before_the_next_idle_task() {
    let vm = Running::start(Behaviour::Halt);
    until("the vCPU to halt", || vm.ctl.mode() == Mode::Halted);
    let (release, blocked) = std::sync::mpsc::channel::<()>();
    let (started_tx, started) = std::sync::mpsc::channel::<()>();
    let first = vm
        .ctl
        .run_when_idle(move |_f: &mut Fake| {
            started_tx.send(()).unwrap();
            blocked.recv().unwrap()
        })
        .unwrap();
    let rest: Vec<_> = (0..10)
        .map(|_| vm.ctl.run_when_idle(|_f: &mut Fake| ()).unwrap())
        .collect();
    started.recv().unwrap();
    // High priority work arrives while the first idle task runs.
    let ctl = vm.ctl.clone();
    let urgent = vm
        .ctl
        .run_on_async(move |_f: &mut Fake| ctl.counters().snapshot().idle_tasks)
        .unwrap();
    release.send(()).unwrap();
    assert_eq!(
        urgent.wait(soon()).unwrap(),
        1,
        "run_on ran right after the running idle task"
    );
    first.wait(soon()).unwrap();
    for t in rest {
        t.wait(soon()).unwrap(); // the rest run at the next halt
    }
    assert_eq!(vm.ctl.counters().snapshot().idle_tasks, 11);
}

#[test]
fn only_a_kick_or_a_deliverable_interrupt_ends_a_halt() {
    let vm = Running::start_if(Behaviour::Halt);
    until("the vCPU to halt", || vm.ctl.mode() == Mode::Halted);
    let progress = || vm.ctl.run_on(|f: &mut Fake| f.progress, soon()).unwrap();
    let halted_at = progress();
    // Served while halted; the guest stays halted and does not move.
    vm.ctl.stop(soon()).unwrap();
    vm.ctl.resume();
    assert_eq!(progress(), halted_at, "stop/resume/run_on woke the guest");
    until("the vCPU to halt again", || vm.ctl.mode() == Mode::Halted);
    vm.ctl.kick(Request::Kick);
    until("the guest to run past its HLT", || {
        progress() == halted_at + 1
    });
    vm.shared.raise(&vm.ctl);
    until("the guest to take the interrupt", || {
        progress() == halted_at + 2
    });
    assert_eq!(vm.shared.injected.load(SeqCst), 1);
    assert_eq!(vm.ctl.counters().snapshot().signals_sent, 0);
}

#[test]
fn an_idle_group_task_runs_on_whichever_member_is_halted() {
    let spin = Running::start_id(0, Behaviour::Spin);
    let halt = Running::start_id(1, Behaviour::Halt);
    spin.wait_in_guest();
    let group = IdleGroup::new(vec![spin.ctl.clone(), halt.ctl.clone()]).unwrap();
    let tickets: Vec<_> = (0..50)
        .map(|_| {
            let (s, h) = (spin.ctl.clone(), halt.ctl.clone());
            group
                .run_when_idle(move |_f: &mut Fake| (s.mode(), h.mode()))
                .unwrap()
        })
        .collect();
    for t in tickets {
        // Ran on vCPU 1 (the halted one) while it was halted; vCPU 0 was
        // never taken out of its guest for it.
        let (_, h) = t.wait(soon()).unwrap();
        assert_eq!(h, Mode::Halted);
    }
    assert_eq!(halt.ctl.counters().snapshot().idle_tasks, 50);
    assert_eq!(spin.ctl.counters().snapshot().idle_tasks, 0);
    assert_eq!(spin.ctl.counters().snapshot().kicks, 0);
    assert_eq!(
        IdleGroup::new(vec![halt.ctl.clone()]).err(),
        Some(Error::AlreadyGrouped { vcpu: 1 })
    );
}

#[test]
fn idle_group_tasks_wait_for_a_member_to_halt() {
    let mut spin = Running::start(Behaviour::Spin);
    spin.wait_in_guest();
    let group = IdleGroup::new(vec![spin.ctl.clone()]).unwrap();
    let ticket = group.run_when_idle(|f: &mut Fake| f.progress).unwrap();
    assert!(matches!(ticket.wait(short()), Err(Error::Timeout { .. })));
    let queued = group.run_when_idle(|f: &mut Fake| f.progress).unwrap();
    spin.finish().unwrap();
    // The last member left: queued work is released, not left to time out.
    assert!(matches!(queued.wait(soon()), Err(Error::Exited { .. })));
    assert!(matches!(
        group.run_when_idle(|_f: &mut Fake| ()),
        Err(Error::Exited { .. })
    ));
}
