//! `brisk ctl`: one API request, printed for a person (or raw with --json).

use std::path::Path;

use brisk_api::client::{request, request_within};
use brisk_api::model::{self, Endpoint};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::status;

pub enum Op {
    Info,
    Pause,
    Resume,
    Shutdown,
    Counters,
    Kick(usize),
    Ping,
    Snapshot {
        dir: std::path::PathBuf,
        live: bool,
        max_stop_ms: Option<u64>,
        diff: bool,
    },
    SendMigration {
        url: String,
        downtime_ms: u64,
        timeout_s: u64,
        force: bool,
        local: bool,
    },
    CancelMigration,
    Migration,
    Restore(std::path::PathBuf, bool),
    ReceiveMigration(String, bool),
}

impl Op {
    /// The endpoint, its body, and what to print when the reply has none.
    fn request(&self) -> Result<(Endpoint, Option<String>, &'static str), i32> {
        Ok(match self {
            Op::Info => (Endpoint::Info, None, ""),
            Op::Pause => (Endpoint::Pause, None, "paused"),
            Op::Resume => (Endpoint::Resume, None, "resumed"),
            Op::Shutdown => (Endpoint::Shutdown, None, "shutting down"),
            Op::Counters => (Endpoint::Counters, None, ""),
            Op::Kick(id) => {
                let kick = model::Kick { id: *id as u64 };
                (Endpoint::Kick, body(&kick), "kicked")
            }
            Op::Ping => (Endpoint::Ping, None, ""),
            Op::Snapshot {
                dir,
                live,
                max_stop_ms,
                diff,
            } => {
                let r = model::SnapshotRequest {
                    destination_url: file_url(dir)?,
                    live: *live,
                    max_stop_ms: *max_stop_ms,
                    diff: *diff,
                };
                (Endpoint::Snapshot, body(&r), "")
            }
            Op::SendMigration {
                url,
                downtime_ms,
                timeout_s,
                force,
                local,
            } => {
                let r = model::SendMigration {
                    destination_url: url.clone(),
                    downtime_ms: Some(*downtime_ms),
                    timeout_s: Some(*timeout_s),
                    local: *local,
                    timeout_strategy: Some(if *force { "ignore" } else { "cancel" }.into()),
                };
                (Endpoint::SendMigration, body(&r), "")
            }
            Op::CancelMigration => (Endpoint::CancelMigration, None, "cancelling"),
            Op::Restore(dir, paused) => {
                let r = model::Restore {
                    source_url: file_url(dir)?,
                    paused: *paused,
                };
                (Endpoint::Restore, body(&r), "restored")
            }
            Op::ReceiveMigration(url, paused) => {
                let r = model::ReceiveMigration {
                    receiver_url: url.clone(),
                    paused: *paused,
                };
                let done = "received: the VM runs here";
                (Endpoint::ReceiveMigration, body(&r), done)
            }
            Op::Migration => (Endpoint::Migration, None, ""),
        })
    }
}

/// A request body of a model type, as JSON.
fn body<T: serde::Serialize>(v: &T) -> Option<String> {
    serde_json::to_string(v).ok()
}

pub fn run(socket: &Path, json: bool, op: Op) -> i32 {
    let (endpoint, body, done) = match op.request() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let (method, path, body) = (endpoint.method(), endpoint.path(), body.as_deref());
    // A migration's reply comes when it has ended; meanwhile a second
    // connection follows its progress.
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let follower = matches!(op, Op::SendMigration { .. }).then(|| {
        let (socket, done) = (socket.to_path_buf(), finished.clone());
        std::thread::spawn(move || follow_migration(&socket, &done))
    });
    let bound = match &op {
        Op::SendMigration { timeout_s, .. } => {
            std::time::Duration::from_secs(timeout_s.saturating_add(120))
        }
        Op::Snapshot { .. } | Op::Restore(..) => std::time::Duration::from_secs(600),
        // It waits for the source, however long that takes.
        Op::ReceiveMigration(..) => std::time::Duration::from_secs(7 * 24 * 3600),
        _ => brisk_api::client::REPLY_BOUND,
    };
    let reply = request_within(socket, method, path, body, None, bound);
    finished.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Some(f) = follower {
        let _ = f.join();
    }
    let reply = match reply {
        Ok(r) => r,
        Err(e) => {
            say!("brisk: cannot reach the API at {}: {e}", socket.display());
            return status::API_UNREACHABLE;
        }
    };
    if !(200..300).contains(&reply.status) {
        let msg = serde_json::from_str::<model::ErrorBody>(&reply.body)
            .map(|e| e.error)
            .unwrap_or(reply.body.clone());
        say!("brisk: API error {}: {msg}", reply.status);
        return status::API_ERROR;
    }
    if json || reply.body.is_empty() {
        out!(
            "{}",
            if reply.body.is_empty() {
                done
            } else {
                &reply.body
            }
        );
        return status::OK;
    }
    out!("{}", human(&op, &reply.body).unwrap_or(reply.body.clone()));
    status::OK
}

