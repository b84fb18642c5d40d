//! `brisk ctl`: one API request, printed for a person (or raw with --json).

use std::path::Path;

use brisk_api::client::request;
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
}

pub fn run(socket: &Path, json: bool, op: Op) -> i32 {
    let (kick_body, snapshot_body);
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
            let dir = match std::path::absolute(dir) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("brisk: {}: {e}", dir.display());
                    return status::CONFIG;
                }
            };
            let Some(dir) = dir.to_str() else {
                eprintln!("brisk: {}: the API takes UTF-8 paths only", dir.display());
                return status::CONFIG;
            };
            snapshot_body =
                serde_json::json!({ "destination_url": format!("file://{dir}") }).to_string();
            (
                "PUT",
                "/api/v1/vm.snapshot",
                Some(snapshot_body.as_str()),
                "",
            )
        }
    };
    let reply = match request(socket, method, path, body, None) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("brisk: cannot reach the API at {}: {e}", socket.display());
            return status::API_UNREACHABLE;
        }
    };
    if !(200..300).contains(&reply.status) {
        let msg = serde_json::from_str::<Value>(&reply.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(String::from))
            .unwrap_or(reply.body.clone());
        eprintln!("brisk: API error {}: {msg}", reply.status);
        return status::API_ERROR;
    }
    if json || reply.body.is_empty() {
        println!(
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
        Ok(v) => println!("{}", human(&op, &v)),
        Err(_) => println!("{}", reply.body),
    }
    status::OK
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
        Op::Snapshot(_) => format!(
            "snapshot in {}: {} MiB of RAM ({:.1} MiB written), paused {:.1} ms, {:.1} ms in all",
            v["destination_url"]
                .as_str()
                .unwrap_or("?")
                .trim_start_matches("file://"),
            v["memory_bytes"].as_u64().unwrap_or(0) >> 20,
            v["memory_written_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
            v["pause_ms"].as_f64().unwrap_or(0.0),
            v["total_ms"].as_f64().unwrap_or(0.0)
        ),
        _ => v.to_string(),
    }
}
