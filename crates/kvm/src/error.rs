//! KVM errors with the operation that failed.

use std::fmt;

/// A failed KVM (or related system) call.
#[derive(Debug)]
pub enum Error {
    /// `/dev/kvm` is missing.
    NoKvm,
    /// `/dev/kvm` exists but this user may not open it.
    KvmPermission,
    /// The host's KVM lacks something brisk needs.
    MissingCapability(&'static str),
    /// An ioctl or system call failed.
    Sys {
        what: &'static str,
        err: vmm_sys_util::errno::Error,
    },
    /// Guest memory could not be set up.
    Memory(String),
    /// An option the user chose that this host's KVM cannot provide.
    Unavailable {
        what: &'static str,
        why: &'static str,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn sys(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error {
        move |err| Error::Sys { what, err }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoKvm => write!(f, "/dev/kvm does not exist: this host has no KVM (load kvm_intel, kvm_amd or kvm_pvm)"),
            Error::KvmPermission => write!(f, "no permission to open /dev/kvm (add this user to the 'kvm' group or run as root)"),
            Error::MissingCapability(c) => write!(f, "this host's KVM lacks {c}, which brisk requires"),
            Error::Sys { what, err } => write!(f, "{what} failed: {err}"),
            Error::Memory(m) => write!(f, "guest memory: {m}"),
            Error::Unavailable { what, why } => write!(f, "{what} is not available: {why}"),
        }
    }
}

impl std::error::Error for Error {}
