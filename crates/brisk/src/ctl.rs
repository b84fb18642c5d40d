//! `brisk ctl`: one API request, printed for a person (or raw with --json).

use std::path::Path;

use brisk_api::client::{request, request_within};
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
    Snapshot(std::path::PathBuf),
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

pub fn run(socket: &Path, json: bool, op: Op) -> i32 {
    let (kick_body, snapshot_body, migration_body, bring_body);
    let (method, path, body, done) = match &op {
        Op::Info => ("GET", "/api/v1/vm.info", None, ""),
        Op::Pause => ("PUT", "/api/v1/vm.pause", None, "paused"),
        Op::Resume => ("PUT", "/api/v1/vm.resume", None, "resumed"),
        Op::Shutdown => ("PUT", "/api/v1/vm.shutdown", None, "shutting down"),
        Op::Counters => ("GET", "/api/v1/vm.counters", None, ""),
        Op::Kick(id) => {
            kick_body = format!("{{\"id\":{id}}}");
            (
                "PUT",
                "/api/v1/vcpu.kick",
                Some(kick_body.as_str()),
                "kicked",
            )
        }
        Op::Ping => ("GET", "/api/v1/vmm.ping", None, ""),
        Op::Snapshot(dir) => {
            let url = match file_url(dir) {
                Ok(u) => u,
                Err(code) => return code,
            };
            snapshot_body = serde_json::json!({ "destination_url": url }).to_string();
            (
                "PUT",
                "/api/v1/vm.snapshot",
                Some(snapshot_body.as_str()),
                "",
            )
        }
        Op::SendMigration {
            url,
            downtime_ms,
            timeout_s,
            force,
            local,
        } => {
            migration_body = serde_json::json!({
                "destination_url": url,
                "downtime_ms": downtime_ms,
                "timeout_s": timeout_s,
                "timeout_strategy": if *force { "ignore" } else { "cancel" },
                "local": local,
            })
            .to_string();
            (
                "PUT",
                "/api/v1/vm.send-migration",
                Some(migration_body.as_str()),
                "",
            )
        }
        Op::CancelMigration => ("PUT", "/api/v1/vm.cancel-migration", None, "cancelling"),
        Op::Restore(dir, paused) => {
            let url = match file_url(dir) {
                Ok(u) => u,
                Err(code) => return code,
            };
            bring_body = serde_json::json!({ "source_url": url, "paused": paused }).to_string();
            (
                "PUT",
                "/api/v1/vm.restore",
                Some(bring_body.as_str()),
                "restored",
            )
        }
        Op::ReceiveMigration(url, paused) => {
            bring_body = serde_json::json!({ "receiver_url": url, "paused": paused }).to_string();
            (
                "PUT",
                "/api/v1/vm.receive-migration",
                Some(bring_body.as_str()),
                "received: the VM runs here",
            )
        }
        Op::Migration => ("GET", "/api/v1/vm.migration", None, ""),
    };
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
        Op::Snapshot(_) | Op::Restore(..) => std::time::Duration::from_secs(600),
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
        let msg = serde_json::from_str::<Value>(&reply.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(String::from))
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
    match serde_json::from_str::<Value>(&reply.body) {
        Ok(v) => out!("{}", human(&op, &v)),
        Err(_) => out!("{}", reply.body),
    }
    status::OK
}

/// Print the outgoing migration's progress on stderr, a line per change,
/// until `done` is set.
fn follow_migration(socket: &Path, done: &std::sync::atomic::AtomicBool) {
    use std::sync::atomic::Ordering::SeqCst;
    let mut last = String::new();
    while !done.load(SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let Ok(reply) = request(socket, "GET", "/api/v1/vm.migration", None, None) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(&reply.body) else {
            continue;
        };
        if reply.status != 200 || done.load(SeqCst) {
            continue;
        }
        let line = format!(
            "migration {}: pass {}, {:.1} MiB sent at {:.1} MiB/s, {} dirty pages left, estimated downtime {:.1} ms",
            v["phase"].as_str().unwrap_or("?"),
            v["iteration"],
            v["bytes_sent"].as_f64().unwrap_or(0.0) / 1048576.0,
            v["rate_bytes_per_s"].as_f64().unwrap_or(0.0) / 1048576.0,
            v["dirty_pages"],
            v["estimated_downtime_ms"].as_f64().unwrap_or(0.0)
        );
        if line != last {
            say!("{line}");
            last = line;
        }
    }
}

fn human(op: &Op, v: &Value) -> String {
    match op {
        Op::Ping => format!(
            "{} {}",
            v["name"].as_str().unwrap_or("?"),
            v["version"].as_str().unwrap_or("?")
        ),
        Op::Info => {
            let mut s = format!(
                "state:   {}\nguest:   {} ({} vCPUs, {} MiB, {} irqchip)\nuptime:  {:.1} s",
                v["state"].as_str().unwrap_or("?"),
                v["guest"].as_str().unwrap_or("?"),
                v["vcpus"].as_array().map_or(0, |a| a.len()),
                v["memory_bytes"].as_u64().unwrap_or(0) >> 20,
                v["irqchip"].as_str().unwrap_or("?"),
                v["uptime_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
            );
            for c in v["vcpus"].as_array().into_iter().flatten() {
                s.push_str(&format!(
                    "\nvCPU {}: {} ({})",
                    c["id"],
                    c["mode"].as_str().unwrap_or("?"),
                    c["state"].as_str().unwrap_or("?")
                ));
            }
            s
        }
        Op::Counters => {
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
        Op::SendMigration { .. } => format!(
            "migrated to {}: downtime {:.1} ms, {:.1} ms in all, {:.1} MiB sent in {} passes",
            v["destination_url"].as_str().unwrap_or("?"),
            v["downtime_ms"].as_f64().unwrap_or(0.0),
            v["total_ms"].as_f64().unwrap_or(0.0),
            v["bytes_sent"].as_f64().unwrap_or(0.0) / 1048576.0,
            v["iteration"].as_u64().unwrap_or(0) + 1
        ),
        Op::Migration => format!(
            "{}: {} pass(es), {:.1} MiB sent, {} dirty pages, downtime {}",
            v["phase"].as_str().unwrap_or("?"),
            v["iteration"].as_u64().unwrap_or(0) + 1,
            v["bytes_sent"].as_f64().unwrap_or(0.0) / 1048576.0,
            v["dirty_pages"],
            v["downtime_ms"]
                .as_f64()
                .map_or("-".to_string(), |d| format!("{d:.1} ms"))
        ),
        Op::Snapshot(_) => format!(
            "snapshot in {}: {} MiB of RAM ({} written), paused in {:.1} ms, guest stopped {:.1} ms, {:.1} ms in all",
            v["destination_url"]
                .as_str()
                .unwrap_or("?")
                .trim_start_matches("file://"),
            v["memory_bytes"].as_u64().unwrap_or(0) >> 20,
            bytes(v["memory_written_bytes"].as_u64().unwrap_or(0)),
            v["pause_ms"].as_f64().unwrap_or(0.0),
            v["stopped_ms"].as_f64().unwrap_or(0.0),
            v["total_ms"].as_f64().unwrap_or(0.0)
        ),
        _ => v.to_string(),
    }
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
