//! Live migration (docs/migration.md): pre-copy over a Unix or TCP
//! stream using KVM's dirty log, then a stop-and-copy whose downtime fits
//! a budget, then a two-step switch (Ready, Commit) so the guest never
//! runs in both places: the source ends its VM before it tells the
//! destination to run. A local upgrade hands the guest's memfd over the
//! Unix socket instead of copying RAM.

mod receive;
mod send;
pub mod wire;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use receive::{Intake, IntakeError, Step};
pub(crate) use send::Outgoing;
pub use send::SWITCH_GRACE;
pub use wire::{MigrationUrl, WireError, CONNECT_BOUND, MESSAGE_BOUND, PROTOCOL_VERSION};

use crate::VmConfig;

/// The first message: who is coming.
#[derive(Serialize, Deserialize)]
pub(crate) struct Hello {
    pub(crate) version: u32,
    pub(crate) config: VmConfig,
    /// A local upgrade: the guest's memfd comes with this message.
    pub(crate) local: bool,
}

/// How to migrate.
#[derive(Clone, Debug)]
pub struct MigrationOptions {
    pub url: MigrationUrl,
    /// The longest the guest may be stopped: pre-copy goes on until the
    /// dirty pages left can be sent within it (default 300 ms, as QEMU
    /// and cloud-hypervisor).
    pub downtime: Duration,
    /// When the copy has not converged by then: give up (the VM keeps
    /// running here), or with `force_on_timeout` stop and copy anyway
    /// (cloud-hypervisor's `timeout_strategy` `cancel` and `ignore`).
    pub timeout: Duration,
    pub force_on_timeout: bool,
    /// Hand the guest's memory over as a file descriptor (`unix:` only,
    /// the VM started with shared memory): nothing is copied.
    pub local: bool,
}

impl MigrationOptions {
    pub const DEFAULT_DOWNTIME: Duration = Duration::from_millis(300);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

    pub fn new(url: MigrationUrl) -> Self {
        MigrationOptions {
            url,
            downtime: Self::DEFAULT_DOWNTIME,
            timeout: Self::DEFAULT_TIMEOUT,
            force_on_timeout: false,
            local: false,
        }
    }
}

/// Where an outgoing migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Connecting,
    /// Pre-copy: the guest runs while its pages are sent.
    Copying,
    /// The guest is paused for the final copy and the switch.
    Stopped,
    Completed,
    Failed,
    Cancelled,
}

impl Phase {
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Cancelled)
    }
}

impl std::fmt::Display for Phase {
    /// The name the API uses.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Connecting => "connecting",
            Phase::Copying => "copying",
            Phase::Stopped => "stopped",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        })
    }
}

/// An outgoing migration's progress (`GET /api/v1/vm.migration`, and the
/// API model's `Migration`: one type for the server and `brisk ctl`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrationStatus {
    pub phase: Phase,
    pub destination_url: String,
    pub local: bool,
    pub downtime_budget_ms: f64,
    /// Dirty-page passes after the first full one.
    pub iteration: u32,
    pub bytes_sent: u64,
    pub rate_bytes_per_s: u64,
    /// Pages dirtied since the last pass.
    pub dirty_pages: u64,
    /// How long sending them would stop the guest.
    pub estimated_downtime_ms: f64,
    /// Pause here to Ready-and-Commit (completed migrations).
    pub downtime_ms: Option<f64>,
    pub total_ms: f64,
    pub error: Option<String>,
}

impl MigrationStatus {
    /// The status of a migration about to connect.
    pub fn new(o: &MigrationOptions) -> Self {
        MigrationStatus {
            phase: Phase::Connecting,
            destination_url: o.url.to_string(),
            local: o.local,
            downtime_budget_ms: o.downtime.as_secs_f64() * 1e3,
            iteration: 0,
            bytes_sent: 0,
            rate_bytes_per_s: 0,
            dirty_pages: 0,
            estimated_downtime_ms: 0.0,
            downtime_ms: None,
            total_ms: 0.0,
            error: None,
        }
    }
}

/// Why a migration could not start.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("the VM has shut down")]
    Ended,
    #[error("a migration is already in progress")]
    InProgress,
    #[error("a live snapshot of this VM is in progress; migrate once it ends")]
    LiveSnapshot,
    #[error(
        "a local upgrade hands over guest memory, which needs a VM started with --shared-memory"
    )]
    NotShared,
    #[error("a local upgrade passes a file descriptor, which needs a unix: destination")]
    LocalNeedsUnix,
    #[error("cannot start the migration thread: {0}")]
    Thread(#[source] std::io::Error),
}
