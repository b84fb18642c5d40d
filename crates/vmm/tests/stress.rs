//! The short (CI) randomized stress: 100k operations, fixed seed, every
//! deadline and counter checked. `brisk stress --ops 1000000` is the long one.

mod common;

use brisk_vmm::require_kvm;

use brisk_vmm::stress::{run, StressConfig};
use brisk_vmm::Irqchip;

#[test]
fn a_hundred_thousand_random_operations_keep_every_guarantee() {
    require_kvm!();
    let config = StressConfig {
        ops: 100_000,
        seed: 2026,
        ..StressConfig::default()
    };
    let report = run(&config).unwrap_or_else(|e| panic!("seed {}: {e}", config.seed));
    eprintln!("{report}");
    assert_eq!(report.ops, config.ops);
    assert!(
        report.ops_by_kind.iter().all(|&n| n > 1000),
        "every op kind exercised"
    );
    assert!(report.resumes_verified > 1000);
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
    let report = run(&config).unwrap_or_else(|e| panic!("seed {}: {e}", config.seed));
    assert_eq!(report.ops, config.ops);
}
