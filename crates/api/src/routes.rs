//! The API as a function from request to reply.

use std::sync::Arc;
use std::time::Duration;

use brisk_control::{Deadline, Request};
use brisk_vmm::{Irqchip, Mwait, PauseError, Vm};
use serde_json::{json, Value};

use crate::model::{self, Endpoint};
use crate::prometheus;
use crate::slot::{Bring, BringError, VmSlot};

/// How long pause and resume may take before the API reports failure.
const DEADLINE: Duration = Duration::from_secs(2);

/// An HTTP reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// Close the connection after this reply (its body was not read).
    pub close: bool,
}

/// A path as it may appear in a message: at most 100 characters.
pub fn shorten(path: &str) -> String {
    match path.char_indices().nth(100) {
        Some((at, _)) => format!("{}... ({} bytes)", &path[..at], path.len()),
        None => path.to_string(),
    }
}

/// The options in a `vm.send-migration` body, or the 400 reply. Pure.
pub fn migration_target(b: &[u8]) -> Result<brisk_vmm::MigrationOptions, Reply> {
    let m: model::SendMigration = body(
        b,
        "{\"destination_url\": \"unix:PATH\" or \"tcp:IP:PORT\", \"downtime_ms\": 300, \"timeout_s\": 60, \"timeout_strategy\": \"cancel\", \"local\": false}",
    )?;
    let url = m
        .destination_url
        .parse()
        .map_err(|e: String| Reply::error(400, e))?;
    let mut o = brisk_vmm::MigrationOptions::new(url);
    if let Some(ms) = m.downtime_ms {
        if !(1..=60_000).contains(&ms) {
            return Err(Reply::error(400, "downtime_ms must be from 1 to 60000"));
        }
        o.downtime = Duration::from_millis(ms);
    }
    if let Some(s) = m.timeout_s {
        if !(1..=86_400).contains(&s) {
            return Err(Reply::error(400, "timeout_s must be from 1 to 86400"));
        }
        o.timeout = Duration::from_secs(s);
    }
    o.local = m.local;
    o.force_on_timeout = match m.timeout_strategy.as_deref() {
        None | Some("cancel") => false,
        Some("ignore") => true,
        Some(other) => {
            return Err(Reply::error(
                400,
                format!(
                    "timeout_strategy '{}' is neither \"cancel\" nor \"ignore\"",
                    shorten(other)
                ),
            ))
        }
    };
    Ok(o)
}

/// What a `vm.restore` or `vm.receive-migration` body asks for, or the
/// 400 reply. Pure.
pub fn bring_target(endpoint: Endpoint, b: &[u8]) -> Result<Bring, Reply> {
    if endpoint == Endpoint::Restore {
        let r: model::Restore = body(b, "{\"source_url\": \"file:///DIR\", \"paused\": false}")?;
        let dir = file_url(&r.source_url).map_err(|e| Reply::error(400, e.to_string()))?;
        return Ok(Bring::Restore {
            dir,
            paused: r.paused,
        });
    }
    let r: model::ReceiveMigration = body(
        b,
        "{\"receiver_url\": \"unix:PATH\" or \"tcp:IP:PORT\", \"paused\": false}",
    )?;
    let url = r
        .receiver_url
        .parse()
        .map_err(|e: String| Reply::error(400, e))?;
    Ok(Bring::Receive {
        url,
        paused: r.paused,
    })
}

/// Why a `file://` URL in a request body names no directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileUrlError {
    /// Another scheme (the URL as given, shortened).
    #[error("'{0}' is not a file:// URL (snapshots go to file:///DIR)")]
    NotFile(String),
    /// A relative or empty path (the URL as given, shortened).
    #[error("'{0}': the directory must be an absolute path (file:///DIR)")]
    Relative(String),
    #[error("the directory name contains a NUL byte")]
    Nul,
}

/// The directory a `file://` URL names (`file:///abs/dir`); other
/// schemes and relative or empty paths are refused by name.
pub fn file_url(url: &str) -> Result<std::path::PathBuf, FileUrlError> {
    let Some(path) = url.strip_prefix("file://") else {
        return Err(FileUrlError::NotFile(shorten(url)));
    };
    if !path.starts_with('/') {
        return Err(FileUrlError::Relative(shorten(url)));
    }
    if path.contains('\0') {
        return Err(FileUrlError::Nul);
    }
    Ok(path.into())
}

