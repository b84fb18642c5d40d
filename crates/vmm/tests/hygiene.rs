//! A VM leaves no thread and no file descriptor behind. One test in this
//! binary, so no other test's threads or fds are counted.

mod common;

use brisk_vmm::require_kvm;

use std::time::Duration;

use brisk_vmm::{Irqchip, VmEnd};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

/// Threads of this process that brisk created: KVM adds workers of its own
/// (`kvm-nx-lpage-recovery`, shown as `kvm-nx-lpage-re`) whose exit after
/// the VM's fd closes is asynchronous, so they are not counted.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| !name.starts_with("kvm-"))
        .count()
}

/// Threads named `vcpuN` (KVM may add kernel workers of its own to the
/// process, e.g. kvm-nx-lpage-recovery, for the VM's lifetime).
fn vcpu_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("vcpu"))
        .count()
}

#[test]
fn no_thread_or_fd_outlives_a_vm() {
    require_kvm!();
    // A first VM pays one-time costs (signal handler, lazily opened files).
    let warm = common::start("hello", 2, Irqchip::User);
    assert_eq!(
        warm.wait(Some(Duration::from_secs(30)), None),
        VmEnd::PowerOff
    );
    warm.shutdown().unwrap();

    let (before, fds) = (threads(), count("/proc/self/fd"));
    for (guest, irqchip) in [
        ("hello", Irqchip::User),
        ("spin", Irqchip::Kernel),
        ("halt", Irqchip::User),
        ("pio", Irqchip::Kernel),
    ] {
        let vm = common::start(guest, 4, irqchip);
        // Each thread names itself when it starts: once it has run a closure
        // it has started.
        for v in vm.vcpus() {
            v.run_on(|_| (), common::soon()).unwrap();
        }
        assert_eq!(vcpu_threads(), 4, "one thread per vCPU");
        vm.wait(Some(Duration::from_millis(100)), None);
        vm.shutdown().unwrap();
        assert_eq!(threads(), before, "{guest}: threads left behind");
        assert_eq!(count("/proc/self/fd"), fds, "{guest}: fds left behind");
    }
    // Dropping a VM without shutdown() cleans up too.
    drop(common::start("spin", 2, Irqchip::User));
    assert_eq!(threads(), before);
    assert_eq!(count("/proc/self/fd"), fds);
}