/// Print the outgoing migration's progress on stderr, a line per change,
/// until `done` is set.
fn follow_migration(socket: &Path, done: &std::sync::atomic::AtomicBool) {
    use std::sync::atomic::Ordering::SeqCst;
    let mut last = String::new();
    while !done.load(SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let e = Endpoint::Migration;
        let Ok(reply) = request(socket, e.method(), e.path(), None, None) else {
            continue;
        };
        let Ok(m) = serde_json::from_str::<model::Migration>(&reply.body) else {
            continue;
        };
        if reply.status != 200 || done.load(SeqCst) {
            continue;
        }
        let line = format!(
            "migration {}: pass {}, {:.1} MiB sent at {:.1} MiB/s, {} dirty pages left, estimated downtime {:.1} ms",
            m.phase,
            m.iteration,
            m.bytes_sent as f64 / 1048576.0,
            m.rate_bytes_per_s as f64 / 1048576.0,
            m.dirty_pages,
            m.estimated_downtime_ms
        );
        if line != last {
            say!("{line}");
            last = line;
        }
    }
}

/// `body` read as `T`.
fn parse<T: DeserializeOwned>(body: &str) -> Option<T> {
    serde_json::from_str(body).ok()
}

/// The reply for a person, where brisk knows its shape.
fn human(op: &Op, body: &str) -> Option<String> {
    Some(match op {
        Op::Ping => {
            let p: model::Ping = parse(body)?;
            format!("{} {}", p.name, p.version)
        }
        Op::Info => {
            let i: model::VmInfo = parse(body)?;
            let mut s = format!(
                "state:   {}\nguest:   {} ({} vCPUs, {} MiB, {} irqchip)\nuptime:  {:.1} s",
                i.state,
                i.guest,
                i.vcpus.len(),
                i.memory_bytes >> 20,
                i.irqchip,
                i.uptime_ms as f64 / 1000.0
            );
            for c in &i.vcpus {
                s.push_str(&format!("\nvCPU {}: {} ({})", c.id, c.mode, c.state));
            }
            s
        }
        Op::Counters => {
            // The counters' JSON is prometheus.rs's rendering of the
            // vCPUs' statistics (one list of names for both renderings).
            let v: Value = parse(body)?;
            let mut s = format!(
                "{:<5} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}",
                "vCPU",
                "entries",
                "io exits",
                "halts",
                "kicks",
                "signals",
                "elided",
                "run_on",
                "parked ms"
            );
            for c in v["vcpus"].as_array().into_iter().flatten() {
                let n = |k: &str| c[k].as_u64().unwrap_or(0);
                s.push_str(&format!(
                    "\n{:<5} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10.1}",
                    n("id"),
                    n("entries"),
                    c["exits"]["io"].as_u64().unwrap_or(0),
                    c["exits"]["halt"].as_u64().unwrap_or(0),
                    n("kicks"),
                    n("signals_sent"),
                    n("signals_elided"),
                    n("work_run"),
                    n("parked_ns") as f64 / 1e6
                ));
            }
            s.push_str(&format!(
                "\nunclaimed PIO/MMIO accesses: {}",
                v["unclaimed_accesses"]
            ));
            s
        }
        Op::SendMigration { .. } => {
            let m: model::Migration = parse(body)?;
            format!(
                "migrated to {}: downtime {:.1} ms, {:.1} ms in all, {:.1} MiB sent in {} passes",
                m.destination_url,
                m.downtime_ms.unwrap_or(0.0),
                m.total_ms,
                m.bytes_sent as f64 / 1048576.0,
                m.iteration + 1
            )
        }
        Op::Migration => {
            let m: model::Migration = parse(body)?;
            format!(
                "{}: {} pass(es), {:.1} MiB sent, {} dirty pages, downtime {}",
                m.phase,
                m.iteration + 1,
                m.bytes_sent as f64 / 1048576.0,
                m.dirty_pages,
                m.downtime_ms
                    .map_or("-".to_string(), |d| format!("{d:.1} ms"))
            )
        }
        Op::Snapshot { .. } => {
            let r: model::SnapshotReply = parse(body)?;
            format!(
                "snapshot in {}: {} MiB of RAM ({} written), paused in {:.1} ms, guest stopped {:.1} ms, {:.1} ms in all",
                r.destination_url.trim_start_matches("file://"),
                r.memory_bytes >> 20,
                bytes(r.memory_written_bytes),
                r.pause_ms,
                r.stopped_ms,
                r.total_ms
            )
        }
        _ => return None,
    })
}

/// `file://` and the absolute path of `dir`, or the exit status.
fn file_url(dir: &Path) -> Result<String, i32> {
    let abs = std::path::absolute(dir).map_err(|e| {
        say!("brisk: {}: {e}", dir.display());
        status::CONFIG
    })?;
    match abs.to_str() {
        Some(s) => Ok(format!("file://{s}")),
        None => {
            say!("brisk: {}: the API takes UTF-8 paths only", abs.display());
            Err(status::CONFIG)
        }
    }
}

/// Bytes for a person: KiB under a MiB, else MiB.
fn bytes(n: u64) -> String {
    if n < 1 << 20 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
    }
}
