//! What brisk asks of storage, and in which order: a snapshot that
//! replaces another syncs each new file and the directory before the
//! state names them and before the old memory file goes (so a host crash
//! leaves one whole snapshot), and a migration's source flushes its disk
//! images while the guest is stopped, before the Commit.
//!
//! The calls are seen by a small library interposed with LD_PRELOAD
//! (built here with gcc, as the test kernels are): it logs fdatasync and
//! fsync (by the file's device and inode), rename and unlink (by path) to
//! a file, in the order brisk makes them.

mod common;

use common::harness::{ctl, scratch, spawn_until, spawn_until_env};
use common::{require_kvm, text};

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const TRACER: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int out = -1;

__attribute__((constructor)) static void start(void) {
    const char *p = getenv("BRISK_TRACE");
    if (p) out = open(p, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
}

static void note(const char *line) {
    if (out >= 0) { ssize_t n = write(out, line, strlen(line)); (void)n; }
}

static void by_fd(const char *what, int fd) {
    struct stat st; char line[128];
    if (fstat(fd, &st) == 0) {
        snprintf(line, sizeof line, "%s %lu:%lu\n", what,
                 (unsigned long)st.st_dev, (unsigned long)st.st_ino);
        note(line);
    }
}

int fdatasync(int fd) {
    by_fd("fdatasync", fd);
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}

int fsync(int fd) {
    by_fd("fsync", fd);
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return real(fd);
}

int rename(const char *a, const char *b) {
    char line[8192];
    snprintf(line, sizeof line, "rename %s %s\n", a, b);
    note(line);
    int (*real)(const char *, const char *) =
        (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "rename");
    return real(a, b);
}

/* A migration message's header (16 bytes, kind first, little-endian)
 * written to a socket: Commit is kind 7. */
static void message(int fd, const void *buf, size_t n) {
    static const unsigned char commit[4] = {7, 0, 0, 0};
    struct stat st;
    if (n == 16 && memcmp(buf, commit, 4) == 0 && fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode))
        note("send Commit\n");
}

