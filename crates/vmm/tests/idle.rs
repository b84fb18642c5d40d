//! Pollable vCPU state and exclusive groups on real KVM vCPUs.

mod common;

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
            assert_eq!(
                unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, v.state_fd(), &mut ev) },
                0
            );
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
    vm.shutdown().unwrap();
}

#[test]
fn an_exclusive_group_of_real_vcpus_runs_one_at_a_time() {
    require_kvm!();
    let vm = start("spin", 3, Irqchip::User);
    let group = ExclusiveGroup::new(vm.vcpus().to_vec(), 0, soon()).unwrap();
    let entries = |id: usize| vm.vcpu(id).counters().snapshot().entries;
    let mut rng = 0x1234_5678_9abc_def1u64;
    for _ in 0..200 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let target = (rng % 3) as usize;
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
