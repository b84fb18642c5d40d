//! The pre-immediate_exit way (old QEMU): the kick signal is blocked in the
//! vCPU thread and unblocked only inside KVM_RUN via KVM_SET_SIGNAL_MASK,
//! which makes KVM swap the task's signal mask (under its siglock) on every
//! entry; a pending kick is consumed with sigtimedwait.

use std::mem;

use brisk_kvm::{kick_signal, KvmVcpu};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

ioctl_iow_nr!(
    KVM_SET_SIGNAL_MASK,
    kvm_bindings::KVMIO,
    0x8b,
    kvm_bindings::kvm_signal_mask
);

#[repr(C)]
struct SignalMask {
    len: u32,
    sigset: u64,
}

/// On the calling (vCPU) thread: block the kick signal, and tell KVM to
/// run the guest with it unblocked.
pub fn install(v: &KvmVcpu) {
    let sig = kick_signal();
    // SAFETY: sigset operations on a local, zeroed sigset_t.
    unsafe {
        let mut set: libc::sigset_t = mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        assert_eq!(
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
            0
        );
        let mut current: libc::sigset_t = mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut current);
        libc::sigdelset(&mut current, sig);
        // The kernel's sigset is 64 bits: the first word of glibc's set.
        let word = *(&current as *const libc::sigset_t as *const u64);
        let mask = SignalMask {
            len: 8,
            sigset: word,
        };
        // SAFETY: a vCPU fd and a kvm_signal_mask with an 8-byte set.
        let ret = ioctl_with_ref(v.fd(), KVM_SET_SIGNAL_MASK(), &mask);
        assert_eq!(
            ret,
            0,
            "KVM_SET_SIGNAL_MASK: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Consume a pending kick signal without waiting (old QEMU's
/// kvm_eat_signals).
pub fn eat_signal() {
    // SAFETY: sigtimedwait with a local set and a zero timeout.
    unsafe {
        let mut set: libc::sigset_t = mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        libc::sigtimedwait(&set, std::ptr::null_mut(), &zero);
    }
}
