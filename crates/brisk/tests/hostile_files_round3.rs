//! Round 3's hostile files and pipes (../shared/reviews/hostile-input-
//! round3.md: H4, M2-M5, L7), each with the report's input against the
//! real binary: a snapshot whose memory file is a FIFO or a symlink, a
//! state naming host files as disks, a foreign `state` in the snapshot
//! directory, a lock file brisk did not make, and stderr a broken pipe.

mod common;

use common::harness::{ctl, scratch, spawn_brisk, spawn_until, spin_with_api, BOUND};
use common::{brisk, require_kvm, text};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use brisk_vmm::snapshot::{file, SavedVm, STATE_FILE};

/// A snapshot of a running spin guest in a new directory; the guest's
/// brisk is shut down.
fn snapshot(name: &str) -> PathBuf {
    let (dir, sock) = (scratch(name), scratch(&format!("{name}.sock")));
    let mut vm = spin_with_api(&sock);
    let snap = ctl(&sock, &["snapshot", dir.to_str().unwrap()]);
    assert_eq!(snap.status.code(), Some(0), "{}", text(&snap.stderr));
    ctl(&sock, &["shutdown"]);
    assert_eq!(vm.wait().unwrap().code(), Some(0));
    dir
}

fn memory_file(dir: &Path) -> PathBuf {
    let state: SavedVm = file::read(&dir.join(STATE_FILE)).unwrap();
    dir.join(state.memory_file)
}

/// `brisk run --restore DIR EXTRA`: (status, stderr), bounded.
fn restore(dir: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let started = Instant::now();
    let mut args = vec!["run", "--restore", dir.to_str().unwrap(), "--timeout", "5s"];
    args.extend_from_slice(extra);
    let out = brisk(&args);
    assert!(started.elapsed() < BOUND, "the restore hung");
    (out.status.code(), text(&out.stderr))
}