/// Parse a JSON object body into `T`, or the 400 reply naming the problem
/// (`example` shows the expected shape). Pure, like [`route`].
fn body<T: serde::de::DeserializeOwned>(body: &[u8], example: &str) -> Result<T, Reply> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.is_object() => {}
        Ok(_) => {
            return Err(Reply::error(
                400,
                format!("body must be an object like {example}"),
            ))
        }
        Err(e) => return Err(Reply::error(400, format!("body is not JSON: {e}"))),
    }
    serde_json::from_slice::<T>(body)
        .map_err(|e| Reply::error(400, format!("body must be like {example}: {e}")))
}

/// The directory in a `vm.snapshot` body, or the 400 reply. Pure.
pub fn snapshot_target(b: &[u8]) -> Result<std::path::PathBuf, Reply> {
    snapshot_request(b).map(|(dir, _)| dir)
}

/// Which snapshot a `vm.snapshot` body asks for.
#[derive(Clone, Copy, Debug)]
enum SnapshotKind {
    StopAndCopy,
    Live(brisk_vmm::LiveOptions),
    Diff,
}

/// The directory and the kind of snapshot; or the 400 reply.
fn snapshot_request(b: &[u8]) -> Result<(std::path::PathBuf, SnapshotKind), Reply> {
    let s: model::SnapshotRequest = body(b, "{\"destination_url\": \"file:///DIR\"}")?;
    let dir = file_url(&s.destination_url).map_err(|e| Reply::error(400, e.to_string()))?;
    if !s.live && s.max_stop_ms.is_some() {
        return Err(Reply::error(
            400,
            "max_stop_ms is for a live snapshot (\"live\": true)",
        ));
    }
    let kind = match (s.live, s.diff) {
        (true, true) => return Err(Reply::error(400, "a snapshot is live or diff, not both")),
        (true, false) => {
            let mut o = brisk_vmm::LiveOptions::default();
            if let Some(ms) = s.max_stop_ms {
                o.max_stop = std::time::Duration::from_millis(ms);
            }
            SnapshotKind::Live(o)
        }
        (false, true) => SnapshotKind::Diff,
        (false, false) => SnapshotKind::StopAndCopy,
    };
    Ok((dir, kind))
}

impl Reply {
    pub(crate) fn json(status: u16, v: Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: v.to_string(),
            close: false,
        }
    }

    pub(crate) fn no_content() -> Reply {
        Reply {
            status: 204,
            content_type: "application/json",
            body: String::new(),
            close: false,
        }
    }

    /// The same reply, closing the connection after it.
    pub fn closing(mut self) -> Reply {
        self.close = true;
        self
    }

    /// `{"error": msg}` with `status`.
    pub fn error(status: u16, msg: impl Into<String>) -> Reply {
        Reply::typed(status, &model::ErrorBody { error: msg.into() })
    }

    /// `v` as the JSON body.
    pub(crate) fn typed<T: serde::Serialize>(status: u16, v: &T) -> Reply {
        Reply::json(status, serde_json::to_value(v).unwrap_or_default())
    }
}

/// Which endpoint a request is for (the query string ignored), or the
/// 404/405 reply. Pure: the fuzz target drives it with any bytes.
pub fn route(method: &str, path: &str) -> Result<Endpoint, Reply> {
    let Some(e) = Endpoint::at(path) else {
        let path = path.split('?').next().unwrap_or(path);
        return Err(Reply::error(
            404,
            format!("no such path: {}", shorten(path)),
        ));
    };
    if method != e.method() {
        return Err(Reply::error(
            405,
            format!("{} takes {}, not {method}", e.path(), e.method()),
        ));
    }
    Ok(e)
}

