//! The KVM side of the control-plane review's findings at 9ee91d1
//! (`../shared/reviews/control-plane-review.md`): each test fails on that
//! commit and passes now. The stand-in side is crates/control/tests/findings.rs.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use brisk_vmm::control::{pause_all, resume_all, Guest, Mode, Request};
use brisk_vmm::{
    require_kvm, Irqchip, KvmVcpu, Machine, Output, ShutdownError, Vm, VmConfig, VmEnd,
};
use common::{soon, start, wait_mode, wait_progress};

/// Finding 1 on KVM: `tick`, halted, paused; a tick arrives; run_on reads
/// the registers; resume. The guest must take that tick and every later
/// one, and power off after its 100.
#[test]
fn a_tick_while_paused_and_a_run_on_lose_no_wake_up() {
    require_kvm!();
    let vm = start("tick", 1, Irqchip::User);
    let ready = std::time::Instant::now() + Duration::from_secs(30);
    while !(vm.progress(0) >= 5 && vm.vcpu(0).mode() == Mode::Halted) {
        assert!(std::time::Instant::now() < ready, "the guest never ticked");
        std::thread::yield_now();
    }
    vm.vcpu(0).stop(soon()).unwrap();
    let pending = vm.pending_interrupts(0).unwrap();
    while !pending.any() {
        assert!(std::time::Instant::now() < ready, "no tick while paused");
        std::thread::sleep(Duration::from_millis(1));
    }
    let rip = vm
        .vcpu(0)
        .run_on(|v: &mut KvmVcpu| v.fd().get_regs().unwrap().rip, soon())
        .unwrap();
    assert!(rip > 0);
    vm.vcpu(0).resume();
    assert_eq!(
        vm.wait(Some(Duration::from_secs(60)), None),
        VmEnd::PowerOff,
        "the guest stopped taking ticks: {:?}",
        vm.interrupt_stats(0)
    );
    vm.shutdown().unwrap();
}

/// Finding 2: a pause that lands between the two fragments of a split MMIO
/// access completes the access through the exit handler; the vCPU is
/// never failed for it.
#[test]
fn pausing_mid_split_mmio_never_fails_the_vcpu() {
    require_kvm!();
    let vm = start("mmio-split", 2, Irqchip::User);
    wait_progress(&vm, 0, 0);
    for _ in 0..1500 {
        // Both guests ran since the last pause, so this one parks them anew
        // (and, about every other time, between two fragments of a load).
        for id in 0..2 {
            let p = vm.progress(id);
            wait_progress(&vm, id, p);
        }
        pause_all(vm.vcpus().iter().map(|v| &**v), soon()).unwrap();
        for v in vm.vcpus() {
            // Parked means the access completed: nothing left in flight.
            let pending = v.run_on(|k: &mut KvmVcpu| k.io_pending(), soon()).unwrap();
            assert!(!pending, "vCPU {} parked mid-access", v.id());
        }
        resume_all(vm.vcpus().iter().map(|v| &**v));
        assert_eq!(vm.ended(), None);
    }
    let settled: u64 = vm
        .vcpus()
        .iter()
        .map(|v| v.counters().snapshot().settle_exits)
        .sum();
    assert!(settled > 0, "no pause landed between two fragments");
    for id in 0..2 {
        // The guest saw all-ones from every load (never a half answer).
        assert_eq!(vm.last_read(id), u64::MAX);
    }
    vm.shutdown().unwrap();
}

/// Finding 3: a vCPU bound on one thread and dropped on another keeps the
/// mapping that thread's kick handler points at, so a late kick is safe.
#[test]
fn a_kick_after_dropping_a_vcpu_bound_elsewhere_is_safe() {
    require_kvm!();
    let config = VmConfig {
        payload: brisk_vmm::Payload::builtin("spin"),
        cpus: 1,
        ..VmConfig::default()
    };
    let mut m = Machine::build(&config, Output::Null).unwrap();
    let vcpu = m.vcpus.pop().unwrap();
    let (to_main, from_a) = mpsc::channel();
    let (to_a, from_main) = mpsc::channel::<()>();
    let a = std::thread::spawn(move || {
        let mut vcpu = vcpu;
        let interrupt = vcpu.bind_thread();
        to_main.send((vcpu, interrupt)).unwrap();
        from_main.recv().unwrap(); // the kick lands while we wait here
        "alive"
    });
    let (vcpu, interrupt) = from_a.recv().unwrap();
    drop(vcpu); // not on thread A
    interrupt.interrupt(); // a late kick to A: its handler stores into kvm_run
    to_a.send(()).unwrap();
    assert_eq!(a.join().unwrap(), "alive");
    drop(m);
}

