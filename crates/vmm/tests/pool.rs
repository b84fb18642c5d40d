//! M:N on real KVM vCPUs: built-in guests on a pool of host threads
//! (`VmConfig::vcpu_threads`) run to their end and keep the control
//! plane's promises.

mod common;

use brisk_vmm::require_kvm;

use std::time::Duration;

use brisk_vmm::control::{pause_all, resume_all, ExitKind, VcpuState};
use brisk_vmm::{ConfigError, Irqchip, Output, StartError, Vm, VmConfig, VmEnd};
use common::soon;

fn pooled(guest: &str, cpus: usize, threads: usize) -> VmConfig {
    VmConfig {
        payload: brisk_vmm::Payload::builtin(guest),
        cpus,
        irqchip: Irqchip::User,
        vcpu_threads: Some(threads),
        ..VmConfig::default()
    }
}

/// Every vCPU takes its timer interrupts with HLT between them, while at
/// most two of the 64 hold a thread; the pool is two threads and the
/// slicer.
#[test]
fn sixty_four_tick_vcpus_on_two_threads_run_to_completion() {
    require_kvm!();
    let vm = Vm::start(&pooled("tick=50", 64, 2), Output::Null).expect("VM starts");
    assert_eq!(vm.vcpu_thread_count(), 3);
    let end = vm.wait(Some(Duration::from_secs(120)), None);
    assert_eq!(end, VmEnd::PowerOff);
    for v in vm.vcpus() {
        // The guest counts its ticks; the last one done powered off.
        assert!(vm.progress(v.id()) >= 50, "vCPU {}", v.id());
        assert!(v.counters().snapshot().exits_of(ExitKind::Halt) > 0);
    }
    vm.shutdown().unwrap();
}

/// A token passed round 8 vCPUs through the doorbell: each wake is of a
/// vCPU on no thread.
#[test]
fn pingpong_on_eight_vcpus_over_two_threads() {
    require_kvm!();
    let vm = Vm::start(&pooled("pingpong=300", 8, 2), Output::Null).expect("VM starts");
    let end = vm.wait(Some(Duration::from_secs(120)), None);
    assert_eq!(end, VmEnd::PowerOff);
    vm.shutdown().unwrap();
}

/// Pause, run_on and resume on 16 halted vCPUs that hold no thread: each
/// parks (run on a pool thread to do so), runs the closure there, and
/// halts again after the resume.
#[test]
fn halted_vcpus_on_no_thread_pause_run_closures_and_resume() {
    require_kvm!();
    let vm = Vm::start(&pooled("halt", 16, 2), Output::Null).expect("VM starts");
    let all = || vm.vcpus().iter().map(|v| &**v);
    for v in vm.vcpus() {
        common::wait_mode(&vm, v.id(), brisk_vmm::control::Mode::Halted);
    }
    pause_all(all(), soon()).unwrap();
    for v in vm.vcpus() {
        assert_eq!(v.state(), VcpuState::Parked);
        assert_eq!(v.halted_while_parked(), Some(true));
        let id = v
            .run_on(|k: &mut brisk_vmm::KvmVcpu| k.id(), soon())
            .unwrap();
        assert_eq!(id, v.id());
    }
    resume_all(all());
    for v in vm.vcpus() {
        common::wait_mode(&vm, v.id(), brisk_vmm::control::Mode::Halted);
    }
    vm.shutdown().unwrap();
}

#[test]
fn a_pool_is_refused_under_the_kernel_irqchip_and_beyond_the_vcpus() {
    let kernel = VmConfig {
        irqchip: Irqchip::Kernel,
        ..pooled("halt", 4, 2)
    };
    assert_eq!(kernel.validate(), Err(ConfigError::PoolNeedsUserIrqchip));
    let too_many = pooled("halt", 4, 5);
    assert_eq!(
        too_many.validate(),
        Err(ConfigError::VcpuThreads {
            threads: 5,
            cpus: 4
        })
    );
    let none = pooled("halt", 4, 0);
    assert!(matches!(
        Vm::start(&none, Output::Null),
        Err(StartError::Config(ConfigError::VcpuThreads {
            threads: 0,
            ..
        }))
    ));
}

/// KVM's usual vCPU limit on this host's two cores: 1024 `tick` vCPUs
/// (960 of them with their data, stack and timer in the high areas) run
/// to completion on two pool threads.
#[test]
fn a_thousand_and_twenty_four_tick_vcpus_on_two_threads() {
    require_kvm!();
    let vm = Vm::start(&pooled("tick=20", 1024, 2), Output::Null).expect("VM starts");
    let end = vm.wait(Some(Duration::from_secs(300)), None);
    assert_eq!(end, VmEnd::PowerOff);
    for id in [0, 63, 64, 500, 1023] {
        assert!(vm.progress(id) >= 20, "vCPU {id}");
        assert!(vm.timer_ticks(id).unwrap() >= 20, "vCPU {id}");
    }
    vm.shutdown().unwrap();
}
