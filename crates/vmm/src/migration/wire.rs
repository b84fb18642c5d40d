//! The migration stream: where it goes (`unix:PATH`, `tcp:IP:PORT`) and
//! its messages. Each message is a 16-byte header (kind u32 LE, reserved
//! u32 = 0, payload length u64 LE) and its payload; docs/snapshot.md
//! lists them. The receiver bounds every length before reading a byte of
//! it.
//!
//! Every wait on the stream is bounded as a whole, not per `read`: a
//! connect by [`CONNECT_BOUND`], a message (from the start of the wait for
//! it to its last byte, either way) by [`MESSAGE_BOUND`] or a caller's
//! tighter deadline, and each asks its caller's cancel every [`SLICE`]. A
//! peer that drips a byte now and then, stalls, or never accepts holds
//! nobody for longer than that.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The protocol version in HELLO; a destination refuses another.
pub const PROTOCOL_VERSION: u32 = 1;

/// Pages per PAGES message (1 MiB).
pub(crate) const MAX_RUN_PAGES: usize = 256;

/// How long a source retries a destination that is not listening yet
/// (its socket missing, or bound and not yet listening).
pub(crate) const CONNECT_RETRY: Duration = Duration::from_secs(3);

/// The longest a connect may take as a whole: a Unix listener whose
/// backlog is full, or a TCP peer that drops our SYNs, is given up on then.
pub const CONNECT_BOUND: Duration = Duration::from_secs(10);

/// The longest one message may take, from the start of the wait for it to
/// its last byte, sending or receiving.
pub const MESSAGE_BOUND: Duration = Duration::from_secs(30);

/// How long one blocking read or write waits before the loop around it
/// asks its bound and its cancel again.
const SLICE: Duration = Duration::from_millis(100);

/// How long a parting message (an Abort, the Running after a Commit) may
/// take: a peer that no longer reads must not hold the sender.
pub(crate) const PARTING_BOUND: Duration = Duration::from_secs(1);

/// A cancel that never comes: for the sends no cancel may stop.
pub(crate) fn never() -> bool {
    false
}

/// The header's size.
pub const HEADER_LEN: usize = 16;

/// Message kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    /// Source -> destination, first: protocol version and configuration
    /// (JSON); with the guest's memfd attached on a local upgrade.
    Hello = 1,
    /// Guest address (u64 LE), then whole pages of RAM from there.
    Pages = 2,
    /// Guest address and length (u64 LE each): those bytes are zero.
    Zero = 3,
    /// The VM's state, as a snapshot's state file (header, CRC, JSON).
    State = 4,
    /// Either way: give up, with a reason (UTF-8). The destination exits.
    Abort = 5,
    /// Destination -> source: the VM is built and restored, paused.
    Ready = 6,
    /// Source -> destination: the source VM has ended; run it.
    Commit = 7,
    /// Destination -> source: running.
    Running = 8,
}

impl Kind {
    fn from_u32(v: u32) -> Option<Kind> {
        use Kind::*;
        [Hello, Pages, Zero, State, Abort, Ready, Commit, Running]
            .into_iter()
            .find(|k| *k as u32 == v)
    }

    /// The largest payload a receiver accepts for this kind.
    pub fn max_len(self) -> u64 {
        match self {
            Kind::Hello => 1 << 20,
            Kind::Pages => 8 + (MAX_RUN_PAGES * 4096) as u64,
            Kind::Zero => 16,
            // A state is ~20 KiB a vCPU: 8 MiB is far above any real one
            // and bounds what parsing it may allocate.
            Kind::State => (8 << 20) + 32,
            Kind::Abort => 4096,
            Kind::Commit => 1,
            Kind::Ready | Kind::Running => 0,
        }
    }
}

