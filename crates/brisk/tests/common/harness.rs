//! The test harness of the CLI's tests: a brisk started with an API
//! socket, raw HTTP requests, `brisk ctl`, bounded waits.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::brisk;

/// A generous bound for things that must happen: only a hang exceeds it.
pub const BOUND: Duration = Duration::from_secs(60);

pub struct Brisk {
    pub child: Child,
    pub sock: PathBuf,
    pub dir: PathBuf,
}

pub fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("brisk-hostile-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

impl Brisk {
    /// `brisk run --guest spin --api-socket DIR/s EXTRA...`, once it answers.
    pub fn start(tag: &str, extra: &[&str]) -> Brisk {
        Self::start_with(tag, extra, |_| {})
    }

    pub fn start_with(tag: &str, extra: &[&str], setup: impl FnOnce(&mut Command)) -> Brisk {
        let dir = tempdir(tag);
        let sock = dir.join("s");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_brisk"));
        cmd.args([
            "-v",
            "run",
            "--guest",
            "spin",
            "--cpus",
            "1",
            "--api-socket",
        ])
        .arg(&sock)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        setup(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while !line.contains("running on") {
            line.clear();
            assert_ne!(err.read_line(&mut line).unwrap(), 0, "brisk ended early");
        }
        // Keep draining stderr so brisk never blocks on it.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut err, &mut std::io::sink());
        });
        Brisk { child, sock, dir }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        request(
            &self.sock,
            &format!("GET /api/v1/{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
    }

    pub fn alive(&self) {
        let (status, body) = self.get("vm.info");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"running\""), "{body}");
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Wait (bounded) for the exit status.
    pub fn wait(&mut self) -> Option<i32> {
        let until = Instant::now() + BOUND;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                panic!("brisk did not exit within {BOUND:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// brisk's threads. KVM's own task in the process (the NX huge page
    /// recovery worker, "kvm-nx-lpage-re", started at the first KVM_RUN,
    /// whenever that is) is not brisk's and not counted.
    pub fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.child.id()))
            .map(|d| {
                d.flatten()
                    .filter(|t| {
                        std::fs::read_to_string(t.path().join("comm"))
                            .is_ok_and(|c| !c.starts_with("kvm"))
                    })
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Drop for Brisk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Send `raw`, read the reply until the server closes; (status, body).
pub fn request(sock: &Path, raw: &str) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(BOUND)).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse(&out)
}

pub fn parse(out: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// Wait (bounded) until `cond`.
pub fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + BOUND;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn scratch(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("brisk-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    let _ = std::fs::remove_file(&p);
    p
}

/// Spawn `brisk ARGS`, stdin and stdout null, stderr a pipe (its reader
/// is the caller's).
pub fn spawn_brisk<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Child {
    spawn_brisk_env(args, &[])
}

/// As [`spawn_brisk`], with these variables added to its environment.
pub fn spawn_brisk_env<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &Path)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_brisk"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The spin guest on one vCPU serving its API on `sock`, once it runs (a
/// 300 s --timeout, so a failed test leaves no brisk behind for long).
pub fn spin_with_api(sock: &Path) -> Child {
    let sock = sock.to_str().unwrap();
    let args = ["--guest", "spin", "--cpus", "1", "--api-socket", sock];
    spawn_until(&[&args[..], &["--timeout", "300s"]].concat(), "running on")
}

/// Spawn `brisk -v run ARGS` and wait until its stderr says `ready`.
pub fn spawn_until(args: &[&str], ready: &str) -> Child {
    spawn_until_env(args, ready, &[])
}

/// As [`spawn_until`], with these variables added to its environment.
pub fn spawn_until_env(args: &[&str], ready: &str, env: &[(&str, &Path)]) -> Child {
    let mut child = spawn_brisk_env(&[&["-v", "run"][..], args].concat(), env);
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains(ready) {
        line.clear();
        assert_ne!(
            stderr.read_line(&mut line).unwrap(),
            0,
            "brisk ended before saying '{ready}'"
        );
    }
    // Keep draining, so brisk never blocks on a full stderr pipe.
    std::thread::spawn(move || for _ in stderr.lines() {});
    child
}

pub fn ctl(sock: &Path, args: &[&str]) -> Output {
    let mut all = vec!["ctl", "--api-socket", sock.to_str().unwrap()];
    all.extend_from_slice(args);
    brisk(&all)
}
