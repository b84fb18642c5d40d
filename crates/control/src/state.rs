//! A vCPU's coarse state, observable by blocking: an eventfd per vCPU
//! becomes readable on every transition, so a controller can put all vCPUs
//! of a VM in one epoll set. Transitions happen only on slow paths (halt,
//! park, exit), never per guest entry: the exit path makes no syscall.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering::SeqCst};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Where a vCPU is, as a controller waiting on it sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum VcpuState {
    /// Its thread has not entered the run loop yet.
    Created = 0,
    /// Running the guest or handling its exits.
    Running = 1,
    /// The guest executed HLT; blocked in user space until a kick.
    Halted = 2,
    /// Stopped by a controller.
    Parked = 3,
    /// Its thread has left the run loop.
    Exited = 4,
}

impl VcpuState {
    fn from_u8(v: u8) -> VcpuState {
        match v {
            0 => VcpuState::Created,
            1 => VcpuState::Running,
            2 => VcpuState::Halted,
            3 => VcpuState::Parked,
            _ => VcpuState::Exited,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            VcpuState::Created => "created",
            VcpuState::Running => "running",
            VcpuState::Halted => "halted",
            VcpuState::Parked => "parked",
            VcpuState::Exited => "exited",
        }
    }
}

/// The current state plus the eventfd that counts transitions.
pub(crate) struct StateWatch {
    state: AtomicU8,
    fd: EventFd,
}

impl StateWatch {
    pub(crate) fn new() -> StateWatch {
        StateWatch {
            state: AtomicU8::new(VcpuState::Created as u8),
            // Without an eventfd there is nothing to poll: a process that
            // cannot create one cannot run VMs either.
            fd: EventFd::new(EFD_NONBLOCK).expect("eventfd for vCPU state"),
        }
    }

    pub(crate) fn get(&self) -> VcpuState {
        VcpuState::from_u8(self.state.load(SeqCst))
    }

    /// Publish `s` (if it differs) and add one to the eventfd's count.
    pub(crate) fn set(&self, s: VcpuState) {
        if self.state.swap(s as u8, SeqCst) != s as u8 {
            // Fails only if the count would overflow 2^64-1: not reachable.
            let _ = self.fd.write(1);
        }
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Transitions since the last call (0 if none; never blocks).
    pub(crate) fn take_transitions(&self) -> u64 {
        self.fd.read().unwrap_or(0)
    }
}
