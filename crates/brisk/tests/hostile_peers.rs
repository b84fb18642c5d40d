//! The hostile-peer kit (round 3, ../shared/reviews/hostile-input-round3.md):
//! a fake migration destination and a fake migration source, written
//! against the wire format from raw bytes, that stall, drip, flood and
//! lie, against the real binary with its default seccomp filters. Each
//! scenario asserts that it ends within a stated bound (before the fixes
//! these hung for as long as the peer liked), that the guest runs in
//! exactly one place, and that no socket, lock or temporary file is left.

mod common;

use common::harness::{ctl, scratch, spawn_brisk, spawn_until, spin_with_api};
use common::{require_kvm, text};

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use brisk_vmm::migration::{CONNECT_BOUND, MESSAGE_BOUND, SWITCH_GRACE};

// The wire's message kinds (docs/snapshot.md).
const HELLO: u32 = 1;
const PAGES: u32 = 2;
const ZERO: u32 = 3;
const STATE: u32 = 4;
const ABORT: u32 = 5;
const READY: u32 = 6;

/// Slack on top of a bound for a loaded machine: a scenario that ends
/// later than its bound plus this has hung (the defects held for ever).
const SLACK: Duration = Duration::from_secs(30);

fn frame(kind: u32, body: &[u8]) -> Vec<u8> {
    let mut m = kind.to_le_bytes().to_vec();
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(&(body.len() as u64).to_le_bytes());
    m.extend_from_slice(body);
    m
}

/// Read one message: (kind, body).
fn read_msg(s: &mut UnixStream) -> std::io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 16];
    s.read_exact(&mut h)?;
    let kind = u32::from_le_bytes(h[0..4].try_into().unwrap());
    let len = u64::from_le_bytes(h[8..16].try_into().unwrap());
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body)?;
    Ok((kind, body))
}

/// A source brisk: the spin guest with an API socket.
struct Source {
    child: Child,
    sock: PathBuf,
}

impl Source {
    fn start(name: &str) -> Source {
        let sock = scratch(&format!("{name}.sock"));
        let child = spin_with_api(&sock);
        Source { child, sock }
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        ctl(&self.sock, args)
    }

    /// The guest still runs here.
    fn running(&self) {
        let info = self.ctl(&["info"]);
        assert!(
            text(&info.stdout).contains("state:   running"),
            "{}{}",
            text(&info.stdout),
            text(&info.stderr)
        );
    }

    /// Shut down through the API: exits 0, leaving no socket or lock.
    fn shut_down(mut self) {
        assert_eq!(self.ctl(&["shutdown"]).status.code(), Some(0));
        assert_eq!(exit_within(&mut self.child, SLACK), Some(0));
        assert_left_nothing(&self.sock);
    }
}

/// The exit status, waiting at most `bound` (then it is killed: a hang).
fn exit_within(child: &mut Child, bound: Duration) -> Option<i32> {
    let until = Instant::now() + bound;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("brisk did not end within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_left_nothing(sock: &Path) {
    let mut lock = sock.as_os_str().to_owned();
    lock.push(".lock");
    assert!(!sock.exists(), "{} left behind", sock.display());
    assert!(!Path::new(&lock).exists(), "{lock:?} left behind");
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// A fake destination on a Unix socket: takes Hello, answers Ready (or
/// `hello_reply`), then reads until State and runs `after_state`.
fn fake_destination(
    path: &Path,
    hello_reply: Option<Vec<u8>>,
    after_state: impl FnOnce(&mut UnixStream) + Send + 'static,
) -> JoinHandle<()> {
    let l = UnixListener::bind(path).unwrap();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        drop(l);
        let _ = std::fs::remove_file(&path);
        assert_eq!(read_msg(&mut s).unwrap().0, HELLO);
        if let Some(reply) = hello_reply {
            let _ = s.write_all(&reply);
            let _ = read_msg(&mut s);
            return;
        }
        s.write_all(&frame(READY, &[])).unwrap();
        loop {
            match read_msg(&mut s) {
                Ok((STATE, _)) => break after_state(&mut s),
                Ok(_) => {}
                Err(_) => return,
            }
        }
    })
}

