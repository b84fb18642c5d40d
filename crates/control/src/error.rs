//! Errors a controller sees.

use std::fmt;

/// The synchronous operation that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Stop,
    PauseAll,
    RunOn,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Stop => "stop",
            Op::PauseAll => "pause_all",
            Op::RunOn => "run_on",
        })
    }
}

fn list(vcpus: &[usize]) -> String {
    Error::list(vcpus)
}

/// Why a control operation did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// These vCPUs did not acknowledge before the deadline.
    #[error("{op}: vCPU {} did not acknowledge before the deadline", list(.vcpus))]
    Timeout { op: Op, vcpus: Vec<usize> },
    /// The vCPU's thread has left its run loop.
    #[error("{op}: vCPU {vcpu} has exited")]
    Exited { op: Op, vcpu: usize },
    /// `run_on` from the vCPU's own thread while its guest is in use there
    /// (inside an exit handler or another `run_on` closure).
    #[error("run_on: called on vCPU {vcpu}'s own thread while its state is borrowed")]
    Reentrant { vcpu: usize },
    /// `stop` or `pause_all` called on the vCPU's own thread (an exit
    /// handler, a device, a `run_on` closure): it would wait for itself.
    #[error(
        "{op}: called on vCPU {vcpu}'s own thread, which cannot park while it waits for itself"
    )]
    OwnThread { op: Op, vcpu: usize },
    /// A `run_on` closure or idle task panicked on the vCPU thread. The
    /// vCPU goes on running: the panic is the controller's, not the guest's.
    #[error("{op}: the closure panicked on vCPU {vcpu}: {message}")]
    Panicked {
        op: Op,
        vcpu: usize,
        message: String,
    },
    /// The vCPU is not a member of the exclusive group.
    #[error("vCPU {vcpu} is not a member of this group")]
    NotMember { vcpu: usize },
    /// The vCPU already belongs to an idle group.
    #[error("vCPU {vcpu} already belongs to an idle group")]
    AlreadyGrouped { vcpu: usize },
    /// A group needs at least one member.
    #[error("a group needs at least one member")]
    EmptyGroup,
}

impl Error {
    /// vCPU ids as "0, 2, 3", as the messages show them.
    pub fn list(vcpus: &[usize]) -> String {
        let list: Vec<String> = vcpus.iter().map(|v| v.to_string()).collect();
        list.join(", ")
    }
}

/// Why [`crate::VcpuCtl::run`] failed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RunError<E> {
    /// The guest (or the exit handler) failed.
    #[error(transparent)]
    Guest(E),
    /// `run` was called a second time on the same control block: its
    /// interrupt is bound to the first thread, so it refuses.
    #[error("vCPU {vcpu}'s run loop was already started once")]
    AlreadyStarted { vcpu: usize },
    /// M:N: the guest or the exit handler panicked on a pool thread (the
    /// pool goes on running the other vCPUs).
    #[error("vCPU {vcpu} panicked on a pool thread")]
    Panicked { vcpu: usize },
    /// M:N: no pool thread could start, so the vCPU never ran.
    #[error("vCPU {vcpu} had no pool thread to run on")]
    NoThread { vcpu: usize },
}
