//! Built-in guests that end do so with their expected output and status.

mod common;

use brisk_vmm::require_kvm;

use std::time::Duration;

use brisk_vmm::{Capture, Irqchip, Output, Vm, VmConfig, VmEnd};

fn run_to_end(guest: &str, cpus: usize, irqchip: Irqchip) -> (VmEnd, String) {
    let capture = Capture::default();
    let config = VmConfig {
        payload: brisk_vmm::Payload::builtin(guest),
        cpus,
        irqchip,
        ..VmConfig::default()
    };
    let vm = Vm::start(&config, Output::Capture(capture.clone())).unwrap();
    let end = vm.wait(Some(Duration::from_secs(30)), None);
    vm.shutdown().unwrap();
    (end, capture.text())
}

#[test]
fn hello_prints_one_line_per_vcpu_in_order_then_powers_off() {
    require_kvm!();
    for irqchip in [Irqchip::User, Irqchip::Kernel] {
        for cpus in [1, 2, 4] {
            let (end, out) = run_to_end("hello", cpus, irqchip);
            let expected: String = (0..cpus)
                .map(|i| format!("Hello from vCPU {i}\n"))
                .collect();
            assert_eq!(end, VmEnd::PowerOff, "{cpus} vCPUs, {irqchip:?}");
            assert_eq!(out, expected, "{cpus} vCPUs, {irqchip:?}");
        }
    }
}

#[test]
fn debug_exit_reports_the_value_written() {
    require_kvm!();
    for cpus in [1, 3] {
        let (end, out) = run_to_end("debug-exit", cpus, Irqchip::User);
        assert_eq!(end, VmEnd::DebugExit(brisk_guests::DEBUG_EXIT_VALUE.into()));
        assert_eq!(out, "debug-exit: writing 0x21 to port 0xf4\n");
    }
}

#[test]
fn endless_guests_run_until_the_timeout() {
    require_kvm!();
    for guest in ["spin", "pio", "halt", "mixed"] {
        let vm = common::start(guest, 2, Irqchip::User);
        assert_eq!(
            vm.wait(Some(Duration::from_millis(100)), None),
            VmEnd::Timeout
        );
        assert_eq!(vm.ended(), None, "{guest} must still be running");
        vm.shutdown().unwrap();
    }
}