/// The vCPU index in a `vcpu.kick` body, or the 400 reply naming what is
/// wrong with it. Pure, like [`route`].
pub fn kick_target(body: &[u8]) -> Result<u64, Reply> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.is_object() => {}
        Ok(_) => return Err(Reply::error(400, "body must be an object like {\"id\": 0}")),
        Err(e) => return Err(Reply::error(400, format!("body is not JSON: {e}"))),
    }
    // Again, typed: unknown, duplicate and ill-typed fields are named.
    match serde_json::from_slice::<model::Kick>(body) {
        Ok(k) => Ok(k.id),
        Err(e) => Err(Reply::error(
            400,
            format!("body must be {{\"id\": N}} with N a vCPU index: {e}"),
        )),
    }
}

/// The API: it only translates HTTP to the VM's operations
/// ([`Vm::pause`], [`Vm::resume`], ...) on the VM in its [`VmSlot`].
pub struct Api {
    slot: Arc<VmSlot>,
    /// Firecracker's API beside brisk's (`brisk firecracker`).
    firecracker: Option<crate::firecracker::Firecracker>,
}

/// The operations on a VM that is there.
struct OnVm<'a>(&'a Arc<Vm>);

impl Api {
    /// The API of `vm`.
    pub fn new(vm: Arc<Vm>) -> Api {
        Api {
            slot: VmSlot::with(vm),
            firecracker: None,
        }
    }

    /// The API of whatever VM `slot` holds (or will).
    pub fn with_slot(slot: Arc<VmSlot>) -> Api {
        Api {
            slot,
            firecracker: None,
        }
    }

    /// Serve Firecracker's paths too.
    pub fn with_firecracker(mut self, fc: crate::firecracker::Firecracker) -> Api {
        self.firecracker = Some(fc);
        self
    }

    /// Whether a request blocks for long (it builds, saves, restores or
    /// migrates a VM): the server runs it off its event loop.
    pub fn is_slow(&self, path: &str) -> bool {
        let path = path.split('?').next().unwrap_or(path);
        Endpoint::at(path).is_some_and(Endpoint::slow)
            || (self.firecracker.is_some() && crate::firecracker::is_slow(path))
    }

    /// Answer one request. `accept` is the Accept header, if any.
    pub fn handle(&self, method: &str, path: &str, body: &[u8], accept: Option<&str>) -> Reply {
        if let Some(fc) = &self.firecracker {
            if !path.starts_with("/api/v1/") {
                return fc.handle(&self.slot, method, path, body);
            }
        }
        let endpoint = match route(method, path) {
            Ok(e) => e,
            Err(reply) => return reply,
        };
        match endpoint {
            Endpoint::Ping => {
                let ping = model::Ping {
                    name: "brisk".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                };
                return Reply::typed(200, &ping);
            }
            Endpoint::Restore | Endpoint::ReceiveMigration => {
                return match bring_target(endpoint, body) {
                    Ok(what) => match self.slot.bring(what) {
                        Ok(()) => Reply::no_content(),
                        Err(e @ BringError::Failed(_)) => Reply::error(400, e.to_string()),
                        Err(e) => Reply::error(409, e.to_string()),
                    },
                    Err(reply) => reply,
                }
            }
            _ => {}
        }
        let Some(vm) = self.slot.get() else {
            if endpoint == Endpoint::Shutdown {
                // No VM yet: end the wait for one (and a migration it
                // waits on); brisk exits 0.
                self.slot.request_shutdown();
                return Reply::no_content();
            }
            return Reply::error(
                409,
                "no VM yet: bring one with vm.restore or vm.receive-migration",
            );
        };
        let on = OnVm(&vm);
        match endpoint {
            Endpoint::Info => on.info(),
            Endpoint::Counters => on.counters(accept),
            Endpoint::Pause => on.pause(),
            Endpoint::Resume => on.resume(),
            Endpoint::Shutdown => {
                vm.request_shutdown();
                Reply::no_content()
            }
            Endpoint::Kick => match kick_target(body) {
                Ok(id) => on.kick(id),
                Err(reply) => reply,
            },
            Endpoint::Snapshot => match snapshot_request(body) {
                Ok((dir, kind)) => on.snapshot(&dir, kind),
                Err(reply) => reply,
            },
            Endpoint::SendMigration => match migration_target(body) {
                Ok(opts) => on.send_migration(opts),
                Err(reply) => reply,
            },
            Endpoint::Migration => match vm.migration_status() {
                Some(s) => Reply::json(200, json!(s)),
                None => Reply::error(404, "no migration was started"),
            },
            Endpoint::CancelMigration => match vm.cancel_migration() {
                true => Reply::no_content(),
                false => Reply::error(409, "no migration is in progress"),
            },
            // Answered above, VM or not.
            Endpoint::Ping | Endpoint::Restore | Endpoint::ReceiveMigration => {
                Reply::error(500, "route table and dispatch disagree")
            }
        }
    }
}

