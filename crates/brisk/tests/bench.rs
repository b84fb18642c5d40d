//! Smoke test of `brisk bench`: it runs and writes well-formed JSON. No
//! timing is asserted (timings belong in the benchmark's own output).

mod common;

use common::require_kvm;

use std::process::Command;

#[test]
fn bench_quick_runs_and_writes_well_formed_json() {
    require_kvm!();
    let dir = std::env::temp_dir().join(format!("brisk-bench-{}", std::process::id()));
    let json = dir.join("bench.json");
    let plots = dir.join("plots");
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_brisk"))
        .args(["bench", "all", "--quick", "--json"])
        .arg(&json)
        .arg("--plot")
        .arg(&plots)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let tables = report["tables"].as_array().unwrap();
    let titles: Vec<&str> = tables
        .iter()
        .map(|t| t["title"].as_str().unwrap())
        .collect();
    for prefix in [
        "exit:",
        "kick:",
        "pause:",
        "api:",
        "blk:",
        "vsock:",
        "snapshot:",
        "migration:",
        "mn:",
    ] {
        assert!(
            titles.iter().any(|t| t.starts_with(prefix)),
            "no {prefix} table"
        );
    }
    // The network tables need a TAP (root): present exactly when one can
    // be made here.
    let net = titles.iter().any(|t| t.starts_with("net:"));
    assert_eq!(
        net,
        brisk_test_kernels::host_net::tap_unavailable().is_none(),
        "{titles:?}"
    );
    for t in tables {
        let rows = t["rows"].as_array().unwrap();
        assert!(!rows.is_empty());
        assert_eq!(
            rows[0]["ratio"].as_f64(),
            Some(1.0),
            "the baseline row's ratio"
        );
        assert_eq!(t["baseline"], rows[0]["name"]);
        for r in rows {
            assert!(r["samples"].as_u64().unwrap() > 0, "{r}");
            let (min, med, p99) = (
                r["min_ns"].as_u64(),
                r["median_ns"].as_u64(),
                r["p99_ns"].as_u64(),
            );
            assert!(min <= med && med <= p99, "{r}");
            assert!(
                stdout.contains(r["name"].as_str().unwrap()),
                "table printed"
            );
        }
    }
    // The stop-on-parked row reports brisk sends no signal.
    let parked = tables
        .iter()
        .find(|t| t["title"].as_str().unwrap().contains("already parked"))
        .unwrap();
    assert_eq!(
        parked["rows"][0]["extra"][0],
        serde_json::json!(["signals/stop", 0.0])
    );
    assert_eq!(
        std::fs::read_dir(&plots).unwrap().count(),
        tables.len(),
        "one SVG per table"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