/// H2: a destination that takes the state and then drips a byte now and
/// then holds the paused guest no longer than the downtime budget plus
/// the switch grace; the source resumes, reports, and can be shut down.
#[test]
fn h2_a_destination_stalling_after_state_cannot_hold_the_guest() {
    require_kvm!();
    let src = Source::start("h2");
    let dest = scratch("h2-dest.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let fake = fake_destination(&dest, None, move |s| {
        // The header of an Abort, a byte every second, never finished.
        for b in frame(ABORT, b"x").iter().cycle() {
            if stopped.load(SeqCst) || s.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let started = Instant::now();
    let sent = src.ctl(&["send-migration", &format!("unix:{}", dest.display())]);
    let took = started.elapsed();
    stop.store(true, SeqCst);
    assert_eq!(sent.status.code(), Some(16), "{}", text(&sent.stderr));
    assert!(
        text(&sent.stderr).contains("did not take the VM within"),
        "{}",
        text(&sent.stderr)
    );
    assert!(took < SWITCH_GRACE + SLACK, "took {took:?}");
    eprintln!("h2: the source gave up on the stalled switch and resumed after {took:?}");
    src.running();
    fake.join().unwrap();
    src.shut_down();
}

/// H3, L1: a destination whose socket never accepts (a full backlog) is
/// given up on after the connect bound, and a cancel or SIGTERM during
/// that connect acts at once.
#[test]
fn h3_a_destination_that_never_accepts_is_given_up_on() {
    require_kvm!();
    use socket2::{Domain, SockAddr, Socket, Type};
    let full = scratch("h3-full.sock");
    let l = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
    l.bind(&SockAddr::unix(&full).unwrap()).unwrap();
    l.listen(0).unwrap();
    // Fill the backlog: connects that nobody accepts.
    let mut fillers = Vec::new();
    loop {
        let c = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        c.set_nonblocking(true).unwrap();
        if c.connect(&SockAddr::unix(&full).unwrap()).is_err() {
            break;
        }
        fillers.push(c);
        assert!(fillers.len() < 100, "the backlog never filled");
    }
    let url = format!("unix:{}", full.display());

    // Left alone: refused after CONNECT_BOUND.
    let src = Source::start("h3");
    let started = Instant::now();
    let sent = src.ctl(&["send-migration", &url]);
    assert_eq!(sent.status.code(), Some(16), "{}", text(&sent.stderr));
    assert!(
        text(&sent.stderr).contains("did not accept the connection"),
        "{}",
        text(&sent.stderr)
    );
    assert!(started.elapsed() < CONNECT_BOUND + SLACK);
    eprintln!("h3: full backlog given up on after {:?}", started.elapsed());
    src.running();

    // Cancelled while connecting.
    let sending = {
        let (sock, url) = (src.sock.clone(), url.clone());
        std::thread::spawn(move || ctl(&sock, &["send-migration", &url]))
    };
    wait_for_phase(&src, "connecting");
    assert_eq!(src.ctl(&["cancel-migration"]).status.code(), Some(0));
    let sent = sending.join().unwrap();
    assert_eq!(sent.status.code(), Some(16));
    assert!(
        text(&sent.stderr).contains("cancelled"),
        "{}",
        text(&sent.stderr)
    );
    src.running();

    // SIGTERM while connecting: a clean exit, at once.
    let mut src = src;
    let sending = {
        let (sock, url) = (src.sock.clone(), url.clone());
        std::thread::spawn(move || ctl(&sock, &["send-migration", &url]))
    };
    wait_for_phase(&src, "connecting");
    signal(&src.child, libc::SIGTERM);
    assert_eq!(exit_within(&mut src.child, SLACK), Some(143));
    let _ = sending.join().unwrap();
    assert_left_nothing(&src.sock);
    drop(fillers);
    let _ = std::fs::remove_file(&full);
}

/// Poll `ctl migration` (bounded) until it reports `phase`.
fn wait_for_phase(src: &Source, phase: &str) {
    let until = Instant::now() + SLACK;
    loop {
        let m = src.ctl(&["--json", "migration"]);
        if text(&m.stdout)
            .replace([' ', '\n'], "")
            .contains(&format!("\"phase\":\"{phase}\""))
        {
            return;
        }
        assert!(Instant::now() < until, "never {phase}: {}", text(&m.stdout));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// L1, L6: a destination that goes silent after Hello: SIGTERM ends the
/// source at once (not after the old 30 s read timeout), cleanly.
#[test]
fn l1_sigterm_is_not_held_by_a_silent_destination() {
    require_kvm!();
    let mut src = Source::start("l1");
    let dest = scratch("l1-dest.sock");
    let l = UnixListener::bind(&dest).unwrap();
    let sending = {
        let (sock, url) = (src.sock.clone(), format!("unix:{}", dest.display()));
        std::thread::spawn(move || ctl(&sock, &["send-migration", &url]))
    };
    let (mut peer, _) = l.accept().unwrap();
    assert_eq!(read_msg(&mut peer).unwrap().0, HELLO);
    let started = Instant::now();
    signal(&src.child, libc::SIGTERM);
    assert_eq!(exit_within(&mut src.child, SLACK), Some(143));
    assert!(started.elapsed() < SLACK);
    let _ = sending.join().unwrap();
    assert_left_nothing(&src.sock);
    drop(l);
    let _ = std::fs::remove_file(&dest);
}

/// L6: a destination's Abort reason reaches the user escaped (no terminal
/// control, no forged lines), and the guest runs on here.
#[test]
fn l6_a_destination_abort_is_printed_escaped() {
    require_kvm!();
    let src = Source::start("l6");
    let dest = scratch("l6-dest.sock");
    let fake = fake_destination(
        &dest,
        Some(frame(ABORT, b"\x1b[2J\nFAKE: brisk: migrated OK")),
        |_| {},
    );
    let sent = src.ctl(&["send-migration", &format!("unix:{}", dest.display())]);
    assert_eq!(sent.status.code(), Some(16));
    let err = text(&sent.stderr);
    assert!(err.contains("refused"), "{err}");
    assert!(!err.contains('\x1b') && !err.contains("\nFAKE"), "{err:?}");
    fake.join().unwrap();
    src.running();
    src.shut_down();
}

/// H1: a host name in a `tcp:` URL is refused in one sentence (it used to
/// kill brisk and its guest through the seccomp filter).
#[test]
fn h1_a_host_name_is_refused_and_the_guest_lives() {
    require_kvm!();
    let src = Source::start("h1");
    for url in [
        "tcp:localhost:7000",
        "tcp:example.invalid:80",
        "tcp:999.1.1.1:1",
    ] {
        let sent = src.ctl(&["send-migration", url]);
        assert_eq!(sent.status.code(), Some(16), "{url}");
        assert!(
            text(&sent.stderr).contains("no host names"),
            "{url}: {}",
            text(&sent.stderr)
        );
        src.running();
    }
    let r = common::brisk(&["run", "--receive-migration", "tcp:localhost:7000"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(text(&r.stderr).contains("no host names"));
    src.shut_down();
}

/// A receiving brisk (`run --receive-migration unix:M EXTRA`), once its
/// socket is there.
fn receiver(name: &str, extra: &[&str]) -> (Child, PathBuf) {
    let m = scratch(&format!("{name}-m.sock"));
    let url = format!("unix:{}", m.display());
    let child = spawn_brisk(&[&["run", "--receive-migration", &url][..], extra].concat());
    let until = Instant::now() + SLACK;
    while !m.exists() {
        assert!(Instant::now() < until, "the receiver never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, m)
}

/// Connect to the receiver at `m`. Its socket file appears at bind(),
/// a moment before listen(): a connection in between is refused, so a
/// refusal is tried again (bounded).
fn connect(m: &Path) -> UnixStream {
    let until = Instant::now() + SLACK;
    loop {
        match UnixStream::connect(m) {
            Ok(s) => return s,
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused && Instant::now() < until =>
            {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("connecting to {}: {e}", m.display()),
        }
    }
}

/// The receiver's stderr, once it has ended.
fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut s);
    s
}

/// M1, L6: a source that drips a byte a second is cut off by the whole-
/// message bound (exit 6), and SIGTERM ends the receiver at once (143);
/// the socket goes either way.
#[test]
fn m1_a_dripping_source_is_cut_off_and_sigterm_acts_at_once() {
    require_kvm!();
    let drip = |m: PathBuf| {
        std::thread::spawn(move || {
            let mut s = connect(&m);
            for b in frame(HELLO, &[b'{'; 64]) {
                if s.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let (mut cut, cut_m) = receiver("m1-cut", &[]);
    let cut_drip = drip(cut_m.clone());
    let (mut termed, termed_m) = receiver("m1-term", &[]);
    let term_drip = drip(termed_m.clone());
    std::thread::sleep(Duration::from_millis(1500));
    signal(&termed, libc::SIGTERM);
    assert_eq!(exit_within(&mut termed, SLACK), Some(143));
    assert!(!termed_m.exists());
    assert_eq!(exit_within(&mut cut, MESSAGE_BOUND + SLACK), Some(6));
    let err = stderr_of(&mut cut);
    assert!(err.contains("did not send a whole message"), "{err}");
    assert!(!cut_m.exists());
    cut_drip.join().unwrap();
    term_drip.join().unwrap();
}

/// The Hello of a spin guest with `memory` bytes of RAM and `disks`.
fn hello(memory: u64, disks: serde_json::Value) -> Vec<u8> {
    hello_of(memory, disks, false)
}

/// The same, saying whether guest memory comes with it (a local upgrade).
fn hello_of(memory: u64, disks: serde_json::Value, local: bool) -> Vec<u8> {
    let config = brisk_vmm::VmConfig {
        payload: brisk_vmm::Payload::builtin("spin"),
        cpus: 1,
        memory,
        ..Default::default()
    };
    let mut config = serde_json::to_value(&config).unwrap();
    config["disks"] = disks;
    let body = serde_json::json!({"version": 1, "config": config, "local": local});
    frame(HELLO, body.to_string().as_bytes())
}

/// Send `msgs` to the receiver at `m`; what it answers, until it closes.
fn feed(m: &Path, msgs: &[Vec<u8>]) -> Vec<(u32, Vec<u8>)> {
    let mut s = connect(m);
    s.set_read_timeout(Some(MESSAGE_BOUND + SLACK)).unwrap();
    for msg in msgs {
        if s.write_all(msg).is_err() {
            break;
        }
    }
    let mut got = Vec::new();
    while let Ok(msg) = read_msg(&mut s) {
        got.push(msg);
    }
    got
}

/// Wait (bounded) for `pid` and return its status and peak RSS in KiB.
fn reap_with_peak_rss(child: &Child) -> (i32, i64) {
    let until = Instant::now() + SLACK;
    loop {
        let mut status = 0;
        // SAFETY: a zeroed rusage is valid to be filled in.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waiting for our own child, with valid out-pointers.
        let r = unsafe { libc::wait4(child.id() as i32, &mut status, libc::WNOHANG, &mut usage) };
        if r > 0 {
            return (libc::WEXITSTATUS(status), usage.ru_maxrss);
        }
        assert!(Instant::now() < until, "the receiver did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// H5: a source cannot make the receiver commit RAM: a claim beyond the
/// host (or --max-memory) is refused, and a Zero over all of a 2 GiB
/// guest's RAM faults nothing in (peak RSS stays far below it).
#[test]
fn h5_a_source_cannot_make_the_receiver_commit_ram() {
    require_kvm!();
    let (mut r, m) = receiver("h5-claim", &[]);
    let got = feed(&m, &[hello(256 << 30, serde_json::json!([]))]);
    assert!(got.iter().any(|(k, _)| *k == ABORT));
    assert_eq!(exit_within(&mut r, SLACK), Some(6));
    assert!(stderr_of(&mut r).contains("more than this brisk takes"));

    let (mut r, m) = receiver("h5-max", &["--max-memory", "128M"]);
    feed(&m, &[hello(1 << 30, serde_json::json!([]))]);
    assert_eq!(exit_within(&mut r, SLACK), Some(6));
    assert!(stderr_of(&mut r).contains("--max-memory"));

    let (r, m) = receiver("h5-zero", &[]);
    let two_gib = 2u64 << 30;
    let mut zero = 0u64.to_le_bytes().to_vec();
    zero.extend_from_slice(&two_gib.to_le_bytes());
    let mut outside = (two_gib + (1 << 40)).to_le_bytes().to_vec();
    outside.extend_from_slice(&[0u8; 4096]);
    let got = feed(
        &m,
        &[
            hello(two_gib, serde_json::json!([])),
            frame(ZERO, &zero),
            frame(PAGES, &outside),
        ],
    );
    assert_eq!(got.first().map(|g| g.0), Some(READY));
    let (status, peak_kib) = reap_with_peak_rss(&r);
    assert_eq!(status, 6, "refused at the page outside RAM");
    eprintln!(
        "h5: peak RSS {} MiB after a Zero over 2 GiB",
        peak_kib >> 10
    );
    assert!(
        peak_kib < 512 << 10,
        "the receiver's RSS peaked at {} MiB for a Zero over 2 GiB",
        peak_kib >> 10
    );
    assert!(!m.exists());
}

/// M5, L6: a lying source is refused in one sentence, its text escaped:
/// disk paths it names are not opened without --trust-disk-paths, a
/// relative one never; an Abort cannot paint the terminal.
#[test]
fn a_lying_source_is_refused_in_one_sentence() {
    require_kvm!();
    for (disks, says) in [
        (
            serde_json::json!([{"path": "/etc/shadow", "readonly": false}]),
            "--trust-disk-paths",
        ),
        (
            serde_json::json!([{"path": "disk1.img", "readonly": false}]),
            "relative",
        ),
    ] {
        let (mut r, m) = receiver("lie-disk", &[]);
        feed(&m, &[hello(64 << 20, disks)]);
        assert_eq!(exit_within(&mut r, SLACK), Some(6));
        let err = stderr_of(&mut r);
        assert!(err.contains(says), "{err}");
    }
    let (mut r, m) = receiver("lie-abort", &[]);
    feed(
        &m,
        &[
            hello(64 << 20, serde_json::json!([])),
            frame(ABORT, b"\x1b[2J\nFAKE: brisk: migrated OK"),
        ],
    );
    assert_eq!(exit_within(&mut r, SLACK), Some(6));
    let err = stderr_of(&mut r);
    assert!(err.contains("gave up") && !err.contains('\x1b'), "{err:?}");
    assert!(!m.exists());
}

/// L5: `vm.shutdown` ends a --wait-for-vm brisk whose vm.receive-migration
/// is pending: exit 0, the request answered, no socket left.
#[test]
fn l5_shutdown_ends_a_pending_receive() {
    require_kvm!();
    let (sock, mig) = (scratch("l5.sock"), scratch("l5-m.sock"));
    let mut empty = spawn_until(
        &["--api-socket", sock.to_str().unwrap(), "--wait-for-vm"],
        "no VM yet",
    );
    let receiving = {
        let (sock, url) = (sock.clone(), format!("unix:{}", mig.display()));
        std::thread::spawn(move || ctl(&sock, &["receive-migration", &url]))
    };
    let until = Instant::now() + SLACK;
    while !mig.exists() {
        assert!(Instant::now() < until, "never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(ctl(&sock, &["shutdown"]).status.code(), Some(0));
    assert_eq!(exit_within(&mut empty, SLACK), Some(0));
    let answered = receiving.join().unwrap();
    assert_eq!(answered.status.code(), Some(16));
    assert!(!mig.exists());
    assert_left_nothing(&sock);
}

/// L6: a local upgrade whose memfd (sealed, as required) is not the size
/// its Hello claims is the source's fault: refused, exit 6 (it was 12).
#[test]
fn l6_a_memfd_of_the_wrong_size_is_refused() {
    require_kvm!();
    use std::os::fd::{AsRawFd, FromRawFd};
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let (mut r, m) = receiver("l6-memfd", &[]);
    // SAFETY: a NUL-terminated name; a new descriptor or -1.
    let fd =
        unsafe { libc::memfd_create(c"ram".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: `fd` is new and nothing else owns it.
    let ram = unsafe { std::fs::File::from_raw_fd(fd) };
    ram.set_len(1 << 20).unwrap();
    // SAFETY: fcntl on our own descriptor with an integer argument.
    let sealed = unsafe {
        libc::fcntl(
            fd,
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    assert_eq!(sealed, 0);
    let mut s = connect(&m);
    s.set_read_timeout(Some(MESSAGE_BOUND + SLACK)).unwrap();
    let msg = hello_of(64 << 20, serde_json::json!([]), true);
    assert_eq!(
        s.send_with_fd(&msg[..], ram.as_raw_fd()).unwrap(),
        msg.len()
    );
    assert_eq!(read_msg(&mut s).unwrap().0, ABORT);
    assert_eq!(exit_within(&mut r, SLACK), Some(6));
    let err = stderr_of(&mut r);
    assert!(err.contains("cannot build the source's VM here"), "{err}");
    assert!(!m.exists());
}