/// Finding 7 on KVM: a masked interrupt does not end `cli; hlt`.
#[test]
fn a_masked_interrupt_leaves_cli_hlt_halted() {
    require_kvm!();
    let vm = start("halt", 1, Irqchip::User);
    wait_mode(&vm, 0, Mode::Halted);
    assert!(vm.pending_interrupts(0).unwrap().raise(0x30));
    vm.vcpu(0).kick(Request::Interrupt);
    // Idle tasks run only while halted, after requests are served.
    let ticket = vm.vcpu(0).run_when_idle(|_v: &mut KvmVcpu| ()).unwrap();
    ticket.wait(soon()).unwrap();
    assert_eq!(vm.progress(0), 0, "a masked interrupt woke cli; hlt");
    assert!(vm.pending_interrupts(0).unwrap().any(), "it stays pending");
    vm.shutdown().unwrap();
}

/// Finding 8: each park of a kvmclock guest is reported to it with
/// KVM_KVMCLOCK_CTRL; a guest without kvmclock gets nothing (no error).
#[test]
fn parking_a_kvmclock_guest_tells_its_clock() {
    require_kvm!();
    let vm = start("kvmclock", 1, Irqchip::User);
    let stops = |vm: &Vm| {
        vm.vcpu(0)
            .run_on(|v: &mut KvmVcpu| v.clock_stops(), soon())
            .unwrap()
    };
    // The guest says when it has enabled kvmclock.
    let ready = std::time::Instant::now() + Duration::from_secs(30);
    while vm.last_read(0) != 1 {
        assert!(std::time::Instant::now() < ready, "kvmclock never enabled");
        std::thread::yield_now();
    }
    let parks = 5;
    for _ in 0..parks {
        vm.vcpu(0).stop(soon()).unwrap();
        vm.vcpu(0).resume();
        // Back in the guest, so the next stop parks anew.
        while vm.vcpu(0).mode() != Mode::InGuest {
            assert!(
                std::time::Instant::now() < ready,
                "the guest never ran again"
            );
            std::thread::yield_now();
        }
    }
    let told = stops(&vm);
    let can = vm
        .vcpu(0)
        .run_on(|v: &mut KvmVcpu| v.can_stop_clock(), soon())
        .unwrap();
    if !can {
        eprintln!("\n*** SKIPPED: this host's KVM lacks KVM_CAP_KVMCLOCK_CTRL ***\n");
        return;
    }
    assert_eq!(told, parks, "parks reported to the guest's kvmclock");
    vm.shutdown().unwrap();
    let halt = start("halt", 1, Irqchip::User);
    halt.vcpu(0).stop(soon()).unwrap();
    assert_eq!(
        halt.vcpu(0)
            .run_on(|v: &mut KvmVcpu| v.clock_stops(), soon())
            .unwrap(),
        0
    );
    halt.shutdown().unwrap();
}

/// Finding 9: shutdown is bounded when a vCPU thread is stuck in a closure;
/// the stuck vCPU is named.
#[test]
fn shutdown_is_bounded_with_a_vcpu_stuck_in_a_closure() {
    require_kvm!();
    let vm = start("spin", 2, Irqchip::User);
    let (release, stuck) = mpsc::channel::<()>();
    let (started_tx, started) = mpsc::channel::<()>();
    let _ticket = vm
        .vcpu(1)
        .run_on_async(move |_v: &mut KvmVcpu| {
            started_tx.send(()).unwrap();
            let _ = stuck.recv();
        })
        .unwrap();
    started.recv().unwrap();
    assert_eq!(
        vm.shutdown_within(Duration::from_millis(300)),
        Err(ShutdownError::Stuck {
            vcpus: vec![1],
            bound: Duration::from_millis(300)
        })
    );
    drop(release); // let the detached thread finish
}

