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

/// What the dirty guest's pages say: each vCPU's area holds sweep s + 1
/// up to where it is and s after, s being its sweep count; any page
/// the migration missed holds an older sweep.
pub fn check_dirty_pages(vm: &Vm, cpus: usize, mib: u64, at_least: u64) {
    let mem = vm.guest_memory();
    for id in 0..cpus {
        let s = vm.progress(id);
        assert!(s >= at_least, "vCPU {id} is at sweep {s}: RAM was lost");
        let base = brisk_guests::DIRTY_BASE + id as u64 * (mib << 20);
        let mut seen_old = false;
        for page in 0..(mib << 20) / 4096 {
            let v: u64 =
                vm_memory::Bytes::read_obj(mem, vm_memory::GuestAddress(base + page * 4096))
                    .unwrap();
            assert!(
                v == s || v == s + 1,
                "vCPU {id}: page {page} holds sweep {v}, the guest is at {s}"
            );
            if v == s {
                seen_old = true;
            } else {
                assert!(!seen_old, "vCPU {id}: page {page} is ahead of the sweep");
            }
        }
    }
}

/// Type `bytes` at the guest's console, offering again what the UART did
/// not take (a vCPU was using it), for at most 10 s.
pub fn type_in(vm: &Vm, mut bytes: &[u8]) {
    let until = Instant::now() + Duration::from_secs(10);
    while !bytes.is_empty() {
        bytes = &bytes[vm.console_input(bytes)..];
        assert!(Instant::now() < until, "the console took no input for 10 s");
        if !bytes.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Wait (polling, bounded by `bound`) until `capture` holds `line`; fail
/// if the VM ends first. `before` is what earlier VMs of the same run
/// printed, for the failure's message.
pub fn wait_for_line(
    vm: &Vm,
    capture: &brisk_vmm::Capture,
    line: &str,
    bound: Duration,
    before: &str,
) {
    let until = Instant::now() + bound;
    while !capture.text().contains(line) {
        assert!(
            vm.ended().is_none(),
            "{:?} before '{line}':\n{before}{}",
            vm.ended(),
            capture.text()
        );
        assert!(Instant::now() < until, "no '{line}' within {bound:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Pause `vm`, save it to `dir`, shut it down and restore it (running)
/// into a new capture; what the old VM printed goes to `out`.
pub fn save_and_restore(
    vm: Vm,
    capture: &brisk_vmm::Capture,
    dir: &std::path::Path,
    out: &mut String,
) -> (Vm, brisk_vmm::Capture) {
    vm.pause(Deadline::after(Duration::from_secs(10))).unwrap();
    vm.snapshot(dir).unwrap();
    vm.shutdown().unwrap();
    out.push_str(&capture.text());
    let capture = brisk_vmm::Capture::default();
    let vm = Vm::restore(
        dir,
        Output::Capture(capture.clone()),
        brisk_vmm::RestoreOptions::default(),
    )
    .expect("the snapshot restores");
    (vm, capture)
}
