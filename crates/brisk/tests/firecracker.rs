//! `brisk firecracker`: Firecracker's command line, config file and API,
//! against the real binary (default seccomp filters on): every endpoint's
//! success and error answers, in Firecracker's shape; a microVM
//! configured, started, paused, snapshotted, resumed and stopped through
//! the API alone; the snapshot loaded by a second brisk; a boot from
//! `--config-file --no-api`; refused flags named; Linux booted through
//! the API.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use brisk_test_kernels as k;
use common::harness::{request, until, BOUND};
use common::require_kvm;

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("brisk-fc-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One call: (status, body).
fn call(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    request(sock, &raw)
}

fn fault(sock: &Path, method: &str, path: &str, body: &str, says: &str) {
    let (status, text) = call(sock, method, path, body);
    assert_eq!(status, 400, "{method} {path}: {text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let msg = v["fault_message"]
        .as_str()
        .unwrap_or_else(|| panic!("{text}"));
    assert!(msg.contains(says), "{method} {path}: {msg}");
}

fn ok(sock: &Path, method: &str, path: &str, body: &str) {
    let (status, text) = call(sock, method, path, body);
    assert_eq!(status, 204, "{method} {path} {body}: {text}");
}

fn state(sock: &Path) -> String {
    let (status, text) = call(sock, "GET", "/", "");
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["app_name"], "brisk");
    v["state"].as_str().unwrap().to_string()
}

/// `brisk firecracker --api-sock DIR/fc.sock EXTRA`, once its socket is up.
fn spawn(d: &Path, extra: &[&str]) -> (Child, PathBuf) {
    let sock = d.join("fc.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_brisk"))
        .args(["firecracker", "--api-sock"])
        .arg(&sock)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    until("the API socket", || sock.exists());
    (child, sock)
}

