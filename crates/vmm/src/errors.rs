//! Why a VM does not start, by what was refused: a kernel file, a disk,
//! a snapshot or a migration's stream, or the caller's abort. Each is one
//! sentence naming what it is about, with the error beneath as its source.

use std::path::PathBuf;

use crate::migration::wire::{Kind, WireError};

/// A kernel or initrd file that cannot be booted (`what` says which).
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {} is {kind}, not a regular file", path.display())]
    NotRegular {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("{what} {} is {size} bytes, larger than the guest's {} MiB of RAM", path.display(), ram >> 20)]
    TooLarge {
        what: &'static str,
        path: PathBuf,
        size: u64,
        ram: u64,
    },
    #[error("kernel {} is not a Linux bzImage, a 64-bit ELF vmlinux or a multiboot kernel", path.display())]
    UnknownFormat { path: PathBuf },
    /// The loader refused its contents.
    #[error("{what} {}: {source}", path.display())]
    Refused {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A disk image that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {} is {kind}; brisk serves raw image files", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("disk {} is {size} bytes, less than one 512-byte sector", path.display())]
    TooSmall { path: PathBuf, size: u64 },
    #[error("cannot lock disk {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another open file description holds a conflicting lock.
    #[error(
        "disk {} is in use ({}): another VM, or this one, has it open{}",
        path.display(),
        if *readonly { "locked for writing" } else { "locked" },
        if *readonly { " read-write" } else { "" }
    )]
    InUse { path: PathBuf, readonly: bool },
}

/// What the caller's abort (a signal, its timeout) stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Interruption {
    #[error("loading {what} {} was interrupted", path.display())]
    Loading { what: &'static str, path: PathBuf },
    #[error("stopped while waiting for the migration's source")]
    WaitingForSource,
    #[error("stopped while receiving the migration")]
    Receiving,
}

/// A snapshot's (or a migration source's) state that cannot be restored
/// here.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{} is not a snapshot directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("the state file names memory file '{0}', not one of brisk's (memory-HEX)")]
    MemoryFileName(String),
    #[error("{} is {len} bytes; the state file says the guest has {want} bytes of RAM", path.display())]
    MemoryFileSize { path: PathBuf, len: u64, want: u64 },
    #[error("the saved VM has {} MiB of RAM, more than this brisk takes ({} MiB: --max-memory, by default the host's RAM)", saved >> 20, max >> 20)]
    TooMuchMemory { saved: u64, max: u64 },
    #[error("the saved VM's disk path '{}' is relative; brisk takes only absolute disk paths from a snapshot or a migration", path.display().to_string().escape_debug())]
    RelativeDisk { path: PathBuf },
    #[error(
        "the saved VM opens disk {}{}; brisk opens disk paths from a snapshot or a migration only with --trust-disk-paths",
        path.display().to_string().escape_debug(),
        if *readonly { " read-only" } else { " read-write" }
    )]
    UntrustedDisk { path: PathBuf, readonly: bool },
    #[error("the saved configuration is not valid: {0}")]
    Config(#[source] crate::ConfigError),
    #[error("the saved RAM regions do not match the saved memory size")]
    Regions,
    #[error(
        "diff layer {0}: its page runs are out of order, overlap, or lie outside the guest's RAM"
    )]
    LayerRuns(String),
    #[error("{0} diff layers, more than brisk stacks (64): merge them with brisk merge-snapshot")]
    TooManyLayers(usize),
    #[error("the state holds {saved} vCPUs; its configuration has {configured}")]
    VcpuCount { saved: usize, configured: usize },
    #[error("user-space halts and pending interrupts saved for a kernel-irqchip VM")]
    UserStateForKernelIrqchip,
    #[error("cannot build {what} here: {source}")]
    CannotBuild {
        what: &'static str,
        #[source]
        source: Box<crate::StartError>,
    },
    #[error("KVM refused the saved state: {0}")]
    Kvm(#[source] brisk_kvm::Error),
    #[error(transparent)]
    Device(#[from] brisk_devices::StateError),
    #[error("the restored VM did not park: {0}")]
    DidNotPark(#[source] Box<crate::PauseError>),
}

/// A migration's destination refused its source or its stream.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("cannot listen on {url}: {source}")]
    Listen {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {url}: {} exists (brisk removes only sockets it made)", path.display())]
    SocketExists { url: String, path: PathBuf },
    #[error("accepting the migration: {0}")]
    Accept(#[source] std::io::Error),
    #[error("the migration stream: {0}")]
    Stream(#[source] WireError),
    #[error(transparent)]
    Intake(#[from] crate::migration::IntakeError),
    #[error("the source's memfd: {0}")]
    Memfd(#[source] brisk_kvm::MemfdError),
    #[error("writing the source's pages at {at:#x}: {source}")]
    Pages {
        at: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("resuming: {0}")]
    Resume(#[source] crate::PauseError),
    /// The source's own words (printable, bounded).
    #[error("the source gave up: {0}")]
    SourceGaveUp(String),
    #[error("the source sent {0:?} instead of Commit")]
    NoCommit(Kind),
}