/// Finding 12: the kick signal is unblocked on vCPU threads, so a VM
/// started from a thread that blocks it still stops; and it restarts
/// system calls on threads it reaches late (SA_RESTART).
#[test]
fn kicks_reach_vcpus_spawned_with_the_signal_blocked() {
    require_kvm!();
    let signal = brisk_vmm::kick_signal();
    std::thread::spawn(move || {
        // SAFETY: a zeroed sigset filled by sigemptyset/sigaddset; the mask
        // applies to this thread, whose children inherit it.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        let vm = start("spin", 1, Irqchip::User);
        wait_progress(&vm, 0, 0);
        vm.vcpu(0).stop(soon()).unwrap();
        assert!(vm.vcpu(0).counters().snapshot().signals_sent >= 1);
        vm.shutdown().unwrap();
    })
    .join()
    .unwrap();
}

#[test]
fn a_late_kick_does_not_interrupt_a_blocking_read() {
    require_kvm!();
    // A VM installs the handler.
    drop(start("spin", 1, Irqchip::User));
    let mut fds = [0; 2];
    // SAFETY: pipe fills two fds.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (rd, wr) = (fds[0], fds[1]);
    let (tid_tx, tid_rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        let mut b = [0u8; 1];
        // SAFETY: reads one byte into `b` from our pipe.
        let n = unsafe { libc::read(rd, b.as_mut_ptr().cast(), 1) };
        (n, std::io::Error::last_os_error().raw_os_error())
    });
    let tid = tid_rx.recv().unwrap();
    // Wait until it is blocked in read(2) (syscall 0 on x86_64).
    let syscall = format!("/proc/self/task/{tid}/syscall");
    let ready = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&syscall).is_ok_and(|s| s.starts_with("0 ")) {
        assert!(std::time::Instant::now() < ready, "reader never blocked");
        std::thread::yield_now();
    }
    // The reader wakes for the signal (one more voluntary context switch)
    // and, with SA_RESTART, blocks in read(2) again; only then does data
    // come, so a read the signal ended would have returned EINTR already.
    let status = format!("/proc/self/task/{tid}/status");
    let switches = || {
        std::fs::read_to_string(&status)
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    let before = switches();
    // SAFETY: tgkill to a live thread of this process with brisk's signal.
    unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            tid,
            brisk_vmm::kick_signal(),
        )
    };
    while !(switches() > before
        && std::fs::read_to_string(&syscall).is_ok_and(|s| s.starts_with("0 ")))
    {
        assert!(
            std::time::Instant::now() < ready,
            "the reader did not take the signal"
        );
        if reader.is_finished() {
            break; // it returned (with EINTR, the bug): the join below says so
        }
        std::thread::yield_now();
    }
    // SAFETY: one byte to our pipe.
    assert_eq!(unsafe { libc::write(wr, b"x".as_ptr().cast(), 1) }, 1);
    let (n, errno) = reader.join().unwrap();
    assert_eq!(n, 1, "read failed with errno {errno:?} after a stray kick");
    // SAFETY: closing our own fds.
    unsafe {
        libc::close(rd);
        libc::close(wr);
    }
}

/// Finding 15: the PIO/MMIO data accessors are empty unless the last exit
/// was of their kind.
#[test]
fn io_data_is_empty_after_a_non_io_exit() {
    require_kvm!();
    let vm = start("halt", 1, Irqchip::User);
    wait_mode(&vm, 0, Mode::Halted);
    let lens = vm
        .vcpu(0)
        .run_on(
            |v: &mut KvmVcpu| (v.io_data().len(), v.mmio_data().len()),
            soon(),
        )
        .unwrap();
    assert_eq!(lens, (0, 0));
    vm.shutdown().unwrap();
}