fn wait(child: &mut Child) -> Option<i32> {
    let end = std::time::Instant::now() + BOUND;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        assert!(std::time::Instant::now() < end, "brisk did not exit");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn the_pre_boot_calls_answer_as_firecracker_does() {
    let d = dir("pre");
    let (mut child, sock) = spawn(&d, &["--id", "vm-7"]);
    let (status, text) = call(&sock, "GET", "/", "");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["id"], "vm-7");
    assert_eq!(v["state"], "Not started");
    let (status, text) = call(&sock, "GET", "/version", "");
    assert_eq!(status, 200);
    assert!(text.contains("firecracker_version"), "{text}");
    // Firecracker's defaults, then what was put, then a patch.
    let (_, text) = call(&sock, "GET", "/machine-config", "");
    assert!(
        text.contains(r#""vcpu_count":1"#) && text.contains(r#""mem_size_mib":128"#),
        "{text}"
    );
    ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
    );
    ok(
        &sock,
        "PATCH",
        "/machine-config",
        r#"{"mem_size_mib": 512}"#,
    );
    let (_, text) = call(&sock, "GET", "/machine-config", "");
    assert!(
        text.contains(r#""vcpu_count":2"#) && text.contains(r#""mem_size_mib":512"#),
        "{text}"
    );
    fault(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 0, "mem_size_mib": 256}"#,
        "vcpu_count 0",
    );
    fault(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": true}"#,
        "smt",
    );
    fault(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2"}"#,
        "cpu_template T2",
    );
    fault(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpus": 1}"#,
        "does not parse",
    );
    fault(
        &sock,
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": ""}"#,
        "empty",
    );
    ok(
        &sock,
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#,
    );
    // Drives and interfaces: ids, one root, what brisk cannot serve.
    ok(
        &sock,
        "PUT",
        "/drives/root",
        r#"{"drive_id": "root", "is_root_device": true, "path_on_host": "/r.img"}"#,
    );
    fault(
        &sock,
        "PUT",
        "/drives/a",
        r#"{"drive_id": "b", "is_root_device": false, "path_on_host": "/x"}"#,
        "differ",
    );
    fault(
        &sock,
        "PUT",
        "/drives/two",
        r#"{"drive_id": "two", "is_root_device": true, "path_on_host": "/x"}"#,
        "root device is already",
    );
    fault(
        &sock,
        "PUT",
        "/drives/v",
        r#"{"drive_id": "v", "is_root_device": false, "socket": "/s"}"#,
        "vhost-user",
    );
    fault(
        &sock,
        "PUT",
        "/drives/n",
        r#"{"drive_id": "n", "is_root_device": false}"#,
        "needs path_on_host",
    );
    ok(
        &sock,
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "tap7", "guest_mac": "06:00:ac:10:00:02"}"#,
    );
    fault(
        &sock,
        "PUT",
        "/network-interfaces/eth1",
        r#"{"iface_id": "eth1", "host_dev_name": "tap8", "mtu": 9000}"#,
        "mtu",
    );
    fault(
        &sock,
        "PUT",
        "/network-interfaces/eth1",
        r#"{"iface_id": "eth1", "host_dev_name": "tap7"}"#,
        "another interface",
    );
    let (_, text) = call(&sock, "GET", "/vm/config", "");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["drives"][0]["path_on_host"], "/r.img", "{text}");
    assert_eq!(
        v["network-interfaces"][0]["host_dev_name"], "tap7",
        "{text}"
    );
    assert_eq!(v["boot-source"]["boot_args"], "console=ttyS0", "{text}");
    ok(
        &sock,
        "PUT",
        "/vsock",
        r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#,
    );
    fault(
        &sock,
        "PUT",
        "/vsock",
        r#"{"guest_cid": 2, "uds_path": "/tmp/v.sock"}"#,
        "guest_cid 2",
    );
    ok(&sock, "PUT", "/logger", r#"{"level": "Warning"}"#);
    fault(&sock, "PUT", "/logger", r#"{"level": "Loud"}"#, "Loud");
    ok(&sock, "PUT", "/metrics", r#"{"metrics_path": "/tmp/m"}"#);
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "FlushMetrics"}"#,
    );
    // What brisk does not have, named; what comes only after a start.
    for (method, path, says) in [
        ("PUT", "/balloon", "balloon"),
        ("GET", "/balloon/statistics", "balloon"),
        ("PUT", "/mmds", "MMDS"),
        ("PUT", "/entropy", "entropy"),
        ("PUT", "/pmem/p0", "pmem"),
        ("PUT", "/cpu-config", "CPU"),
        ("PUT", "/nothing", "Invalid request method and/or path"),
        (
            "DELETE",
            "/drives/root",
            "Invalid request method and/or path",
        ),
    ] {
        fault(&sock, method, path, "{}", says);
    }
    fault(
        &sock,
        "PATCH",
        "/vm",
        r#"{"state": "Paused"}"#,
        "before starting",
    );
    fault(
        &sock,
        "PUT",
        "/snapshot/create",
        r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#,
        "before starting",
    );
    fault(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
        "before starting",
    );
    fault(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "Reboot"}"#,
        "not one of",
    );
    // brisk's own API answers on the same socket.
    let (status, _) = call(&sock, "GET", "/api/v1/vmm.ping", "");
    assert_eq!(status, 200);
    // InstanceStart of a kernel that is not there: refused, brisk waits on.
    fault(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        "/k",
    );
    assert_eq!(state(&sock), "Not started");
    ok(&sock, "PUT", "/api/v1/vm.shutdown", "");
    assert_eq!(wait(&mut child), Some(0));
    assert!(!sock.exists(), "the socket is removed");
    std::fs::remove_dir_all(&d).unwrap();
}

/// The UART test kernel waits for input for ever: a microVM to pause,
/// snapshot, resume and stop through Firecracker's API; its snapshot
/// loaded by a second brisk.
#[test]
fn a_microvm_is_started_paused_snapshotted_and_loaded_through_the_api() {
    require_kvm!();
    let d = dir("life");
    let (mut child, sock) = spawn(&d, &[]);
    ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 64}"#,
    );
    let boot = serde_json::json!({ "kernel_image_path": k::UARTIRQ }).to_string();
    ok(&sock, "PUT", "/boot-source", &boot);
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    assert_eq!(state(&sock), "Running");
    fault(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        "after starting",
    );
    fault(&sock, "PUT", "/boot-source", &boot, "after starting");
    fault(
        &sock,
        "PUT",
        "/snapshot/create",
        r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#,
        "must be paused",
    );
    ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(state(&sock), "Paused");
    fault(
        &sock,
        "PUT",
        "/snapshot/create",
        r#"{"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": "Diff"}"#,
        "diff",
    );
    let snap = d.join("snap");
    let create =
        serde_json::json!({ "snapshot_path": snap, "mem_file_path": d.join("mem") }).to_string();
    ok(&sock, "PUT", "/snapshot/create", &create);
    assert!(snap.join("state").is_file(), "the snapshot is written");
    ok(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(state(&sock), "Running");
    fault(&sock, "PATCH", "/vm", r#"{"state": "Asleep"}"#, "Asleep");
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    assert_eq!(wait(&mut child), Some(0));

    // A second brisk loads it, resumed.
    let d2 = dir("load");
    let (mut child, sock) = spawn(&d2, &[]);
    fault(
        &sock,
        "PUT",
        "/snapshot/load",
        r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}}"#,
        "UFFD",
    );
    let load = serde_json::json!({ "snapshot_path": snap, "mem_file_path": d.join("mem"), "resume_vm": true }).to_string();
    ok(&sock, "PUT", "/snapshot/load", &load);
    assert_eq!(state(&sock), "Running");
    fault(&sock, "PUT", "/snapshot/load", &load, "after starting");
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    assert_eq!(wait(&mut child), Some(0));
    std::fs::remove_dir_all(&d).unwrap();
    std::fs::remove_dir_all(&d2).unwrap();
}

