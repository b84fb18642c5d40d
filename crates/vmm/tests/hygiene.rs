//! A VM leaves no thread and no file descriptor behind. One test in this
//! binary, so no other test's threads or fds are counted.

mod common;

use brisk_vmm::require_kvm;

use std::time::Duration;

use brisk_vmm::{Irqchip, VmEnd};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

/// Threads of this process that brisk created (vCPUs, the timer thread,
/// ...): not the test harness's, nor KVM's own workers
/// (`kvm-nx-lpage-recovery`, shown as `kvm-nx-lpage-re`).
fn brisk_threads() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .filter(|name| name.starts_with("vcpu") || name.starts_with("brisk-"))
        .collect()
}

/// Wait (bounded) until no thread brisk created is left. A joined thread
/// has finished, but the kernel removes it from /proc/self/task a moment
/// later; one never joined stays, and fails this.
fn assert_no_brisk_thread(what: &str) {
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = brisk_threads();
        if left.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "{what}: threads left behind: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
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

    assert_no_brisk_thread("the first VM");
    let fds = count("/proc/self/fd");
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
        assert_no_brisk_thread(guest);
        assert_eq!(count("/proc/self/fd"), fds, "{guest}: fds left behind");
    }
    // Dropping a VM without shutdown() cleans up too.
    drop(common::start("spin", 2, Irqchip::User));
    assert_no_brisk_thread("a dropped VM");
    assert_eq!(count("/proc/self/fd"), fds);
}