/// H4, L7: a memory file that is a FIFO is refused at once (it hung the
/// restore past --timeout and SIGTERM); one that is a symlink out of the
/// directory is refused, not followed.
#[test]
fn h4_a_memory_file_that_is_a_fifo_or_a_symlink_is_refused() {
    require_kvm!();
    let dir = snapshot("h4");
    let mem = memory_file(&dir);
    let kept = dir.join("kept");
    std::fs::rename(&mem, &kept).unwrap();
    let c = std::ffi::CString::new(mem.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (code, err) = restore(&dir, &[]);
    assert_eq!(code, Some(6), "{err}");
    assert!(err.contains("not a regular file"), "{err}");
    std::fs::remove_file(&mem).unwrap();
    std::os::unix::fs::symlink(&kept, &mem).unwrap();
    let (code, err) = restore(&dir, &[]);
    assert_eq!(code, Some(6), "{err}");
    assert!(err.contains("symbolic link"), "{err}");
    std::fs::remove_file(&mem).unwrap();
    std::fs::rename(&kept, &mem).unwrap();
    // Whole again, it restores (and --timeout ends it).
    let (code, err) = restore(&dir, &[]);
    assert_eq!(code, Some(10), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// M5: a state naming host files as disks opens none of them unless the
/// user says so, and a relative path never.
#[test]
fn m5_disk_paths_in_a_state_are_not_trusted() {
    require_kvm!();
    let dir = snapshot("m5");
    let path = dir.join(STATE_FILE);
    for (disk, says) in [
        ("/etc/shadow", "--trust-disk-paths"),
        ("disk1.img", "relative"),
    ] {
        let mut state: SavedVm = file::read(&path).unwrap();
        state.config.disks = vec![disk.parse().unwrap()];
        file::write(&path, &state).unwrap();
        let (code, err) = restore(&dir, &[]);
        assert_eq!(code, Some(6), "{err}");
        assert!(err.contains(says), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// M4: a snapshot never replaces a `state` that is not brisk's, and
/// never goes into the root directory or /dev.
#[test]
fn m4_a_snapshot_never_replaces_a_foreign_state() {
    require_kvm!();
    let (dir, sock) = (scratch("m4"), scratch("m4.sock"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("state"), "precious").unwrap();
    let mut vm = spin_with_api(&sock);
    // Kernel file systems, and what is mounted under them: nothing is
    // created there (a directory in cgroupfs would be a new cgroup).
    let targets = [
        dir.to_str().unwrap(),
        "/",
        "/dev/brisk-m4",
        "/proc/brisk-m4",
        "/sys/fs/cgroup/brisk-m4/snap",
    ];
    for target in targets {
        let snap = ctl(&sock, &["snapshot", target]);
        assert_eq!(snap.status.code(), Some(16), "{target}");
        let err = text(&snap.stderr);
        assert!(err.contains("brisk"), "{target}: {err}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("state")).unwrap(),
        "precious"
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "nothing added");
    assert!(!Path::new("/state").exists());
    assert!(!Path::new("/dev/brisk-m4").exists());
    assert!(!Path::new("/sys/fs/cgroup/brisk-m4").exists());
    ctl(&sock, &["shutdown"]);
    assert_eq!(vm.wait().unwrap().code(), Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// M3: a file at PATH.lock that brisk did not make is neither used nor
/// removed; brisk refuses the socket path (exit 6).
#[test]
fn m3_a_foreign_lock_file_is_left_alone() {
    require_kvm!();
    let sock = scratch("m3.sock");
    let lock = PathBuf::from(format!("{}.lock", sock.display()));
    std::fs::write(&lock, "precious").unwrap();
    let sock_s = sock.to_str().unwrap();
    let run = || {
        brisk(&[
            "run",
            "--guest",
            "spin",
            "--api-socket",
            sock_s,
            "--timeout",
            "1s",
        ])
    };
    let out = run();
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("not a brisk lock file"));
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), "precious");
    std::fs::remove_file(&lock).unwrap();
    // Its own lock file it makes, and removes.
    let out = run();
    assert_eq!(out.status.code(), Some(10), "{}", text(&out.stderr));
    assert!(!lock.exists() && !sock.exists());
}

/// M2: with stderr a broken pipe (its reader gone), brisk's statuses are
/// still the documented ones: no panic (101), no seccomp kill (12).
#[test]
fn m2_a_closed_stderr_changes_no_exit_status() {
    require_kvm!();
    for (args, want) in [
        (&["run", "--guest", "spin", "--timeout", "1s"][..], 10),
        (&["run", "--guest", "nope"][..], 6),
    ] {
        let mut child = spawn_brisk(args);
        drop(child.stderr.take());
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(want), "{args:?}");
    }
}

/// L2: the temporary files a brisk killed mid-snapshot left are removed by
/// the next snapshot into the directory, once their process is gone; a
/// live process's, or a name brisk does not make, are left alone.
#[test]
fn l2_temp_files_of_a_killed_snapshot_are_cleaned_up() {
    require_kvm!();
    let (dir, sock) = (scratch("l2"), scratch("l2.sock"));
    std::fs::create_dir_all(&dir).unwrap();
    let gone = {
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    let live = std::process::id();
    let stale = dir.join(format!(".memory-0123456789abcdef.{gone}.tmp"));
    let stale_state = dir.join(format!(".state.{gone}.tmp"));
    let busy = dir.join(format!(".memory-0123456789abcdef.{live}.tmp"));
    let other = dir.join(format!(".notes.{gone}.tmp"));
    for f in [&stale, &stale_state, &busy, &other] {
        std::fs::write(f, "x").unwrap();
    }
    let mut vm = spin_with_api(&sock);
    let snap = ctl(&sock, &["snapshot", dir.to_str().unwrap()]);
    assert_eq!(snap.status.code(), Some(0), "{}", text(&snap.stderr));
    assert!(!stale.exists() && !stale_state.exists());
    assert!(busy.exists() && other.exists());
    ctl(&sock, &["shutdown"]);
    assert_eq!(vm.wait().unwrap().code(), Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// L4: disk images are locked as QEMU locks them: the same image twice
/// read-write in one VM, or in a second brisk while the first runs, is
/// refused in one sentence (exit 6).
#[test]
fn l4_a_disk_image_has_one_writer() {
    require_kvm!();
    let img = scratch("l4.img");
    std::fs::write(&img, vec![0u8; 64 << 10]).unwrap();
    let (kernel, img_s) = (brisk_test_kernels::UARTIRQ, img.to_str().unwrap());
    let base = ["run", "--kernel", kernel, "--cpus", "1", "--timeout", "60s"];
    let twice = brisk(&[&base[..], &["--disk", img_s, "--disk", img_s]].concat());
    assert_eq!(twice.status.code(), Some(6), "{}", text(&twice.stderr));
    assert!(text(&twice.stderr).contains("is in use"));
    // A first brisk holds it (its kernel waits for input for ever): once
    // it runs, a second is refused, even read-only.
    let mut first = spawn_until(&[&base[1..], &["--disk", img_s]].concat(), "running on");
    let ro = format!("{img_s},readonly");
    let second = brisk(&[&base[..], &["--disk", &ro]].concat());
    assert_eq!(second.status.code(), Some(6), "{}", text(&second.stderr));
    assert!(text(&second.stderr).contains("is in use"));
    let _ = first.kill();
    let _ = first.wait();
    std::fs::remove_file(&img).unwrap();
}
