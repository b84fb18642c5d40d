//! The migration stream: where it goes (`unix:PATH`, `tcp:HOST:PORT`) and
//! its messages. Each message is a 16-byte header (kind u32 LE, reserved
//! u32, payload length u64 LE) and its payload; docs/migration.md lists
//! them. The receiver bounds every length before reading a byte of it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The protocol version in HELLO; a destination refuses another.
pub const PROTOCOL_VERSION: u32 = 1;

/// Pages per PAGES message (1 MiB).
pub(crate) const MAX_RUN_PAGES: usize = 256;

/// How long a source retries a destination that is not listening yet.
pub(crate) const CONNECT_RETRY: Duration = Duration::from_secs(3);

/// How long one read or write of the stream may block.
pub(crate) const IO_BOUND: Duration = Duration::from_secs(30);

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
    fn max_len(self) -> u64 {
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

/// Where a migration goes: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationUrl {
    Unix(PathBuf),
    Tcp(String),
}

impl std::str::FromStr for MigrationUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() || p.contains('\0') {
                return Err(format!("'{s}': unix: needs a socket path"));
            }
            return Ok(MigrationUrl::Unix(p.into()));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            if a.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(format!("'{s}': tcp: needs HOST:PORT"));
            }
            return Ok(MigrationUrl::Tcp(a.to_string()));
        }
        Err(format!(
            "'{}' is not a migration URL (unix:PATH or tcp:HOST:PORT)",
            s.chars().take(100).collect::<String>()
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

/// A connected migration stream.
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    /// Connect to a listening destination. A destination being started
    /// (its socket not there yet, or bound and not yet listening) is
    /// retried for up to CONNECT_RETRY.
    pub(crate) fn connect(url: &MigrationUrl) -> std::io::Result<Stream> {
        let until = std::time::Instant::now() + CONNECT_RETRY;
        loop {
            let r = match url {
                MigrationUrl::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
                MigrationUrl::Tcp(a) => TcpStream::connect(a).and_then(|t| {
                    t.set_nodelay(true)?;
                    Ok(Stream::Tcp(t))
                }),
            };
            match r {
                Ok(s) => {
                    s.set_timeouts()?;
                    return Ok(s);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    ) && std::time::Instant::now() < until =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn set_timeouts(&self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(Some(IO_BOUND))?;
                s.set_write_timeout(Some(IO_BOUND))
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(IO_BOUND))?;
                s.set_write_timeout(Some(IO_BOUND))
            }
        }
    }

    fn io(&mut self) -> &mut dyn ReadWrite {
        match self {
            Stream::Unix(s) => s,
            Stream::Tcp(s) => s,
        }
    }

    /// Send one message.
    pub(crate) fn send(&mut self, kind: Kind, parts: &[&[u8]]) -> std::io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let io = self.io();
        io.write_all(&header(kind, len))?;
        for p in parts {
            io.write_all(p)?;
        }
        Ok(())
    }

    /// Send one message with `fd` attached (SCM_RIGHTS; Unix only).
    pub(crate) fn send_with_fd(
        &mut self,
        kind: Kind,
        body: &[u8],
        fd: RawFd,
    ) -> std::io::Result<()> {
        let Stream::Unix(s) = self else {
            return Err(std::io::Error::other(
                "a local upgrade hands over guest memory as a file descriptor, which needs unix:",
            ));
        };
        let head = header(kind, body.len());
        let sent = s
            .send_with_fd(&head[..], fd)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        if sent != head.len() {
            s.write_all(&head[sent..])?;
        }
        s.write_all(body)
    }

    /// Receive one message: its kind and payload, and a descriptor if one
    /// came with it (local upgrade HELLO).
    pub(crate) fn recv(&mut self) -> Result<(Kind, Vec<u8>, Option<std::fs::File>), String> {
        let mut head = [0u8; 16];
        let fd = match self {
            Stream::Unix(s) => {
                let (n, fd) = s
                    .recv_with_fd(&mut head)
                    .map_err(|e| format!("reading the migration stream: {e}"))?;
                if n == 0 {
                    return Err("the other side closed the migration stream".into());
                }
                s.read_exact(&mut head[n..]).map_err(read_err)?;
                fd
            }
            Stream::Tcp(s) => {
                s.read_exact(&mut head).map_err(read_err)?;
                None
            }
        };
        let raw = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
        let kind = Kind::from_u32(raw).ok_or_else(|| format!("unknown message kind {raw}"))?;
        let len = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
        if len > kind.max_len() {
            return Err(format!(
                "a {kind:?} message of {len} bytes (at most {} allowed)",
                kind.max_len()
            ));
        }
        let mut body = vec![0u8; len as usize];
        self.io().read_exact(&mut body).map_err(read_err)?;
        Ok((kind, body, fd))
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn header(kind: Kind, len: usize) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&(kind as u32).to_le_bytes());
    h[8..16].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

fn read_err(e: std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "the other side closed the migration stream".into(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("the other side sent nothing for {} s", IO_BOUND.as_secs())
        }
        _ => format!("reading the migration stream: {e}"),
    }
}

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
            Ok(MigrationUrl::Tcp("127.0.0.1:7000".into()))
        );
        for bad in [
            "unix:",
            "tcp:host",
            "tcp::1",
            "tcp:h:99999",
            "file:///x",
            "",
        ] {
            assert!(bad.parse::<MigrationUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn oversized_and_unknown_messages_are_refused_unread() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Stream::Unix(a), Stream::Unix(b));
        a.send(Kind::Zero, &[&[0u8; 16]]).unwrap();
        assert_eq!(b.recv().unwrap().0, Kind::Zero);
        let mut h = header(Kind::State, 0);
        h[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        a.io().write_all(&h).unwrap();
        assert!(b.recv().unwrap_err().contains("at most"));
        a.io().write_all(&header(Kind::Hello, 0)[..4]).unwrap();
        drop(a);
        assert!(b.recv().unwrap_err().contains("closed"));
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Stream::Unix(a), Stream::Unix(b));
        let mut h = header(Kind::Hello, 0);
        h[0] = 99;
        a.io().write_all(&h).unwrap();
        assert!(b.recv().unwrap_err().contains("unknown message kind 99"));
    }
}