/// Why the stream failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the other side closed the migration stream")]
    Closed,
    #[error("the other side did not {} a whole message within {:.1} s", if *.sending { "take" } else { "send" }, .bound.as_secs_f64())]
    TimedOut { sending: bool, bound: Duration },
    #[error("cancelled")]
    Cancelled,
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the other side passed more file descriptors than the one a local upgrade hands over")]
    Descriptors,
    #[error("unknown message kind {0}")]
    UnknownKind(u32),
    #[error("a {kind:?} message whose header's reserved field is {reserved:#x}, not 0")]
    Reserved { kind: Kind, reserved: u32 },
    #[error("a {kind:?} message of {len} bytes (at most {} allowed)", .kind.max_len())]
    TooLong { kind: Kind, len: u64 },
    #[error("{url} is not listening: {source}")]
    NotListening {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url} did not accept the connection within {} s (a full backlog, or a peer that drops connections)", CONNECT_BOUND.as_secs())]
    ConnectTimedOut { url: String },
}

/// When a wait on the stream gives up: at a deadline, or as soon as its
/// cancel says so (asked every [`SLICE`]).
#[derive(Clone, Copy)]
pub(crate) struct Bound<'a> {
    until: Instant,
    allowed: Duration,
    cancelled: &'a dyn Fn() -> bool,
}

impl<'a> Bound<'a> {
    /// `within` from now.
    pub(crate) fn within(within: Duration, cancelled: &'a dyn Fn() -> bool) -> Self {
        Bound {
            until: Instant::now() + within,
            allowed: within,
            cancelled,
        }
    }

    /// One message's bound: [`MESSAGE_BOUND`], or less to end by `until`.
    pub(crate) fn message(cancelled: &'a dyn Fn() -> bool, until: Option<Instant>) -> Self {
        let b = Bound::within(MESSAGE_BOUND, cancelled);
        match until {
            Some(u) if u < b.until => Bound {
                until: u,
                allowed: u.saturating_duration_since(Instant::now()),
                cancelled,
            },
            _ => b,
        }
    }

    fn check(&self, sending: bool) -> Result<(), WireError> {
        if (self.cancelled)() {
            return Err(WireError::Cancelled);
        }
        if Instant::now() >= self.until {
            return Err(WireError::TimedOut {
                sending,
                bound: self.allowed,
            });
        }
        Ok(())
    }
}

/// A message's header, checked: a known kind, the reserved field zero, a
/// length within the kind's bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub len: u64,
}

impl Header {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
        let word = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let kind = Kind::from_u32(word(0)).ok_or(WireError::UnknownKind(word(0)))?;
        if word(4) != 0 {
            return Err(WireError::Reserved {
                kind,
                reserved: word(4),
            });
        }
        let len = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        if len > kind.max_len() {
            return Err(WireError::TooLong { kind, len });
        }
        Ok(Header { kind, len })
    }

    fn encode(kind: Kind, len: usize) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&(kind as u32).to_le_bytes());
        h[8..16].copy_from_slice(&(len as u64).to_le_bytes());
        h
    }
}

/// One message framed in a byte slice: its kind, its body, and the bytes
/// after it.
pub type Frame<'a> = (Kind, &'a [u8], &'a [u8]);

/// The first message framed in `bytes` and what follows it, `None` when
/// `bytes` ends before a whole one (pure: the fuzz target's framing).
pub fn next_frame(bytes: &[u8]) -> Result<Option<Frame<'_>>, WireError> {
    let Some(head) = bytes.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let h = Header::parse(head)?;
    let rest = &bytes[HEADER_LEN..];
    if (rest.len() as u64) < h.len {
        return Ok(None);
    }
    let (body, rest) = rest.split_at(h.len as usize);
    Ok(Some((h.kind, body, rest)))
}

