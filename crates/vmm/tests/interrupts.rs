//! User-irqchip interrupts on real KVM: the `tick` guest's timer
//! interrupts and the `pingpong` guest's doorbell, each counted by the
//! guest and by brisk, and idle tasks on vCPUs that halt between them.

mod common;

use brisk_vmm::require_kvm;

use std::sync::Arc;
use std::time::Duration;

use brisk_guests::{PINGPONG_ROUNDS, TICKS};
use brisk_vmm::control::{ExitKind, IdleGroup, Mode, VcpuState};
use brisk_vmm::{Irqchip, KvmVcpu, Vm, VmEnd};
use common::{soon, start};

fn run_to_power_off(vm: &Vm) {
    assert_eq!(
        vm.wait(Some(Duration::from_secs(60)), None),
        VmEnd::PowerOff
    );
}

/// Every injected interrupt reached the guest's handler exactly once, and
/// every raise was either injected, merged into a pending one, or is the
/// one left pending after the guest turned its interrupts off.
fn assert_accounted(vm: &Vm, id: usize, handled: u64) {
    let s = vm.interrupt_stats(id).unwrap();
    assert_eq!(s.injected, handled, "vCPU {id}: injected vs handled");
    let left = s.raised - s.coalesced - s.injected;
    assert!(
        left <= 1,
        "vCPU {id}: {left} raises unaccounted for ({s:?})"
    );
}

#[test]
fn tick_takes_its_timer_interrupts_on_1_to_4_vcpus() {
    require_kvm!();
    for cpus in 1..=4 {
        let vm = start("tick", cpus, Irqchip::User);
        run_to_power_off(&vm);
        for id in 0..cpus {
            let handled = vm.progress(id);
            // The guest stops at TICKS; one more may land between its last
            // HLT and its `cli`.
            assert!(
                (TICKS..=TICKS + 1).contains(&handled),
                "vCPU {id} of {cpus}: {handled} ticks"
            );
            assert_accounted(&vm, id, handled);
            assert_eq!(
                vm.timer_ticks(id),
                Some(vm.interrupt_stats(id).unwrap().raised)
            );
            let c = vm.vcpu(id).counters().snapshot();
            assert!(c.exits_of(ExitKind::Halt) > 0, "vCPU {id} never halted");
        }
        vm.shutdown().unwrap();
    }
}

#[test]
fn pingpong_passes_the_token_round_1_to_4_vcpus() {
    require_kvm!();
    for cpus in 1..=4 {
        let vm = start("pingpong", cpus, Irqchip::User);
        run_to_power_off(&vm);
        for id in 0..cpus {
            assert_eq!(vm.progress(id), PINGPONG_ROUNDS, "vCPU {id} of {cpus}");
            assert_accounted(&vm, id, PINGPONG_ROUNDS);
        }
        assert_eq!(vm.doorbell_rings(), Some(PINGPONG_ROUNDS * cpus as u64));
        vm.shutdown().unwrap();
    }
}

#[test]
fn idle_tasks_run_between_ticks_and_no_tick_is_lost() {
    require_kvm!();
    let vm = Arc::new(start("tick", 2, Irqchip::User));
    let group = IdleGroup::new(vm.vcpus()[1..].to_vec()).unwrap();
    let task = |vm: &Arc<Vm>| {
        let vm = vm.clone();
        move |k: &mut KvmVcpu| {
            let id = k.id();
            let seen = (id, vm.vcpu(id).mode(), vm.vcpu(id).state());
            // A task that takes a while: the next tick is due meanwhile.
            std::thread::sleep(Duration::from_micros(300));
            seen
        }
    };
    let own: Vec<_> = (0..30)
        .map(|_| vm.vcpu(0).run_when_idle(task(&vm)).unwrap())
        .collect();
    let any: Vec<_> = (0..30)
        .map(|_| group.run_when_idle(task(&vm)).unwrap())
        .collect();
    for (queue, ticket) in own
        .into_iter()
        .map(|t| (0, t))
        .chain(any.into_iter().map(|t| (1, t)))
    {
        let (id, mode, state) = ticket.wait(soon()).unwrap();
        assert_eq!(id, queue, "a task ran on a vCPU outside its queue");
        assert_eq!((mode, state), (Mode::Halted, VcpuState::Halted));
    }
    run_to_power_off(&vm);
    for id in 0..2 {
        let handled = vm.progress(id);
        assert!(
            (TICKS..=TICKS + 1).contains(&handled),
            "vCPU {id}: {handled}"
        );
        assert_accounted(&vm, id, handled);
        assert_eq!(vm.vcpu(id).counters().snapshot().idle_tasks, 30);
    }
    drop(group);
    Arc::try_unwrap(vm).ok().unwrap().shutdown().unwrap();
}

#[test]
fn interrupt_guests_refuse_the_kernel_irqchip() {
    let config = brisk_vmm::VmConfig {
        payload: brisk_vmm::Payload::builtin("tick"),
        irqchip: Irqchip::Kernel,
        ..Default::default()
    };
    let err = config.validate().expect_err("refused");
    assert!(err.to_string().contains("--irqchip user"), "{err}");
}
