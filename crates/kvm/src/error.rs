//! KVM errors with the operation that failed.

/// A failed KVM (or related system) call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` is missing.
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel, kvm_amd or kvm_pvm)")]
    NoKvm,
    /// `/dev/kvm` exists but this user may not open it.
    #[error("no permission to open /dev/kvm (add this user to the 'kvm' group or run as root)")]
    KvmPermission,
    /// The host's KVM lacks something brisk needs.
    #[error("this host's KVM lacks {0}, which brisk requires")]
    MissingCapability(&'static str),
    /// An ioctl or system call failed.
    #[error("{what} failed: {err}")]
    Sys {
        what: &'static str,
        #[source]
        err: vmm_sys_util::errno::Error,
    },
    /// Guest memory of this size cannot be had.
    #[error("guest memory: regions must be non-empty and page-aligned ({0} bytes asked for)")]
    MemorySize(u64),
    /// Mapping guest memory failed.
    #[error("guest memory: {0}")]
    MemoryMap(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Saved state that KVM's structures cannot take.
    #[error("{0}")]
    State(String),
    /// An option the user chose that this host's KVM cannot provide.
    #[error("{what} is not available: {why}")]
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