/// A message's text (an Abort's reason), fit to print: at most 300
/// characters, control characters escaped, so a peer cannot paint the
/// terminal or forge log lines.
pub fn printable(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == 300 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Where a migration goes: `unix:PATH` or `tcp:IP:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationUrl {
    Unix(PathBuf),
    /// An address, never a host name: resolving one takes system calls
    /// (and files, and the network) that the API thread's seccomp filter
    /// rightly forbids, and a name can change under a migration.
    Tcp(SocketAddr),
}

impl std::str::FromStr for MigrationUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let shown = || {
            s.chars()
                .take(100)
                .collect::<String>()
                .escape_debug()
                .to_string()
        };
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() || p.contains('\0') {
                return Err(format!("'{}': unix: needs a socket path", shown()));
            }
            return Ok(MigrationUrl::Unix(p.into()));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            return a.parse::<SocketAddr>().map(MigrationUrl::Tcp).map_err(|_| {
                format!(
                    "'{}': tcp: takes an IP address and a port (tcp:127.0.0.1:7000, tcp:[::1]:7000); brisk resolves no host names",
                    shown()
                )
            });
        }
        Err(format!(
            "'{}' is not a migration URL (unix:PATH or tcp:IP:PORT)",
            shown()
        ))
    }
}

impl std::fmt::Display for MigrationUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationUrl::Unix(p) => write!(f, "unix:{}", p.display()),
            MigrationUrl::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// One received message.
#[derive(Debug)]
pub(crate) struct Message {
    pub(crate) kind: Kind,
    pub(crate) body: Vec<u8>,
    /// A descriptor that came with it (a local upgrade's Hello).
    pub(crate) fd: Option<std::fs::File>,
}

/// A connected migration stream.
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> WireError {
    move |source| WireError::Io { what, source }
}

/// A read or write that waited its slice, or was interrupted: ask the
/// bound and go on.
fn waited(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), WouldBlock | TimedOut | Interrupted)
}

impl Stream {
    /// Connect to a listening destination, within [`CONNECT_BOUND`] as a
    /// whole and asking `cancelled` meanwhile. A destination being started
    /// (its socket not there yet, or refusing) is retried for
    /// [`CONNECT_RETRY`].
    pub(crate) fn connect(
        url: &MigrationUrl,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Stream, WireError> {
        let start = Instant::now();
        let bound = Bound::within(CONNECT_BOUND, cancelled);
        loop {
            bound.check(true).map_err(|e| match e {
                WireError::TimedOut { .. } => WireError::ConnectTimedOut {
                    url: url.to_string(),
                },
                e => e,
            })?;
            match try_connect(url, &bound) {
                Ok(s) => return Ok(s),
                Err(ConnectFailure::Again) => {}
                Err(ConnectFailure::NotYet(_)) if start.elapsed() < CONNECT_RETRY => {}
                Err(ConnectFailure::NotYet(source)) => {
                    return Err(WireError::NotListening {
                        url: url.to_string(),
                        source,
                    })
                }
                Err(ConnectFailure::Wire(WireError::TimedOut { .. })) => {
                    return Err(WireError::ConnectTimedOut {
                        url: url.to_string(),
                    })
                }
                Err(ConnectFailure::Wire(e)) => return Err(e),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Make an accepted (or connected) socket blocking with slice-long
    /// timeouts, as every wait here expects.
    pub(crate) fn prepare(self) -> Result<Stream, WireError> {
        fn set<S: std::os::fd::AsFd>(s: &S) -> std::io::Result<()> {
            let sock = socket2::SockRef::from(s);
            sock.set_nonblocking(false)?;
            sock.set_read_timeout(Some(SLICE))?;
            sock.set_write_timeout(Some(SLICE))
        }
        match &self {
            Stream::Unix(s) => set(s),
            Stream::Tcp(s) => s.set_nodelay(true).and_then(|()| set(s)),
        }
        .map_err(io("setting up the migration stream"))?;
        Ok(self)
    }

    fn io(&mut self) -> &mut dyn ReadWrite {
        match self {
            Stream::Unix(s) => s,
            Stream::Tcp(s) => s,
        }
    }

    /// Write `buf` whole within `bound`; on an error `buf` is what was not
    /// written.
    fn write_rest(&mut self, buf: &mut &[u8], bound: &Bound) -> Result<(), WireError> {
        while !buf.is_empty() {
            bound.check(true)?;
            match self.io().write(buf) {
                Ok(0) => return Err(WireError::Closed),
                Ok(n) => *buf = &buf[n..],
                Err(e) if waited(&e) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    return Err(WireError::Closed)
                }
                Err(e) => return Err(io("writing the migration stream")(e)),
            }
        }
        Ok(())
    }

    fn read_exact(&mut self, buf: &mut [u8], bound: &Bound) -> Result<(), WireError> {
        let mut got = 0;
        while got < buf.len() {
            bound.check(false)?;
            match self.io().read(&mut buf[got..]) {
                Ok(0) => return Err(WireError::Closed),
                Ok(n) => got += n,
                Err(e) if waited(&e) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(WireError::Closed)
                }
                Err(e) => return Err(io("reading the migration stream")(e)),
            }
        }
        Ok(())
    }

    /// Send one message within `bound`.
    pub(crate) fn send(
        &mut self,
        kind: Kind,
        parts: &[&[u8]],
        bound: &Bound,
    ) -> Result<(), WireError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let head = Header::encode(kind, len);
        let mut pieces: Vec<&[u8]> = std::iter::once(&head[..])
            .chain(parts.iter().copied())
            .collect();
        let mut write = |pieces: &mut Vec<&[u8]>, bound: &Bound| {
            pieces
                .iter_mut()
                .try_for_each(|p| self.write_rest(p, bound))
        };
        match write(&mut pieces, bound) {
            // Cancelled part-way: finish the message, briefly and past the
            // cancel, so the stream stays framed for the Abort that follows
            // (a peer that does not read gets a cut one).
            Err(WireError::Cancelled)
                if pieces.iter().map(|p| p.len()).sum::<usize>() < head.len() + len =>
            {
                let _ = write(&mut pieces, &Bound::within(PARTING_BOUND, &never));
                Err(WireError::Cancelled)
            }
            r => r,
        }
    }

    fn write_all(&mut self, mut buf: &[u8], bound: &Bound) -> Result<(), WireError> {
        self.write_rest(&mut buf, bound)
    }

    /// Send one message with `fd` attached (SCM_RIGHTS; Unix only).
    pub(crate) fn send_with_fd(
        &mut self,
        kind: Kind,
        body: &[u8],
        fd: RawFd,
        bound: &Bound,
    ) -> Result<(), WireError> {
        let Stream::Unix(s) = self else {
            return Err(io("a local upgrade")(std::io::Error::other(
                "it hands over guest memory as a file descriptor, which needs unix:",
            )));
        };
        let head = Header::encode(kind, body.len());
        let sent = loop {
            bound.check(true)?;
            match s.send_with_fd(&head[..], fd) {
                Ok(n) => break n,
                Err(e) if matches!(e.errno(), libc::EAGAIN | libc::EINTR) => {}
                Err(e) => {
                    let e = std::io::Error::from_raw_os_error(e.errno());
                    return Err(io("sending guest memory")(e));
                }
            }
        };
        self.write_all(&head[sent..], bound)?;
        self.write_all(body, bound)
    }

    /// Receive one message, the whole of it within `bound`.
    pub(crate) fn recv(&mut self, bound: &Bound) -> Result<Message, WireError> {
        let mut head = [0u8; HEADER_LEN];
        let mut fd = None;
        let mut got = 0;
        if let Stream::Unix(s) = self {
            // The first bytes with any descriptor riding on them.
            got = loop {
                bound.check(false)?;
                match s.recv_with_fd(&mut head) {
                    Ok((0, _)) => return Err(WireError::Closed),
                    Ok((n, f)) => {
                        fd = f;
                        break n;
                    }
                    Err(e) if matches!(e.errno(), libc::EAGAIN | libc::EINTR) => {}
                    // Control data cut short: more descriptors than the
                    // one a local upgrade hands over.
                    Err(e) if e.errno() == libc::ENOBUFS => return Err(WireError::Descriptors),
                    Err(e) => {
                        let e = std::io::Error::from_raw_os_error(e.errno());
                        return Err(io("reading the migration stream")(e));
                    }
                }
            };
        }
        self.read_exact(&mut head[got..], bound)?;
        let h = Header::parse(&head)?;
        let mut body = vec![0u8; h.len as usize];
        self.read_exact(&mut body, bound)?;
        Ok(Message {
            kind: h.kind,
            body,
            fd,
        })
    }
}

enum ConnectFailure {
    /// Refused or not there (yet): retried for CONNECT_RETRY.
    NotYet(std::io::Error),
    /// A Unix listener whose backlog is full: retried until the bound.
    Again,
    Wire(WireError),
}

impl From<WireError> for ConnectFailure {
    fn from(e: WireError) -> Self {
        ConnectFailure::Wire(e)
    }
}

/// One non-blocking connect, waited for within `bound`.
fn try_connect(url: &MigrationUrl, bound: &Bound) -> Result<Stream, ConnectFailure> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let fail = |e: std::io::Error| -> ConnectFailure {
        use std::io::ErrorKind::*;
        match e.kind() {
            ConnectionRefused | NotFound => ConnectFailure::NotYet(e),
            WouldBlock => ConnectFailure::Again,
            _ => ConnectFailure::Wire(io("connecting")(e)),
        }
    };
    let (domain, addr) = match url {
        MigrationUrl::Unix(p) => (Domain::UNIX, SockAddr::unix(p).map_err(fail)?),
        MigrationUrl::Tcp(a) => (Domain::for_address(*a), SockAddr::from(*a)),
    };
    let sock = Socket::new(domain, Type::STREAM, None).map_err(fail)?;
    sock.set_nonblocking(true).map_err(fail)?;
    match sock.connect(&addr) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            // TCP: wait for the handshake, a slice at a time.
            loop {
                bound.check(true)?;
                let mut p = libc::pollfd {
                    fd: sock.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, for the length given.
                let n = unsafe { libc::poll(&mut p, 1, SLICE.as_millis() as i32) };
                if n > 0 {
                    break;
                }
            }
            if let Some(e) = sock.take_error().map_err(fail)? {
                return Err(fail(e));
            }
        }
        Err(e) => return Err(fail(e)),
    }
    let s = match url {
        MigrationUrl::Unix(_) => Stream::Unix(std::os::fd::OwnedFd::from(sock).into()),
        MigrationUrl::Tcp(_) => Stream::Tcp(sock.into()),
    };
    Ok(s.prepare()?)
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_say_why_not() {
        assert_eq!(
            "unix:/tmp/m.sock".parse::<MigrationUrl>(),
            Ok(MigrationUrl::Unix("/tmp/m.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:7000".parse::<MigrationUrl>(),
            Ok(MigrationUrl::Tcp("127.0.0.1:7000".parse().unwrap()))
        );
        assert!("tcp:[::1]:7000".parse::<MigrationUrl>().is_ok());
        for bad in [
            "unix:",
            "tcp:host",
            "tcp::1",
            "tcp:h:99999",
            "tcp:localhost:7000",
            "tcp:example.invalid:80",
            "tcp:999.1.1.1:1",
            "file:///x",
            "",
        ] {
            assert!(bad.parse::<MigrationUrl>().is_err(), "{bad}");
        }
        assert!("tcp:localhost:1"
            .parse::<MigrationUrl>()
            .unwrap_err()
            .contains("no host names"));
    }

    fn pair() -> (Stream, Stream) {
        let (a, b) = UnixStream::pair().unwrap();
        let a = Stream::Unix(a).prepare().unwrap();
        let b = Stream::Unix(b).prepare().unwrap();
        (a, b)
    }

    #[test]
    fn oversized_unknown_and_reserved_headers_are_refused_unread() {
        let b = Bound::within(MESSAGE_BOUND, &never);
        let (mut a, mut r) = pair();
        a.send(Kind::Zero, &[&[0u8; 16]], &b).unwrap();
        assert_eq!(r.recv(&b).unwrap().kind, Kind::Zero);
        let mut h = Header::encode(Kind::State, 0);
        h[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        a.write_all(&h, &b).unwrap();
        assert!(matches!(r.recv(&b), Err(WireError::TooLong { .. })));
        let mut h = Header::encode(Kind::Ready, 0);
        h[4] = 1;
        a.write_all(&h, &b).unwrap();
        assert!(matches!(r.recv(&b), Err(WireError::Reserved { .. })));
        a.write_all(&Header::encode(Kind::Hello, 0)[..4], &b)
            .unwrap();
        drop(a);
        assert!(matches!(r.recv(&b), Err(WireError::Closed)));
        let (mut a, mut r) = pair();
        let mut h = Header::encode(Kind::Hello, 0);
        h[0] = 99;
        a.write_all(&h, &b).unwrap();
        assert!(r
            .recv(&b)
            .unwrap_err()
            .to_string()
            .contains("unknown message kind 99"));
    }

    #[test]
    fn a_dripping_peer_is_cut_off_by_the_whole_message_bound() {
        let (mut a, mut r) = pair();
        let dripper = std::thread::spawn(move || {
            let b = Bound::within(MESSAGE_BOUND, &never);
            // Half a header, then nothing more: each byte would reset a
            // per-read timeout, never a whole-message one.
            for byte in Header::encode(Kind::Zero, 16).iter().take(8) {
                a.write_all(&[*byte], &b).unwrap();
                std::thread::sleep(Duration::from_millis(30));
            }
            a
        });
        // The message can never complete (half a header comes): only the
        // whole-message bound ends the wait.
        let b = Bound::within(Duration::from_millis(150), &never);
        let e = r.recv(&b).unwrap_err();
        assert!(
            matches!(e, WireError::TimedOut { sending: false, .. }),
            "{e}"
        );
        drop(dripper.join().unwrap());
    }

    #[test]
    fn a_cancel_ends_a_wait_at_once() {
        let (_a, mut r) = pair();
        let c = std::sync::atomic::AtomicBool::new(true);
        let cancelled = || c.load(std::sync::atomic::Ordering::SeqCst);
        let b = Bound::within(MESSAGE_BOUND, &cancelled);
        assert!(matches!(r.recv(&b), Err(WireError::Cancelled)));
    }

    #[test]
    fn more_descriptors_than_one_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut r = Stream::Unix(b).prepare().unwrap();
        // Three: the control buffer for one is padded to fit two.
        let f: Vec<_> = (0..3).map(|_| std::fs::File::open("/").unwrap()).collect();
        let fds: Vec<_> = f.iter().map(|f| f.as_raw_fd()).collect();
        let head = Header::encode(Kind::Hello, 0);
        a.send_with_fds(&[&head[..]], &fds).unwrap();
        let b = Bound::within(MESSAGE_BOUND, &never);
        let got = r.recv(&b);
        assert!(matches!(got, Err(WireError::Descriptors)), "{got:?}");
    }

    #[test]
    fn frames_split_as_the_stream_reads_them() {
        let mut bytes = Header::encode(Kind::Zero, 16).to_vec();
        bytes.extend_from_slice(&[7u8; 16]);
        bytes.extend_from_slice(&Header::encode(Kind::Ready, 0));
        let (k, body, rest) = next_frame(&bytes).unwrap().unwrap();
        assert_eq!((k, body.len()), (Kind::Zero, 16));
        let (k, body, rest) = next_frame(rest).unwrap().unwrap();
        assert_eq!((k, body.len(), rest.len()), (Kind::Ready, 0, 0));
        assert!(next_frame(&bytes[..20]).unwrap().is_none());
    }

    #[test]
    fn peer_text_is_printed_escaped() {
        let shown = printable(b"\x1b[2J\nFAKE: brisk: migrated OK");
        assert!(!shown.chars().any(char::is_control), "{shown}");
        assert!(shown.contains("\\u{1b}[2J\\nFAKE"));
        assert!(printable(&[b'x'; 5000]).chars().count() <= 301);
    }
}