impl OnVm<'_> {
    fn info(&self) -> Reply {
        let vcpus = self
            .0
            .vcpus()
            .iter()
            .map(|v| model::VcpuInfo {
                id: v.id(),
                mode: v.mode().name().into(),
                state: v.state().name().into(),
            })
            .collect();
        let info = model::VmInfo {
            state: self.0.state().name().into(),
            guest: self.0.guest().into(),
            memory_bytes: self.0.memory_size(),
            irqchip: match self.0.irqchip() {
                Irqchip::User => "user",
                Irqchip::Kernel => "kernel",
            }
            .into(),
            mwait: match self.0.mwait() {
                Mwait::Hide => "hide",
                Mwait::Exit => "exit",
                Mwait::Passthrough => "passthrough",
            }
            .into(),
            uptime_ms: self.0.uptime().as_millis() as u64,
            vcpus,
        };
        Reply::typed(200, &info)
    }

    fn counters(&self, accept: Option<&str>) -> Reply {
        let snapshots: Vec<_> = self
            .0
            .vcpus()
            .iter()
            .map(|v| {
                let id = v.id();
                (id, v.counters().snapshot(), self.0.interrupt_stats(id))
            })
            .collect();
        if accept.is_some_and(|a| a.contains("text/plain")) {
            return Reply {
                status: 200,
                content_type: "text/plain; version=0.0.4",
                body: prometheus::render(&snapshots, self.0.unclaimed_accesses()),
                close: false,
            };
        }
        Reply::json(
            200,
            prometheus::json(&snapshots, self.0.unclaimed_accesses()),
        )
    }

    fn pause(&self) -> Reply {
        Self::outcome(self.0.try_pause(Deadline::after(DEADLINE)))
    }

    fn resume(&self) -> Reply {
        Self::outcome(self.0.try_resume())
    }

    fn outcome(r: Result<(), PauseError>) -> Reply {
        match r {
            Ok(()) => Reply::no_content(),
            Err(e @ PauseError::Control(_)) => Reply::error(500, e.to_string()),
            Err(e) => Reply::error(409, e.to_string()),
        }
    }

    fn snapshot(&self, dir: &std::path::Path, kind: SnapshotKind) -> Reply {
        use brisk_vmm::SnapshotError;
        let made = match kind {
            SnapshotKind::StopAndCopy => self.0.snapshot(dir),
            SnapshotKind::Live(opts) => self.0.snapshot_live(dir, opts),
            SnapshotKind::Diff => self.0.snapshot_diff(dir),
        };
        match made {
            Ok(info) => Reply::typed(
                200,
                &model::SnapshotReply {
                    destination_url: format!("file://{}", dir.display()),
                    memory_bytes: info.memory.ram,
                    memory_written_bytes: info.memory.data,
                    pause_ms: info.pause.as_secs_f64() * 1e3,
                    stopped_ms: info.stopped.as_secs_f64() * 1e3,
                    total_ms: info.total.as_secs_f64() * 1e3,
                },
            ),
            Err(
                e @ (SnapshotError::Pause(PauseError::Ended | PauseError::Busy(_))
                | SnapshotError::MigrationInProgress
                | SnapshotError::NotTracking
                | SnapshotError::NoBase),
            ) => Reply::error(409, e.to_string()),
            Err(e @ SnapshotError::Io { .. }) => Reply::error(400, e.to_string()),
            Err(e) => Reply::error(500, e.to_string()),
        }
    }

    fn send_migration(&self, opts: brisk_vmm::MigrationOptions) -> Reply {
        use brisk_vmm::MigrationError as E;
        // As cloud-hypervisor's: the reply comes when the migration has
        // ended (GET vm.migration follows it meanwhile).
        match self.0.send_migration(opts) {
            Ok(()) => match self.0.wait_migration() {
                Some(s) if s.phase == brisk_vmm::migration::Phase::Completed => {
                    Reply::json(200, json!(s))
                }
                Some(s) => {
                    let status = match s.phase {
                        brisk_vmm::migration::Phase::Cancelled => 409,
                        _ => 500,
                    };
                    let mut v = json!(s);
                    v["error"] = json!(format!(
                        "migration {}: {}",
                        json!(s.phase).as_str().unwrap_or("failed"),
                        s.error.as_deref().unwrap_or("?")
                    ));
                    Reply::json(status, v)
                }
                None => Reply::error(500, "the migration started but has no status"),
            },
            Err(e @ (E::Ended | E::InProgress | E::LiveSnapshot)) => {
                Reply::error(409, e.to_string())
            }
            Err(e @ (E::NotShared | E::LocalNeedsUnix)) => Reply::error(400, e.to_string()),
            Err(e) => Reply::error(500, e.to_string()),
        }
    }

    fn kick(&self, id: u64) -> Reply {
        let n = self.0.vcpus().len();
        match usize::try_from(id) {
            Ok(i) if i < n => {
                self.0.vcpu(i).kick(Request::Kick);
                Reply::no_content()
            }
            _ => Reply::error(400, format!("no vCPU {id}: this VM has {n}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(r: Result<impl Sized, Reply>) -> String {
        match r {
            Err(reply) => {
                assert_eq!(reply.status, 400);
                reply.body
            }
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn snapshot_and_migration_bodies_are_checked_field_by_field() {
        let dir = snapshot_target(br#"{"destination_url": "file:///var/snap"}"#).unwrap();
        assert_eq!(dir, std::path::PathBuf::from("/var/snap"));
        assert!(
            refused(snapshot_target(br#"{"destination_url": "file://rel/dir"}"#))
                .contains("absolute")
        );
        assert!(
            refused(snapshot_target(br#"{"destination_url": "http://x/"}"#)).contains("file://")
        );
        assert!(refused(snapshot_target(br#"{"destination_url": 7}"#)).contains("destination_url"));
        assert!(refused(snapshot_target(
            br#"{"destination_url": "file:///a", "x": 1}"#
        ))
        .contains("unknown field"));
        assert!(refused(snapshot_target(b"[]")).contains("object"));
        assert!(refused(snapshot_target(b"{")).contains("not JSON"));

        let o = migration_target(br#"{"destination_url": "tcp:127.0.0.1:9", "downtime_ms": 50, "timeout_strategy": "ignore"}"#).unwrap();
        assert_eq!(o.downtime, Duration::from_millis(50));
        assert!(o.force_on_timeout && !o.local);
        assert!(
            refused(migration_target(br#"{"destination_url": "ftp:x"}"#))
                .contains("unix:PATH or tcp:IP:PORT")
        );
        assert!(refused(migration_target(
            br#"{"destination_url": "unix:/s", "downtime_ms": 0}"#
        ))
        .contains("downtime_ms"));
        assert!(refused(migration_target(
            br#"{"destination_url": "unix:/s", "timeout_s": 100000}"#
        ))
        .contains("timeout_s"));
        assert!(refused(migration_target(
            br#"{"destination_url": "unix:/s", "timeout_strategy": "maybe"}"#
        ))
        .contains("neither"));
        assert!(refused(migration_target(
            br#"{"destination_url": "unix:/s", "downtime_ms": -1}"#
        ))
        .contains("downtime_ms"));

        assert!(matches!(
            bring_target(
                Endpoint::Restore,
                br#"{"source_url": "file:///s", "paused": true}"#
            ),
            Ok(Bring::Restore { paused: true, .. })
        ));
        assert!(matches!(
            bring_target(
                Endpoint::ReceiveMigration,
                br#"{"receiver_url": "unix:/m.sock"}"#
            ),
            Ok(Bring::Receive { paused: false, .. })
        ));
        assert!(refused(bring_target(
            Endpoint::Restore,
            br#"{"receiver_url": "unix:/m"}"#
        ))
        .contains("unknown field"));
        assert!(refused(bring_target(
            Endpoint::ReceiveMigration,
            br#"{"receiver_url": "file:///x"}"#
        ))
        .contains("unix:PATH"));
    }
}
