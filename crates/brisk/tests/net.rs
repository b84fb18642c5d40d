//! `brisk run --net`, the real binary under its default seccomp filters
//! (the I/O thread's included): a guest's frames reach the TAP, a guest
//! flooding its queue with bad chains cannot flood brisk's log or hold a
//! vCPU, and a TAP that is missing or not a TAP is one sentence.

mod common;

use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brisk_test_kernels::host_net::{HostTap, PacketSocket};
use brisk_test_kernels::{self as k, require_tap};
use common::harness::{ctl, scratch, spawn_brisk, until};
use common::require_kvm;

/// Hang protection only.
const BOUND: Duration = Duration::from_secs(120);

/// Collect a child's stderr lines as they come.
fn collect(child: &mut std::process::Child) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let sink = lines.clone();
    std::thread::spawn(move || {
        for l in stderr.lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    lines
}

#[test]
fn a_guest_flooding_bad_chains_floods_neither_the_log_nor_a_vcpu() {
    require_kvm!();
    require_tap!();
    let tap = HostTap::create("log", None).unwrap();
    let sock = PacketSocket::bind(tap.ifindex()).unwrap();
    let api = scratch("net-flood.sock");
    let mut child = spawn_brisk(&[
        "run",
        "--kernel",
        k::VIRTIONET,
        "--cmdline",
        "flood",
        "--net",
        &format!("tap={}", tap.name),
        "--api-socket",
        api.to_str().unwrap(),
        "--timeout",
        "300s",
    ]);
    let log = collect(&mut child);
    // 5000 good frames on the wire: three times as many bad chains were
    // served, each one a warning brisk could have logged.
    let mut buf = vec![0u8; 2048];
    let mut good = 0;
    while good < 5000 {
        let n = sock.recv_from_guest(&mut buf, BOUND).unwrap();
        let n = n.unwrap_or_else(|| panic!("the flood stopped: {:?}", log.lock().unwrap()));
        if n == 60 && u16::from_be_bytes([buf[12], buf[13]]) == k::VIRTIONET_ETHERTYPE {
            good += 1;
        }
    }
    until("the API socket", || api.exists());
    for _ in 0..3 {
        let out = ctl(&api, &["pause"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = ctl(&api, &["resume"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = ctl(&api, &["shutdown"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = child.wait().unwrap();
    let lines = log.lock().unwrap().clone();
    assert_eq!(status.code(), Some(0), "{lines:#?}");
    let warnings = lines.iter().filter(|l| l.contains("virtio-net")).count();
    // Per kind of warning, 8, then one per power of two: 15 000 bad
    // chains make at most a few dozen lines.
    assert!(
        (1..=8 + 40).contains(&warnings),
        "{warnings} virtio-net lines for a flood:\n{lines:#?}"
    );
    assert!(!lines.iter().any(|l| l.contains("seccomp")), "{lines:#?}");
}

#[test]
fn a_tap_that_is_missing_or_not_a_tap_is_one_sentence() {
    require_kvm!();
    for (tap, says) in [
        ("bk-absent1", "there is no network interface bk-absent1"),
        ("lo", "network interface lo is not a TAP device"),
        ("much-too-long-name", "is not a network interface name"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_brisk"))
            .args(["run", "--kernel", k::VIRTIONET, "--net"])
            .arg(format!("tap={tap}"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // 6: a configuration this host cannot build.
        assert_eq!(out.status.code(), Some(6), "{tap}: {err}");
        assert!(err.contains(says), "{tap}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{tap}: {err}");
    }
    for (arg, says) in [
        ("tap=x,mac=01:00:00:00:00:01", "multicast"),
        ("mac=06:00:00:00:00:01", "needs tap=NAME"),
        ("tap=x,speed=10", "not a NIC option"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_brisk"))
            .args(["run", "--kernel", k::VIRTIONET, "--net", arg])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // 2: the command line does not parse.
        assert_eq!(out.status.code(), Some(2), "{arg}: {err}");
        assert!(err.contains(says), "{arg}: {err}");
    }
}
