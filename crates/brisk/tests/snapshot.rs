//! Snapshots and migrations as a user drives them: `brisk ctl snapshot`,
//! `brisk run --restore` in a new process, `brisk run
//! --receive-migration` and `brisk ctl send-migration` between two
//! processes, all with brisk's default seccomp filters on.

mod common;

use common::harness::{ctl, scratch, spawn_until};
use common::{brisk, require_kvm, text};

#[test]
fn snapshot_then_restore_in_a_new_process_paused_or_running() {
    require_kvm!();
    let (dir, sock) = (scratch("snap"), scratch("snap.sock"));
    let sock_s = sock.to_str().unwrap();
    let dir_s = dir.to_str().unwrap();
    let mut vm = spawn_until(
        &[
            "--guest",
            "tick=3000",
            "--api-socket",
            sock_s,
            "--timeout",
            "120s",
        ],
        "running on",
    );
    // Twice into the same directory: the second replaces the first (and
    // removes its memory file) under the API thread's seccomp filter.
    for _ in 0..2 {
        let snap = ctl(&sock, &["snapshot", dir_s]);
        assert_eq!(snap.status.code(), Some(0), "{}", text(&snap.stderr));
    }
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        2,
        "state and one memory file"
    );
    let snap = ctl(&sock, &["snapshot", dir_s]);
    assert_eq!(snap.status.code(), Some(0), "{}", text(&snap.stderr));
    assert!(text(&snap.stdout).starts_with(&format!("snapshot in {dir_s}: 64 MiB of RAM")));
    assert!(text(&ctl(&sock, &["info"]).stdout).contains("state:   running"));
    ctl(&sock, &["shutdown"]);
    assert_eq!(vm.wait().unwrap().code(), Some(0));

    // Restored paused: it waits for the API's resume, then runs the rest
    // of its ticks and powers off.
    let mut restored = spawn_until(
        &[
            "--restore",
            dir_s,
            "--paused",
            "--api-socket",
            sock_s,
            "--timeout",
            "120s",
        ],
        "restored on",
    );
    assert!(text(&ctl(&sock, &["info"]).stdout).contains("state:   paused"));
    assert_eq!(text(&ctl(&sock, &["resume"]).stdout).trim(), "resumed");
    assert_eq!(restored.wait().unwrap().code(), Some(0));
    assert!(!sock.exists());

    // And again, running at once, from the same files.
    let again = brisk(&["run", "--restore", dir_s, "--timeout", "120s"]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn restore_refuses_what_it_cannot_use() {
    require_kvm!();
    let missing = brisk(&["run", "--restore", "/nonexistent/brisk-snapshot"]);
    assert_eq!(missing.status.code(), Some(6));
    assert!(text(&missing.stderr).contains("not a snapshot directory"));
    let dir = scratch("empty-snap");
    std::fs::create_dir_all(&dir).unwrap();
    let empty = brisk(&["run", "--restore", dir.to_str().unwrap()]);
    assert_eq!(empty.status.code(), Some(6));
    assert_eq!(
        text(&empty.stderr).lines().count(),
        1,
        "{}",
        text(&empty.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
    // The snapshot says what the VM is: options that choose it conflict.
    let both = brisk(&["run", "--restore", "/tmp", "--guest", "spin"]);
    assert_eq!(both.status.code(), Some(2));
    let paused = brisk(&["run", "--paused"]);
    assert_eq!(paused.status.code(), Some(2));
    let url = brisk(&["run", "--receive-migration", "file:///tmp/x"]);
    assert_eq!(url.status.code(), Some(2));
    assert!(text(&url.stderr).contains("unix:PATH or tcp:IP:PORT"));
}

/// A live migration between two brisk processes: progress on the
/// controller's stderr, the source exits 0 once the VM moved, the
/// destination runs the guest to its end and exits with its status.
/// Over `tcp:` (loopback) or, by default, `unix:`.
fn migrate_between_processes(name: &str, source_args: &[&str], ctl_args: &[&str], tcp: bool) {
    let (sock, mig) = (
        scratch(&format!("{name}.sock")),
        scratch(&format!("{name}.mig")),
    );
    let url = match tcp {
        true => {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("tcp:{}", l.local_addr().unwrap())
        }
        false => format!("unix:{}", mig.display()),
    };
    let mut dst = spawn_until(
        &["--receive-migration", &url, "--timeout", "120s"],
        "waiting for a migration",
    );
    let mut args = vec!["--api-socket", sock.to_str().unwrap(), "--timeout", "120s"];
    args.extend_from_slice(source_args);
    let mut src = spawn_until(&args, "running on");
    let mut send = vec!["send-migration", url.as_str()];
    send.extend_from_slice(ctl_args);
    let out = ctl(&sock, &send);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with(&format!("migrated to {url}: downtime")),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(src.wait().unwrap().code(), Some(0), "the source exits 0");
    assert_eq!(
        dst.wait().unwrap().code(),
        Some(0),
        "the guest powered off there"
    );
    assert!(!sock.exists() && !mig.exists(), "both sockets removed");
}

#[test]
fn live_migration_between_two_processes() {
    require_kvm!();
    migrate_between_processes("copy", &["--guest", "tick=3000"], &[], false);
}

/// Over TCP, under the default seccomp filters (the non-blocking connect
/// polls).
#[test]
fn live_migration_over_tcp_between_two_processes() {
    require_kvm!();
    migrate_between_processes("tcp", &["--guest", "tick=3000"], &[], true);
}

#[test]
fn local_upgrade_between_two_processes_hands_over_memory() {
    require_kvm!();
    migrate_between_processes(
        "local",
        &["--guest", "tick=3000", "--shared-memory"],
        &["--local"],
        false,
    );
    // Without --shared-memory there is no memfd to hand over.
    let sock = scratch("nolocal.sock");
    let mut src = spawn_until(
        &[
            "--guest",
            "spin",
            "--api-socket",
            sock.to_str().unwrap(),
            "--timeout",
            "60s",
        ],
        "running on",
    );
    let out = ctl(
        &sock,
        &["send-migration", "unix:/tmp/nowhere.sock", "--local"],
    );
    assert_eq!(out.status.code(), Some(16));
    assert!(
        text(&out.stderr).contains("--shared-memory"),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&ctl(&sock, &["info"]).stdout).contains("state:   running"));
    ctl(&sock, &["shutdown"]);
    assert_eq!(src.wait().unwrap().code(), Some(0));
}

/// A brisk started with only its API (--wait-for-vm) takes a VM from
/// `ctl restore`, or from a migration it was told to wait for with `ctl
/// receive-migration`, and runs it to its end.
#[test]
fn an_empty_brisk_takes_a_vm_from_restore_or_receive_migration() {
    require_kvm!();
    let (dir, sock, src_sock, mig) = (
        scratch("empty-snap"),
        scratch("empty.sock"),
        scratch("empty-src.sock"),
        scratch("empty.mig"),
    );
    let tick = || {
        spawn_until(
            &[
                "--guest",
                "tick=2000",
                "--api-socket",
                src_sock.to_str().unwrap(),
                "--timeout",
                "120s",
            ],
            "running on",
        )
    };
    // A snapshot to restore from.
    let mut vm = tick();
    assert_eq!(
        ctl(&src_sock, &["snapshot", dir.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    ctl(&src_sock, &["shutdown"]);
    assert_eq!(vm.wait().unwrap().code(), Some(0));

    let sock_s = sock.to_str().unwrap();
    let mut empty = spawn_until(
        &["--api-socket", sock_s, "--wait-for-vm", "--timeout", "120s"],
        "no VM yet",
    );
    let info = ctl(&sock, &["info"]);
    assert_eq!(info.status.code(), Some(16));
    assert!(
        text(&info.stderr).contains("no VM yet"),
        "{}",
        text(&info.stderr)
    );
    // A failed restore is answered, and the brisk waits on.
    let bad = ctl(&sock, &["restore", "/nonexistent/brisk-snapshot"]);
    assert_eq!(bad.status.code(), Some(16));
    assert!(text(&bad.stderr).contains("not a snapshot directory"));
    let ok = ctl(&sock, &["restore", dir.to_str().unwrap(), "--paused"]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
    assert!(text(&ctl(&sock, &["info"]).stdout).contains("state:   paused"));
    let twice = ctl(&sock, &["restore", dir.to_str().unwrap()]);
    assert!(text(&twice.stderr).contains("already running"));
    ctl(&sock, &["resume"]);
    assert_eq!(
        empty.wait().unwrap().code(),
        Some(0),
        "the restored guest powered off"
    );

    // Now an empty brisk told to wait for a migration.
    let mut empty = spawn_until(
        &["--api-socket", sock_s, "--wait-for-vm", "--timeout", "120s"],
        "no VM yet",
    );
    let url = format!("unix:{}", mig.display());
    let receiver = {
        let (sock, url) = (sock.clone(), url.clone());
        std::thread::spawn(move || ctl(&sock, &["receive-migration", &url]))
    };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !mig.exists() {
        assert!(
            std::time::Instant::now() < until,
            "the receiver never listened"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut src = tick();
    let sent = ctl(&src_sock, &["send-migration", &url]);
    assert_eq!(sent.status.code(), Some(0), "{}", text(&sent.stderr));
    let received = receiver.join().unwrap();
    assert_eq!(
        received.status.code(),
        Some(0),
        "{}",
        text(&received.stderr)
    );
    assert_eq!(src.wait().unwrap().code(), Some(0));
    assert_eq!(empty.wait().unwrap().code(), Some(0));
    assert!(!sock.exists() && !mig.exists() && !src_sock.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Live and diff snapshots as a user takes them, under the API thread's
/// seccomp filter: a live one, then two diffs on it (the VM run with
/// --track-dirty-pages), three memory files; `brisk merge-snapshot`
/// folds them into one, and the result restores and runs.
#[test]
fn live_and_diff_snapshots_then_a_merge_restore_from_the_command_line() {
    require_kvm!();
    let (dir, sock) = (scratch("live-diff"), scratch("live-diff.sock"));
    let (dir_s, sock_s) = (dir.to_str().unwrap(), sock.to_str().unwrap());
    let mut vm = spawn_until(
        &[
            "--guest",
            "dirty=8",
            "--cpus",
            "1",
            "--track-dirty-pages",
            "--api-socket",
            sock_s,
            "--timeout",
            "120s",
        ],
        "running on",
    );
    let live = ctl(&sock, &["snapshot", dir_s, "--live"]);
    assert_eq!(live.status.code(), Some(0), "{}", text(&live.stderr));
    for _ in 0..2 {
        let diff = ctl(&sock, &["snapshot", dir_s, "--diff"]);
        assert_eq!(diff.status.code(), Some(0), "{}", text(&diff.stderr));
    }
    let files = || std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(files(), 4, "the state, the base and two layers");
    ctl(&sock, &["shutdown"]);
    assert_eq!(vm.wait().unwrap().code(), Some(0));
    let merged = brisk(&["merge-snapshot", dir_s]);
    assert_eq!(merged.status.code(), Some(0), "{}", text(&merged.stderr));
    assert!(text(&merged.stdout).contains("2 diff layer(s) merged"));
    assert_eq!(files(), 2, "the state and one memory file");
    // The dirty guest runs on until the timeout (status 10).
    let again = brisk(&["run", "--restore", dir_s, "--timeout", "2s"]);
    assert_eq!(again.status.code(), Some(10), "{}", text(&again.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}
