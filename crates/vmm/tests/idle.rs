//! Pollable vCPU state and exclusive groups on real KVM vCPUs.

mod common;

use brisk_vmm::require_kvm;

use std::collections::HashMap;
use std::sync::Arc;

use brisk_vmm::control::{pause_all, resume_all, ExclusiveGroup, Request, VcpuState};
use brisk_vmm::Irqchip;
use common::{soon, start, wait_progress};

/// One epoll set over all vCPUs' state fds; returns the vCPU ids that
/// became readable within `ms`.
struct Watch {
    epfd: i32,
}

impl Watch {
    fn new(vcpus: &[Arc<brisk_vmm::Vcpu>]) -> Watch {
        // SAFETY: plain epoll calls on fds owned by the control blocks,
        // which outlive this Watch; the epoll fd is closed in Drop.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epfd >= 0);
        for v in vcpus {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: v.id() as u64,
            };
            // SAFETY: as above.
            let r = unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, v.state_fd(), &mut ev) };
            assert_eq!(r, 0);
        }
        Watch { epfd }
    }

    fn wait(&self, ms: i32) -> Vec<usize> {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
        // SAFETY: a valid buffer of 8 events.
        let n = unsafe { libc::epoll_wait(self.epfd, evs.as_mut_ptr(), 8, ms) };
        evs[..n.max(0) as usize]
            .iter()
            .map(|e| e.u64 as usize)
            .collect()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // SAFETY: our own epoll fd.
        unsafe { libc::close(self.epfd) };
    }
}

#[test]
fn one_epoll_set_sees_every_vcpu_halt_park_and_exit() {
    require_kvm!();
    let vm = start("halt", 2, Irqchip::User);
    let watch = Watch::new(vm.vcpus());
    // Wait for both to halt: blocking on epoll, not sleeping.
    let mut state: HashMap<usize, VcpuState> = HashMap::new();
    while state.values().filter(|s| **s == VcpuState::Halted).count() < 2 {
        let ready = watch.wait(10_000);
        assert!(!ready.is_empty(), "no state change within 10 s: {state:?}");
        for id in ready {
            vm.vcpu(id).take_transitions();
            state.insert(id, vm.vcpu(id).state());
        }
    }
    pause_all(vm.vcpus().iter().map(|v| &**v), soon()).unwrap();
    let mut ready = watch.wait(0);
    ready.sort_unstable();
    assert_eq!(ready, vec![0, 1], "both parked vCPUs are readable");
    for v in vm.vcpus() {
        v.take_transitions();
        assert_eq!(v.state(), VcpuState::Parked);
    }
    resume_all(vm.vcpus().iter().map(|v| &**v));
    assert!(!watch.wait(10_000).is_empty());
    vm.vcpu(0).kick(Request::Kick);
    wait_progress(&vm, 0, 0);
    // The control blocks (and their eventfds) outlive the VM's threads.
    let ctls = vm.vcpus().to_vec();
    vm.shutdown().unwrap();
    let mut ready = watch.wait(10_000);
    ready.sort_unstable();
    assert!(!ready.is_empty(), "exit left the epoll set silent");
    for v in &ctls {
        assert_eq!(v.state(), VcpuState::Exited);
    }
}

#[test]
fn an_exclusive_group_of_real_vcpus_runs_one_at_a_time() {
    require_kvm!();
    let vm = start("spin", 3, Irqchip::User);
    let group = ExclusiveGroup::new(vm.vcpus().to_vec(), 0, soon()).unwrap();
    let entries = |id: usize| vm.vcpu(id).counters().snapshot().entries;
    let mut rng = fastrand::Rng::with_seed(0x1234_5678_9abc_def1);
    for _ in 0..200 {
        let target = rng.usize(..3);
        group.switch_to(target, soon()).unwrap();
        // The others are parked: their entry counters must not move while
        // the target runs.
        let frozen: Vec<u64> = (0..3).filter(|i| *i != target).map(entries).collect();
        let p = vm.progress(target);
        wait_progress(&vm, target, p);
        let later: Vec<u64> = (0..3).filter(|i| *i != target).map(entries).collect();
        assert_eq!(frozen, later, "a non-running member entered the guest");
        for i in (0..3).filter(|i| *i != target) {
            assert!(vm.vcpu(i).is_parked());
        }
    }
    drop(group);
    vm.shutdown().unwrap();
}

#[test]
fn idle_tasks_use_halted_vcpus_and_leave_running_ones_alone() {
    require_kvm!();
    let vm = Arc::new(start("halt", 2, Irqchip::User));
    let tickets: Vec<_> = (0..200)
        .map(|i| {
            let v = vm.clone();
            vm.vcpu(i % 2)
                .run_when_idle(move |k: &mut brisk_vmm::KvmVcpu| {
                    let id = k.id();
                    // Runs on the vCPU's own thread while its guest is halted.
                    (
                        id,
                        v.vcpu(id).state(),
                        v.progress(id),
                        k.fd().get_regs().unwrap().rip,
                    )
                })
                .unwrap()
        })
        .collect();
    let mut progress_seen: HashMap<usize, Vec<u64>> = HashMap::new();
    for t in tickets {
        let (id, state, progress, rip) = t.wait(soon()).unwrap();
        assert_eq!(state, VcpuState::Halted, "vCPU {id}");
        assert!((brisk_boot::layout::CODE..brisk_boot::layout::CODE + 0x100).contains(&rip));
        progress_seen.entry(id).or_default().push(progress);
    }
    for (id, seen) in &progress_seen {
        assert!(
            seen.windows(2).all(|w| w[0] == w[1]),
            "vCPU {id}'s guest ran between idle tasks"
        );
        let c = vm.vcpu(*id).counters().snapshot();
        assert_eq!(c.idle_tasks, 100);
        assert_eq!(c.signals_sent, 0);
    }
    let vm = Arc::try_unwrap(vm).ok().unwrap();
    vm.shutdown().unwrap();

    let vm = start("spin", 1, Irqchip::User);
    wait_progress(&vm, 0, 0);
    let ticket = vm
        .vcpu(0)
        .run_when_idle(|k: &mut brisk_vmm::KvmVcpu| k.id())
        .unwrap();
    let short = brisk_vmm::control::Deadline::after(std::time::Duration::from_millis(200));
    assert!(
        matches!(
            ticket.wait(short),
            Err(brisk_vmm::control::Error::Timeout { .. })
        ),
        "an idle task ran while the guest was spinning"
    );
    assert_eq!(vm.vcpu(0).counters().snapshot().idle_tasks, 0);
    vm.shutdown().unwrap();
}
