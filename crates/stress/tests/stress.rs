//! The short (CI) randomized stress: fixed seeds, every deadline, counter
//! and idle task checked, and the lost-wake-up detector on.
//! `brisk stress --ops 1000000` is the long one.

use brisk_vmm::require_kvm;

use brisk_stress::{run, StressConfig, StressGuest};
use brisk_vmm::Irqchip;

#[test]
fn a_hundred_thousand_random_operations_with_interrupts_keep_every_guarantee() {
    require_kvm!();
    let config = StressConfig {
        ops: 100_000,
        seed: 2026,
        ..StressConfig::default()
    };
    assert_eq!(config.guest(), StressGuest::StressIrq);
    let report = run(&config).unwrap_or_else(|e| panic!("seed {}: {e}", config.seed));
    eprintln!("{report}");
    assert_eq!(report.ops, config.ops);
    for (name, n) in &report.ops_by_kind {
        assert!(*n > 1000, "op {name} exercised only {n} times");
    }
    assert!(report.resumes_verified > 1000);
    assert!(report.idle_tasks_ran > 100, "{}", report.idle_tasks_ran);
    assert!(report.idle_timeouts > 0 && report.idle_exited > 0);
    assert!(report.exclusive_switches > 100);
    let irq = report
        .interrupts
        .as_ref()
        .expect("stress-irq counts interrupts");
    assert!(irq.injected > 0 && irq.raised_by_stress > 0 && irq.doorbell_rings > 0);
    assert!(report.detector.is_some(), "the detector ran");
}

#[test]
fn the_kernel_irqchip_keeps_them_too() {
    require_kvm!();
    let config = StressConfig {
        ops: 20_000,
        seed: 7,
        irqchip: Irqchip::Kernel,
        ..StressConfig::default()
    };
    assert_eq!(config.guest(), StressGuest::Stress);
    let report = run(&config).unwrap_or_else(|e| panic!("seed {}: {e}", config.seed));
    eprintln!("{report}");
    assert_eq!(report.ops, config.ops);
}

/// M:N: eight vCPUs (spinning, PIO-looping and interrupt-driven halting)
/// on two pool threads keep every guarantee, the lost-wake-up detector's
/// included: a vCPU that holds no thread is still woken by its interrupts.
#[test]
fn eight_vcpus_on_two_pool_threads_keep_them_too() {
    require_kvm!();
    let config = StressConfig {
        ops: 40_000,
        seed: 21,
        cpus: 8,
        vcpu_threads: Some(2),
        ..StressConfig::default()
    };
    let report = run(&config).unwrap_or_else(|e| panic!("seed {}: {e}", config.seed));
    eprintln!("{report}");
    assert_eq!(report.ops, config.ops);
    assert!(report.idle_tasks_ran > 10, "{}", report.idle_tasks_ran);
    let irq = report
        .interrupts
        .as_ref()
        .expect("stress-irq counts interrupts");
    assert!(irq.injected > 0 && irq.doorbell_rings > 0);
    assert!(report.detector.is_some(), "the detector ran");
}
