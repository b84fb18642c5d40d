//! brisk's own API (`/api/v1/...`) as types: every endpoint once (its
//! path, its method, whether it blocks for long), every request body and
//! every reply body once. The server (`routes.rs`), `brisk ctl` and the
//! test that checks openapi.yaml all use these, so a field or a path is
//! written in one place.

use serde::{Deserialize, Serialize};

/// One endpoint of brisk's API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Ping,
    Info,
    Counters,
    Pause,
    Resume,
    Shutdown,
    Kick,
    Snapshot,
    SendMigration,
    Migration,
    CancelMigration,
    Restore,
    ReceiveMigration,
}

impl Endpoint {
    /// Every endpoint.
    pub const ALL: [Endpoint; 13] = [
        Endpoint::Ping,
        Endpoint::Info,
        Endpoint::Counters,
        Endpoint::Pause,
        Endpoint::Resume,
        Endpoint::Shutdown,
        Endpoint::Kick,
        Endpoint::Snapshot,
        Endpoint::SendMigration,
        Endpoint::Migration,
        Endpoint::CancelMigration,
        Endpoint::Restore,
        Endpoint::ReceiveMigration,
    ];

    pub const fn path(self) -> &'static str {
        match self {
            Endpoint::Ping => "/api/v1/vmm.ping",
            Endpoint::Info => "/api/v1/vm.info",
            Endpoint::Counters => "/api/v1/vm.counters",
            Endpoint::Pause => "/api/v1/vm.pause",
            Endpoint::Resume => "/api/v1/vm.resume",
            Endpoint::Shutdown => "/api/v1/vm.shutdown",
            Endpoint::Kick => "/api/v1/vcpu.kick",
            Endpoint::Snapshot => "/api/v1/vm.snapshot",
            Endpoint::SendMigration => "/api/v1/vm.send-migration",
            Endpoint::Migration => "/api/v1/vm.migration",
            Endpoint::CancelMigration => "/api/v1/vm.cancel-migration",
            Endpoint::Restore => "/api/v1/vm.restore",
            Endpoint::ReceiveMigration => "/api/v1/vm.receive-migration",
        }
    }

    pub const fn method(self) -> &'static str {
        match self {
            Endpoint::Ping | Endpoint::Info | Endpoint::Counters | Endpoint::Migration => "GET",
            _ => "PUT",
        }
    }

    /// Whether its handler blocks for long (it writes, sends or reads
    /// guest RAM): the server runs it off its event loop, so other
    /// requests (a cancel) are still answered meanwhile.
    pub const fn slow(self) -> bool {
        matches!(
            self,
            Endpoint::Snapshot
                | Endpoint::SendMigration
                | Endpoint::Restore
                | Endpoint::ReceiveMigration
        )
    }

    /// The endpoint at `path` (a query string ignored).
    pub fn at(path: &str) -> Option<Endpoint> {
        let path = path.split('?').next().unwrap_or(path);
        Self::ALL.into_iter().find(|e| e.path() == path)
    }
}

/// Every error reply: `{"error": "..."}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET vmm.ping`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ping {
    pub name: String,
    pub version: String,
}

/// One vCPU in `vm.info`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuInfo {
    pub id: usize,
    pub mode: String,
    pub state: String,
}

/// `GET vm.info`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmInfo {
    /// "running", "paused" or "shutdown".
    pub state: String,
    pub guest: String,
    pub memory_bytes: u64,
    pub irqchip: String,
    pub mwait: String,
    pub uptime_ms: u64,
    pub vcpus: Vec<VcpuInfo>,
}

/// `PUT vcpu.kick`. serde refuses unknown and duplicate fields and names
/// the value it could not take (`{"id": -1}` is not a vCPU index).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kick {
    pub id: u64,
}

/// `PUT vm.snapshot` (cloud-hypervisor's shape).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub destination_url: String,
    /// Write memory while the guest runs; stop it only for the last
    /// pages and the state (at most about `max_stop_ms`).
    #[serde(default)]
    pub live: bool,
    /// A live snapshot's stop budget (default 10).
    #[serde(default)]
    pub max_stop_ms: Option<u64>,
    /// Only the pages written since this VM's previous snapshot in the
    /// directory, as a layer on it (the VM tracks its dirty pages).
    #[serde(default)]
    pub diff: bool,
}

/// `vm.snapshot`'s reply.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotReply {
    pub destination_url: String,
    pub memory_bytes: u64,
    pub memory_written_bytes: u64,
    pub pause_ms: f64,
    pub stopped_ms: f64,
    pub total_ms: f64,
}

/// `PUT vm.send-migration`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMigration {
    pub destination_url: String,
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    #[serde(default)]
    pub timeout_s: Option<u64>,
    #[serde(default)]
    pub local: bool,
    /// cloud-hypervisor's: "cancel" (default) or "ignore" (stop and copy
    /// anyway) when `timeout_s` passes before convergence.
    #[serde(default)]
    pub timeout_strategy: Option<String>,
}

/// `GET vm.migration` and `vm.send-migration`'s reply: the outgoing
/// migration's progress, brisk_vmm's own type.
pub use brisk_vmm::migration::MigrationStatus as Migration;

/// `PUT vm.restore` (cloud-hypervisor's `source_url`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restore {
    pub source_url: String,
    #[serde(default)]
    pub paused: bool,
}

/// `PUT vm.receive-migration` (cloud-hypervisor's `receiver_url`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveMigration {
    pub receiver_url: String,
    #[serde(default)]
    pub paused: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_is_found_at_its_path_and_nowhere_else() {
        for e in Endpoint::ALL {
            assert_eq!(Endpoint::at(e.path()), Some(e));
            assert_eq!(Endpoint::at(&format!("{}?x=1", e.path())), Some(e));
        }
        assert_eq!(Endpoint::at("/api/v1/vm.nothing"), None);
    }

    /// A migration's status reads back as it was written.
    #[test]
    fn a_migration_status_round_trips() {
        let url: brisk_vmm::MigrationUrl = "unix:/m.sock".parse().unwrap();
        let status = Migration::new(&brisk_vmm::MigrationOptions::new(url));
        let text = serde_json::to_string(&status).unwrap();
        assert!(text.contains(r#""phase":"connecting""#), "{text}");
        let m: Migration = serde_json::from_str(&text).unwrap();
        assert_eq!(m.phase, brisk_vmm::migration::Phase::Connecting);
        assert_eq!(m.destination_url, "unix:/m.sock");
    }
}
