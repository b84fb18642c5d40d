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

/// Why a control operation did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// These vCPUs did not acknowledge before the deadline.
    Timeout { op: Op, vcpus: Vec<usize> },
    /// The vCPU's thread has left its run loop.
    Exited { op: Op, vcpu: usize },
    /// `run_on` from the vCPU's own thread while its guest is in use there
    /// (inside an exit handler or another `run_on` closure).
    Reentrant { vcpu: usize },
    /// The vCPU is not a member of the exclusive group.
    NotMember { vcpu: usize },
    /// The vCPU already belongs to an idle group.
    AlreadyGrouped { vcpu: usize },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Timeout { op, vcpus } => {
                let list: Vec<String> = vcpus.iter().map(|v| v.to_string()).collect();
                write!(
                    f,
                    "{op}: vCPU {} did not acknowledge before the deadline",
                    list.join(", ")
                )
            }
            Error::Exited { op, vcpu } => write!(f, "{op}: vCPU {vcpu} has exited"),
            Error::NotMember { vcpu } => write!(f, "vCPU {vcpu} is not a member of this group"),
            Error::AlreadyGrouped { vcpu } => {
                write!(f, "vCPU {vcpu} already belongs to an idle group")
            }
            Error::Reentrant { vcpu } => write!(
                f,
                "run_on: called on vCPU {vcpu}'s own thread while its state is borrowed"
            ),
        }
    }
}

impl std::error::Error for Error {}
