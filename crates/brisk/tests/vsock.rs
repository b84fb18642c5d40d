//! `brisk run --vsock`, the real binary under its default seccomp filters,
//! with the `vsockecho` C test kernel (listens on guest port 1234 and
//! echoes; connects once to host port 1235): `CONNECT 1234` through the
//! Unix socket echoes, 256 KiB round trip whole (credit flow control both
//! ways); the guest's connection reaches `<uds>_1235`; hostile host
//! clients (garbage before CONNECT, an overlong line, a port nobody
//! listens on, a client that never reads) cost only their connection; a
//! restored VM's guest is told its connections are gone; a socket path
//! that exists is one sentence and is left alone.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brisk_test_kernels as k;
use common::harness::{ctl, until, BOUND};
use common::require_kvm;

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("brisk-vsock-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `brisk run --kernel vsockecho --vsock cid=3,uds=UDS EXTRA`; its stdout
/// (the guest's console) collected.
fn spawn(uds: &Path, extra: &[&str]) -> (Child, Arc<Mutex<String>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_brisk"))
        .args(["run", "--kernel", k::VSOCKECHO, "--vsock"])
        .arg(format!("cid=3,uds={}", uds.display()))
        .args(extra)
        .args(["--timeout", "300s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Arc::new(Mutex::new(String::new()));
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let sink = out.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut o = sink.lock().unwrap();
                o.push_str(&l);
                o.push('\n');
            }
        });
    }
    let o = out.clone();
    until("the guest listening", || {
        o.lock().unwrap().contains("listening on 1234")
    });
    (child, out)
}

/// `CONNECT port`; the `OK <host_port>` line, or what came instead.
fn connect(uds: &Path, port: u32) -> (UnixStream, String) {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(BOUND)).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    (s, String::from_utf8_lossy(&line).into_owned())
}

fn stop(mut child: Child, out: &Arc<Mutex<String>>) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        out.lock().unwrap()
    );
}

#[test]
fn connect_1234_echoes_and_the_guest_reaches_the_host_port() {
    require_kvm!();
    let d = dir("echo");
    let uds = d.join("v.sock");
    // The host side of the guest's one connection out.
    let host = UnixListener::bind(format!("{}_1235", uds.display())).unwrap();
    let (child, out) = spawn(&uds, &[]);
    let (mut g, _) = host.accept().unwrap();
    g.set_read_timeout(Some(BOUND)).unwrap();
    let mut hello = [0u8; 17];
    g.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"vsockecho: hello\n");
    g.write_all(b"and back").unwrap();
    let mut back = [0u8; 8];
    g.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"and back");

    let (mut s, ok) = connect(&uds, 1234);
    assert!(ok.starts_with("OK "), "{ok}: {}", out.lock().unwrap());
    ok[3..].parse::<u32>().expect("OK names the host port");
    s.write_all(b"ping through vsock").unwrap();
    let mut echo = [0u8; 18];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"ping through vsock");
    // 256 KiB both ways at once: more than either side's buffer, so the
    // credit has to flow.
    let data: Vec<u8> = (0..256 << 10).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent).unwrap());
    let mut got = vec![0u8; data.len()];
    s.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    assert!(got == data, "the echo came back changed");
    stop(child, &out);
    assert!(!uds.exists(), "brisk removes its socket");
    drop(host);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn hostile_host_clients_cost_only_their_connection() {
    require_kvm!();
    let d = dir("hostile");
    let uds = d.join("v.sock");
    let (child, out) = spawn(&uds, &[]);
    let eof = |mut s: UnixStream| {
        s.set_read_timeout(Some(BOUND)).unwrap();
        let mut b = [0u8; 64];
        assert_eq!(s.read(&mut b).unwrap_or(0), 0, "closed");
    };
    // Garbage before CONNECT, an overlong line, no newline then EOF.
    let mut a = UnixStream::connect(&uds).unwrap();
    a.write_all(b"HELLO THERE\n").unwrap();
    eof(a);
    let mut b = UnixStream::connect(&uds).unwrap();
    b.write_all(&[b'x'; 100]).unwrap();
    eof(b);
    // A port the guest does not listen on: reset, so closed, no OK.
    let (c, line) = connect(&uds, 999);
    assert_eq!(line, "", "{line}");
    eof(c);
    // A client that sends and never reads: its echoes fill brisk's
    // buffer and the guest's credit, and stop there.
    let (mut lazy, ok) = connect(&uds, 1234);
    assert!(ok.starts_with("OK "), "{ok}");
    lazy.set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let chunk = vec![0x5a; 64 << 10];
    for _ in 0..16 {
        if lazy.write_all(&chunk).is_err() {
            break; // its send buffer is full: brisk stopped taking
        }
    }
    // Silent clients beyond the pending limit push the oldest out.
    let silent: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&uds).unwrap())
        .collect();
    // Meanwhile a well-behaved client is served.
    let (mut good, ok) = connect(&uds, 1234);
    assert!(ok.starts_with("OK "), "{ok}: {}", out.lock().unwrap());
    good.write_all(b"still here").unwrap();
    let mut echo = [0u8; 10];
    good.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"still here");
    drop(silent);
    drop(lazy);
    stop(child, &out);
    std::fs::remove_dir_all(&d).unwrap();
}