#[test]
fn a_config_file_boots_at_once_and_bad_ones_are_named() {
    require_kvm!();
    let d = dir("file");
    let file = d.join("vm.json");
    let config = serde_json::json!({
        "boot-source": { "kernel_image_path": k::HELLO, "boot_args": "status=0" },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 64 },
        "drives": [],
        "network-interfaces": []
    });
    std::fs::write(&file, config.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_brisk"))
        .args(["firecracker", "--no-api", "--config-file"])
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // hello exits with 0 through debug-exit: brisk's status 1.
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("hello: exiting with 0"), "{stdout}");
    // The same file through `brisk run`.
    let out = Command::new(env!("CARGO_BIN_EXE_brisk"))
        .args(["run", "--config-file"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    for (bad, says) in [
        ("{", "is not a Firecracker configuration"),
        (r#"{"machine-config": {"vcpu_count": 1}}"#, "mem_size_mib"),
        (r#"{"balloon": {"amount_mib": 8}}"#, "balloon"),
        (
            r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}"#,
            "PUT /boot-source",
        ),
    ] {
        std::fs::write(&file, bad).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_brisk"))
            .args(["firecracker", "--no-api", "--config-file"])
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(6), "{bad}: {err}");
        assert!(err.contains(says), "{bad}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{bad}: {err}");
    }
    // Not a regular file, or too big: named, nothing read or waited on.
    let fifo = d.join("fifo.json");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    let big = d.join("big.json");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let mut cases = vec![(big, "over 1048576 bytes"), (d.clone(), "a directory")];
    if made.is_ok_and(|s| s.success()) {
        cases.push((fifo, "not a regular file"));
    }
    for (path, says) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_brisk"))
            .args(["firecracker", "--no-api", "--config-file"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(6), "{says}: {err}");
        assert!(err.contains(says), "{says}: {err}");
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn flags_brisk_cannot_honour_are_refused_by_name() {
    for (args, says) in [
        (
            &["--seccomp-filter", "/f"][..],
            "--seccomp-filter is not supported",
        ),
        (
            &["--mmds-size-limit", "10"][..],
            "--mmds-size-limit is not supported",
        ),
        (&["--no-api"][..], "--config-file"),
        (&["--frobnicate"][..], "--frobnicate"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_brisk"))
            .arg("firecracker")
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// Linux, configured and started through Firecracker's API alone, paused
/// and resumed with `PATCH /vm`, stopped with SendCtrlAltDel.
#[test]
fn linux_boots_through_firecrackers_api() {
    require_kvm!();
    let linux = k::guest_linux().expect("scripts/guest-kernel.sh builds the guest kernel");
    let d = dir("linux");
    let sock = d.join("fc.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_brisk"))
        .args(["firecracker", "--api-sock"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = out.clone();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let mut o = sink.lock().unwrap();
            o.push_str(&l);
            o.push('\n');
        }
    });
    until("the API socket", || sock.exists());
    ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 256}"#,
    );
    let boot = serde_json::json!({
        "kernel_image_path": linux.bzimage,
        "initrd_path": linux.initramfs,
        "boot_args": k::linux_cmdline("rdinit=/idle"),
    })
    .to_string();
    ok(&sock, "PUT", "/boot-source", &boot);
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    let boot_bound = std::time::Instant::now() + std::time::Duration::from_secs(600);
    while !out.lock().unwrap().contains("Run /idle as init process") {
        assert!(
            std::time::Instant::now() < boot_bound,
            "{}",
            out.lock().unwrap()
        );
        assert_eq!(child.try_wait().unwrap(), None, "{}", out.lock().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(state(&sock), "Paused");
    ok(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(state(&sock), "Running");
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    assert_eq!(wait(&mut child), Some(0));
    std::fs::remove_dir_all(&d).unwrap();
}
