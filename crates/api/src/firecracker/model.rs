//! Firecracker's API shapes (its published swagger, `firecracker.yaml`),
//! the subset brisk serves, as serde types: the one definition the
//! routes, the config file and `GET /vm/config` use. Unknown fields are
//! refused by name, as Firecracker does.

use serde::{Deserialize, Serialize};

/// `GET /`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub app_name: String,
    pub id: String,
    /// "Not started", "Running" or "Paused".
    pub state: String,
    pub vmm_version: String,
}

/// `GET /version`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    pub firecracker_version: String,
}

/// Every error: `{"fault_message": "..."}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fault {
    pub fault_message: String,
}

/// `PUT /boot-source`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// `PUT|PATCH|GET /machine-config` (PATCH: every field optional).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    pub vcpu_count: u64,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl Default for MachineConfiguration {
    /// Firecracker's defaults: 1 vCPU, 128 MiB.
    fn default() -> Self {
        MachineConfiguration {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: None,
        }
    }
}

/// `PATCH /machine-config`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigurationPatch {
    pub vcpu_count: Option<u64>,
    pub mem_size_mib: Option<u64>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    pub cpu_template: Option<String>,
    pub huge_pages: Option<String>,
}

/// One token bucket: `size` tokens, refilled from empty in `refill_time`
/// ms, `one_time_burst` extra once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    pub size: u64,
    pub refill_time: u64,
    #[serde(default)]
    pub one_time_burst: u64,
}

/// Bytes and operations buckets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// `PUT /drives/{id}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub is_root_device: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    #[serde(default)]
    pub is_read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// vhost-user-block: not served by brisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PATCH /drives/{id}`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    pub drive_id: String,
    pub path_on_host: Option<String>,
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /network-interfaces/{id}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u64>,
}

/// `PATCH /network-interfaces/{id}`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    pub iface_id: String,
    pub rx_rate_limiter: Option<RateLimiter>,
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /logger`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    #[serde(default)]
    pub show_level: bool,
    #[serde(default)]
    pub show_log_origin: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub metrics_path: String,
}

/// `PUT /vsock`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    pub guest_cid: u64,
    pub uds_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT /actions`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    pub action_type: String,
}

/// `PATCH /vm`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateChange {
    pub state: String,
}

/// `PUT /snapshot/create`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    pub snapshot_path: String,
    pub mem_file_path: String,
    #[serde(default)]
    pub snapshot_type: Option<String>,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    pub backend_type: String,
    pub backend_path: String,
}

/// `PUT /snapshot/load`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    pub snapshot_path: String,
    #[serde(default)]
    pub mem_file_path: Option<String>,
    #[serde(default)]
    pub mem_backend: Option<MemoryBackend>,
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default)]
    pub network_overrides: Vec<serde_json::Value>,
    #[serde(default)]
    pub vsock_override: Option<serde_json::Value>,
    #[serde(default)]
    pub clock_realtime: bool,
}

/// The config file (`--config-file`) and `GET /vm/config`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfiguration {
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    #[serde(default)]
    pub drives: Vec<Drive>,
    #[serde(
        rename = "machine-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub machine_config: Option<MachineConfiguration>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// Sections brisk has no device for: present and non-null, refused
    /// by name.
    #[serde(default, skip_serializing)]
    pub balloon: Option<serde_json::Value>,
    #[serde(rename = "mmds-config", default, skip_serializing)]
    pub mmds_config: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    pub entropy: Option<serde_json::Value>,
    #[serde(rename = "cpu-config", default, skip_serializing)]
    pub cpu_config: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    pub pmem: Option<serde_json::Value>,
    #[serde(rename = "memory-hotplug", default, skip_serializing)]
    pub memory_hotplug: Option<serde_json::Value>,
}
