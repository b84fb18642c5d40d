//! brisk's threads run under their seccomp filters: a call off a vCPU
//! thread's list is stopped, the ones it needs go through. (The whole CLI
//! suite runs `brisk run` with the default `--seccomp on`, which traps.)

mod common;

use brisk_vmm::seccomp::{filter, Seccomp, ThreadKind};
use brisk_vmm::{require_kvm, Irqchip, KvmVcpu, Output, Vm, VmConfig};
use common::{soon, wait_progress};

#[test]
fn a_forbidden_syscall_on_a_vcpu_thread_is_stopped() {
    require_kvm!();
    let config = VmConfig {
        payload: brisk_vmm::Payload::builtin("pio"),
        cpus: 1,
        irqchip: Irqchip::User,
        seccomp: Seccomp::Errno(libc::EPERM as u32),
        ..VmConfig::default()
    };
    let vm = Vm::start(&config, Output::Null).unwrap();
    wait_progress(&vm, 0, 100);
    let (fd, errno) = vm
        .vcpu(0)
        .run_on(
            |_v: &mut KvmVcpu| {
                // SAFETY: socket(2) with constant arguments; a returned fd
                // (the filter failing) would be closed.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                let errno = std::io::Error::last_os_error().raw_os_error();
                if fd >= 0 {
                    // SAFETY: our own fd.
                    unsafe { libc::close(fd) };
                }
                (fd, errno)
            },
            soon(),
        )
        .unwrap();
    assert_eq!(
        (fd, errno),
        (-1, Some(libc::EPERM)),
        "socket() on a vCPU thread"
    );
    // What the vCPU needs still works: KVM_RUN and register access.
    let p = vm.progress(0);
    wait_progress(&vm, 0, p + 100);
    let rip = vm
        .vcpu(0)
        .run_on(|v: &mut KvmVcpu| v.fd().get_regs().map(|r| r.rip), soon())
        .unwrap();
    assert!(rip.is_ok());
    vm.shutdown().unwrap();
}

#[test]
fn every_thread_kind_has_a_filter_and_off_has_none() {
    for kind in [
        ThreadKind::Vcpu,
        ThreadKind::Timer,
        ThreadKind::Api,
        ThreadKind::Main,
    ] {
        assert!(filter(kind, Seccomp::Trap).is_some_and(|p| !p.is_empty()));
        assert!(filter(kind, Seccomp::Off).is_none());
    }
}
