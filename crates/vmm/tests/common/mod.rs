//! Helpers shared by the VMM's KVM tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use brisk_vmm::control::Deadline;
use brisk_vmm::{Irqchip, Output, Vm, VmConfig};

pub fn start(guest: &str, cpus: usize, irqchip: Irqchip) -> Vm {
    let config = VmConfig {
        payload: brisk_vmm::Payload::builtin(guest),
        cpus,
        irqchip,
        ..VmConfig::default()
    };
    Vm::start(&config, Output::Null).expect("VM starts")
}

pub fn soon() -> Deadline {
    Deadline::after(Duration::from_secs(10))
}

pub fn short() -> Deadline {
    Deadline::after(Duration::from_millis(300))
}

/// Wait (bounded) until vCPU `id`'s guest progress passes `than`. The
/// `halt` guest only progresses when a kick wakes it from HLT, so for it
/// each poll also kicks.
pub fn wait_progress(vm: &Vm, id: usize, than: u64) -> u64 {
    let until = Instant::now() + Duration::from_secs(10);
    let halts = vm.guest() == "halt";
    loop {
        let p = vm.progress(id);
        if p > than {
            return p;
        }
        if halts {
            vm.vcpu(id).kick(brisk_vmm::control::Request::Kick);
        }
        assert!(
            Instant::now() < until,
            "vCPU {id} made no progress past {than} in 10 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Wait (bounded) until vCPU `id` is in `mode`.
pub fn wait_mode(vm: &Vm, id: usize, mode: brisk_vmm::control::Mode) {
    let until = Instant::now() + Duration::from_secs(30);
    while vm.vcpu(id).mode() != mode {
        assert!(Instant::now() < until, "vCPU {id} never reached {mode:?}");
        std::thread::yield_now();
    }
}