ssize_t write(int fd, const void *buf, size_t n) {
    ssize_t (*real)(int, const void *, size_t) =
        (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    message(fd, buf, n);
    return real(fd, buf, n);
}

ssize_t send(int fd, const void *buf, size_t n, int flags) {
    ssize_t (*real)(int, const void *, size_t, int) =
        (ssize_t (*)(int, const void *, size_t, int))dlsym(RTLD_NEXT, "send");
    message(fd, buf, n);
    return real(fd, buf, n, flags);
}

/* KVM_GET_DIRTY_LOG: a migration's last one is its final copy, taken
 * with the guest stopped. */
int ioctl(int fd, unsigned long request, void *arg) {
    int (*real)(int, unsigned long, void *) =
        (int (*)(int, unsigned long, void *))dlsym(RTLD_NEXT, "ioctl");
    if (request == 0x4010ae42UL) note("KVM_GET_DIRTY_LOG\n");
    return real(fd, request, arg);
}

int unlink(const char *p) {
    char line[4200];
    snprintf(line, sizeof line, "unlink %s\n", p);
    note(line);
    int (*real)(const char *) = (int (*)(const char *))dlsym(RTLD_NEXT, "unlink");
    return real(p);
}
"#;

/// Build the tracer into `dir`; its path.
fn tracer(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let src = dir.join("trace.c");
    let lib = dir.join("libtrace.so");
    std::fs::write(&src, TRACER).unwrap();
    let built = Command::new("gcc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-ldl")
        .output()
        .expect("gcc runs (scripts/test.sh installs it)");
    assert!(built.status.success(), "{}", text(&built.stderr));
    lib
}

/// `dev:ino` of `p`, as the tracer writes it.
fn id(p: &Path) -> String {
    let m = std::fs::metadata(p).unwrap();
    format!("{}:{}", m.dev(), m.ino())
}

/// The index of the first line of `log` that satisfies `f`.
fn at(log: &[String], what: &str, f: impl Fn(&str) -> bool) -> usize {
    log.iter()
        .position(|l| f(l))
        .unwrap_or_else(|| panic!("no {what} in the trace:\n{}", log.join("\n")))
}

/// A snapshot replacing another: new memory file synced, renamed, the
/// directory synced; then the state the same way; only then the old
/// memory file removed.
#[test]
fn a_replacing_snapshot_is_durable_before_the_old_one_goes() {
    require_kvm!();
    let work = scratch("durable");
    let lib = tracer(&work);
    let (dir, sock, log) = (work.join("snap"), work.join("s"), work.join("trace"));
    let traced = [
        ("LD_PRELOAD", lib.as_path()),
        ("BRISK_TRACE", log.as_path()),
    ];
    let mut vm = spawn_until_env(
        &[
            "--guest",
            "spin",
            "--cpus",
            "1",
            "--api-socket",
            sock.to_str().unwrap(),
        ],
        "running on",
        &traced,
    );
    let snap = |n| {
        let out = ctl(&sock, &["snapshot", dir.to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "snapshot {n}: {}",
            text(&out.stderr)
        );
    };
    snap(1);
    let old = memory_file(&dir);
    std::fs::write(&log, "").unwrap();
    snap(2);
    let new = memory_file(&dir);
    ctl(&sock, &["shutdown"]);
    assert_eq!(vm.wait().unwrap().code(), Some(0));
    let log: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let (new_s, old_s) = (new.to_str().unwrap(), old.to_str().unwrap());
    let state = dir.join("state");
    let state_s = state.to_str().unwrap();
    let sync_new = at(&log, "fdatasync of the new memory file", |l| {
        l == format!("fdatasync {}", id(&new))
    });
    let rename_new = at(&log, "its rename", |l| {
        l.starts_with("rename ") && l.ends_with(&format!(" {new_s}"))
    });
    let dir_synced = |after: usize| {
        log.iter()
            .skip(after)
            .position(|l| *l == format!("fsync {}", id(&dir)))
            .map(|i| i + after)
    };
    let dir_after_new = dir_synced(rename_new).expect("the directory synced after the memory file");
    let sync_state = at(&log, "fdatasync of the state", |l| {
        l == format!("fdatasync {}", id(&state))
    });
    let rename_state = at(&log, "the state's rename", |l| {
        l.starts_with("rename ") && l.ends_with(&format!(" {state_s}"))
    });
    let dir_after_state = dir_synced(rename_state).expect("the directory synced after the state");
    let unlink_old = at(&log, "the old memory file's removal", |l| {
        *l == format!("unlink {old_s}")
    });
    let order = [
        sync_new,
        rename_new,
        dir_after_new,
        sync_state,
        rename_state,
        dir_after_state,
        unlink_old,
    ];
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "{order:?}:\n{}",
        log.join("\n")
    );
    std::fs::remove_dir_all(&work).unwrap();
}

fn memory_file(dir: &Path) -> PathBuf {
    let state: brisk_vmm::snapshot::SavedVm =
        brisk_vmm::snapshot::file::read(&dir.join("state")).unwrap();
    dir.join(state.memory_file)
}

/// A migration's source flushes its disk image while the guest is
/// stopped, before the Commit (the destination, on the same storage,
/// reads what the guest wrote); the guest's own kernel never flushes it.
/// Stopped: after the final copy's look at the dirty log (the flush
/// while the guest still runs leaves its last writes unflushed).
#[test]
fn a_migration_flushes_the_disks_before_it_commits() {
    require_kvm!();
    let work = scratch("flush");
    let lib = tracer(&work);
    let (img, sock, mig, log) = (
        work.join("disk.img"),
        work.join("s"),
        work.join("m"),
        work.join("trace"),
    );
    std::fs::write(&img, vec![0u8; 64 << 10]).unwrap();
    let url = format!("unix:{}", mig.display());
    let mut dst = spawn_until(
        &[
            "--receive-migration",
            &url,
            "--trust-disk-paths",
            "--timeout",
            "120s",
        ],
        "waiting for a migration",
    );
    let traced = [
        ("LD_PRELOAD", lib.as_path()),
        ("BRISK_TRACE", log.as_path()),
    ];
    let kernel = brisk_test_kernels::UARTIRQ;
    let mut src = spawn_until_env(
        &[
            "--kernel",
            kernel,
            "--cpus",
            "1",
            "--disk",
            img.to_str().unwrap(),
            "--api-socket",
            sock.to_str().unwrap(),
        ],
        "running on",
        &traced,
    );
    let sent = ctl(&sock, &["send-migration", &url]);
    assert_eq!(sent.status.code(), Some(0), "{}", text(&sent.stderr));
    assert_eq!(src.wait().unwrap().code(), Some(0));
    let trace = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = trace.lines().collect();
    let stopped = lines.iter().rposition(|l| *l == "KVM_GET_DIRTY_LOG");
    let commit = lines.iter().position(|l| *l == "send Commit");
    let (Some(stopped), Some(commit)) = (stopped, commit) else {
        panic!("no final copy or no Commit traced:\n{trace}");
    };
    let flush = format!("fdatasync {}", id(&img));
    assert!(
        lines[stopped..commit].contains(&flush.as_str()),
        "no flush of the image between the final copy and the Commit:\n{trace}"
    );
    let _ = dst.kill();
    let _ = dst.wait();
    std::fs::remove_dir_all(&work).unwrap();
}
