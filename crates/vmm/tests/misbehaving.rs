//! Guests that misbehave end with a clear report, or keep running and stay
//! stoppable where that is right. Never a hang, never a panic.

mod common;

use brisk_vmm::require_kvm;

use std::time::Duration;

use brisk_boot::layout::CODE;
use brisk_vmm::control::{pause_all, resume_all, Mode};
use brisk_vmm::{Irqchip, KvmError, Mwait, Output, StartError, Vm, VmConfig, VmEnd};
use common::{soon, start, wait_progress};

fn end_of(guest: &str, irqchip: Irqchip) -> VmEnd {
    let vm = start(guest, 2, irqchip);
    let end = vm.wait(Some(Duration::from_secs(30)), None);
    vm.shutdown().unwrap();
    end
}

/// A crash report names a vCPU of the VM (every vCPU runs the faulting
/// code; the first to fault is reported), a RIP inside the guest's code,
/// and what happened.
fn assert_crash(end: &VmEnd, accepted: &[&str]) {
    match end {
        VmEnd::Crash { vcpu, what, rip } => {
            assert!(*vcpu < 2, "vCPU {vcpu}");
            assert!((CODE..CODE + 0x1000).contains(rip), "RIP {rip:#x}");
            assert!(accepted.iter().any(|a| what.contains(a)), "{what}");
        }
        other => panic!("expected a crash report, got {other:?}"),
    }
}

#[test]
fn a_triple_fault_is_reported_with_vcpu_and_rip() {
    require_kvm!();
    for irqchip in [Irqchip::User, Irqchip::Kernel] {
        for guest in ["triple-fault", "ud2"] {
            let end = end_of(guest, irqchip);
            assert_crash(&end, &["triple fault"]);
        }
    }
}

#[test]
fn int3_without_an_idt_is_reported() {
    require_kvm!();
    // Real hardware: a triple fault. Hosts whose KVM cannot emulate the
    // instruction (PVM) report an emulation failure. Either is a clear end.
    let end = end_of("int3", Irqchip::User);
    assert_crash(&end, &["triple fault", "emulation failure"]);
}

/// Run `mwait` on 2 vCPUs under `policy`; `None` if the host refused it.
fn mwait_end(policy: Mwait) -> Option<VmEnd> {
    let config = VmConfig {
        payload: brisk_vmm::Payload::builtin("mwait"),
        mwait: policy,
        ..VmConfig::default()
    };
    match Vm::start(&config, Output::Null) {
        Ok(vm) => {
            let end = vm.wait(Some(Duration::from_secs(30)), None);
            vm.shutdown().unwrap();
            Some(end)
        }
        Err(StartError::Kvm(e @ KvmError::Unavailable { .. })) => {
            assert!(e.to_string().contains("--mwait passthrough"), "{e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn hidden_mwait_is_not_offered_and_offered_mwait_completes_or_is_reported() {
    require_kvm!();
    // Default policy: CPUID does not offer MONITOR, so the guest never tries.
    assert_eq!(
        mwait_end(Mwait::Hide),
        Some(VmEnd::DebugExit(brisk_guests::MWAIT_HIDDEN.into()))
    );
    // `exit`: offered; KVM runs MWAIT as a NOP (some hosts cannot emulate it).
    match mwait_end(Mwait::Exit).expect("exit is always available") {
        VmEnd::DebugExit(v) => assert_eq!(v, u32::from(brisk_guests::MWAIT_DONE)),
        crash => assert_crash(&crash, &["emulation failure", "triple fault"]),
    }
    // `passthrough`: refused by name where KVM cannot disable MWAIT exits.
    if let Some(end) = mwait_end(Mwait::Passthrough) {
        assert_eq!(end, VmEnd::DebugExit(brisk_guests::MWAIT_DONE.into()));
    }
}

#[test]
fn unmapped_mmio_reads_all_ones_and_ignores_writes() {
    require_kvm!();
    for irqchip in [Irqchip::User, Irqchip::Kernel] {
        let vm = start("mmio-unmapped", 1, irqchip);
        let end = vm.wait(Some(Duration::from_secs(30)), None);
        assert_eq!(end, VmEnd::DebugExit(brisk_guests::MMIO_ALL_ONES.into()));
        assert_eq!(vm.unclaimed_accesses(), 2, "one write, one read");
        vm.shutdown().unwrap();
    }
}

#[test]
fn a_pio_storm_keeps_running_and_stays_stoppable() {
    require_kvm!();
    let vm = start("pio-storm", 2, Irqchip::User);
    let p = wait_progress(&vm, 0, 1000);
    for _ in 0..20 {
        pause_all(vm.vcpus().iter().map(|v| &**v), soon()).unwrap();
        resume_all(vm.vcpus().iter().map(|v| &**v));
    }
    wait_progress(&vm, 1, p);
    assert!(vm.unclaimed_accesses() >= 2000);
    assert_eq!(vm.ended(), None);
    vm.shutdown().unwrap();
}

#[test]
fn hlt_with_interrupts_off_forever_stays_stoppable() {
    require_kvm!();
    for irqchip in [Irqchip::User, Irqchip::Kernel] {
        let vm = start("halt", 2, irqchip);
        assert_eq!(
            vm.wait(Some(Duration::from_millis(50)), None),
            VmEnd::Timeout
        );
        for v in vm.vcpus() {
            v.stop(soon()).unwrap();
            assert_eq!(v.mode(), Mode::Parked);
        }
        vm.shutdown().unwrap();
    }
}

/// Finding 11 of the review: a panic in a controller's closure is the
/// controller's bug, not the guest's: the caller gets `Panicked` and the VM
/// runs on (docs/protocol.md).
#[test]
fn a_panicking_run_on_closure_is_reported_and_the_vm_runs_on() {
    require_kvm!();
    let vm = start("spin", 3, Irqchip::User);
    let r = vm.vcpu(1).run_on(
        |_v: &mut brisk_vmm::KvmVcpu| -> u64 { panic!("deliberate test panic") },
        soon(),
    );
    assert_eq!(
        r,
        Err(brisk_vmm::control::Error::Panicked {
            op: brisk_vmm::control::Op::RunOn,
            vcpu: 1,
            message: "deliberate test panic".into()
        })
    );
    assert_eq!(vm.ended(), None, "the VM survives");
    let p = vm.progress(1);
    common::wait_progress(&vm, 1, p);
    vm.vcpu(1).stop(soon()).unwrap();
    vm.shutdown().unwrap();
}