/// Connections do not survive a snapshot: the restored guest is told
/// (TRANSPORT_RESET), and a new connection echoes.
#[test]
fn a_restored_guest_is_told_its_connections_are_gone() {
    require_kvm!();
    let d = dir("restore");
    let uds = d.join("v.sock");
    let api = d.join("api.sock");
    let (child, out) = spawn(&uds, &["--api-socket", api.to_str().unwrap()]);
    let (mut s, ok) = connect(&uds, 1234);
    assert!(ok.starts_with("OK "), "{ok}");
    s.write_all(b"before").unwrap();
    let mut b = [0u8; 6];
    s.read_exact(&mut b).unwrap();
    let snap = d.join("snap");
    assert!(ctl(&api, &["pause"]).status.success());
    let saved = ctl(&api, &["snapshot", snap.to_str().unwrap()]);
    assert!(
        saved.status.success(),
        "{}",
        String::from_utf8_lossy(&saved.stderr)
    );
    stop(child, &out);
    drop(s);
    // The restored VM listens on the same socket path again.
    let mut child = Command::new(env!("CARGO_BIN_EXE_brisk"))
        .args([
            "run",
            "--restore",
            snap.to_str().unwrap(),
            "--timeout",
            "300s",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = Arc::new(Mutex::new(String::new()));
    let sink = out.clone();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut o = sink.lock().unwrap();
            o.push_str(&l);
            o.push('\n');
        }
    });
    let o = out.clone();
    until("the reset event", || {
        o.lock().unwrap().contains("transport reset")
    });
    let (mut s, ok) = connect(&uds, 1234);
    assert!(ok.starts_with("OK "), "{ok}");
    s.write_all(b"after").unwrap();
    let mut b = [0u8; 5];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"after");
    stop(child, &out);
    std::fs::remove_dir_all(&d).unwrap();
}

/// A guest sending bad packets (another CID, an unknown operation, a
/// length past its buffer, data for no connection, a request to a port
/// nobody listens on, a packet shorter than its header): each refused,
/// logged within bounds, and the device serves on.
#[test]
fn bad_packets_from_the_guest_cost_nothing_but_themselves() {
    require_kvm!();
    let d = dir("guest");
    let uds = d.join("v.sock");
    let (child, out) = spawn(&uds, &["--cmdline", "hostile"]);
    let (mut s, ok) = connect(&uds, 1234);
    assert!(ok.starts_with("OK "), "{ok}: {}", out.lock().unwrap());
    s.write_all(b"fine").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"fine");
    let text = out.lock().unwrap().clone();
    assert!(text.contains("sent bad packets"), "{text}");
    assert!(
        text.lines().filter(|l| l.contains("vsock")).count() < 30,
        "{text}"
    );
    stop(child, &out);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_socket_path_that_exists_is_refused_and_left_alone() {
    require_kvm!();
    let d = dir("exists");
    let uds = d.join("v.sock");
    std::fs::write(&uds, "not brisk's").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_brisk"))
        .args(["run", "--kernel", k::VSOCKECHO, "--vsock"])
        .arg(format!("cid=3,uds={}", uds.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(&uds).unwrap(), "not brisk's");
    for (arg, says) in [
        ("cid=2,uds=/tmp/x", "reserved"),
        ("uds=/tmp/x", "needs cid"),
        ("cid=3", "needs uds"),
        ("cid=3,uds=/tmp/x,port=1", "not a vsock option"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_brisk"))
            .args(["run", "--kernel", k::VSOCKECHO, "--vsock", arg])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{arg}: {err}");
        assert!(err.contains(says), "{arg}: {err}");
    }
    std::fs::remove_dir_all(&d).unwrap();
}
