//! The host's side of a guest's network, for tests and benchmarks: a TAP
//! interface made (and removed) for the run, and a raw packet socket on
//! it that sends frames to the guest and receives the frames it sends.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Why a network test cannot run here, if it cannot: no `/dev/net/tun`,
/// or no CAP_NET_ADMIN to make a TAP (a test then skips, loudly).
pub fn tap_unavailable() -> Option<String> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun does not exist".into());
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_NET_ADMIN: u64 = 1 << 12;
    if caps & CAP_NET_ADMIN == 0 {
        return Some("this process lacks CAP_NET_ADMIN to make a TAP device".into());
    }
    None
}

/// Return early, with a loud SKIPPED line, where [`tap_unavailable`] says
/// so.
#[macro_export]
macro_rules! require_tap {
    () => {
        if let Some(why) = $crate::host_net::tap_unavailable() {
            eprintln!("\n*** SKIPPED: this test needs a TAP device ({why}) ***\n");
            return;
        }
    };
}

/// A TAP interface this process made; removed when dropped.
pub struct HostTap {
    pub name: String,
}

/// Why an `ip` command failed.
#[derive(Debug, thiserror::Error)]
pub enum IpError {
    #[error("cannot run ip (apt-get install iproute2): {0}")]
    Run(#[source] io::Error),
    #[error("ip {args}: {stderr}")]
    Failed { args: String, stderr: String },
}

fn ip(args: &[&str]) -> Result<(), IpError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(IpError::Run)?;
    if !out.status.success() {
        return Err(IpError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

impl HostTap {
    /// Make a TAP interface (its name from `tag`, this process and a
    /// counter), IPv6 off (no router solicitations on the wire), with
    /// address `cidr` if given, up.
    pub fn create(tag: &str, cidr: Option<&str>) -> Result<HostTap, IpError> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let tag: String = tag
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(3)
            .collect();
        let name = format!("bk{tag}{:05x}{n:x}", std::process::id() & 0xfffff);
        ip(&["tuntap", "add", &name, "mode", "tap"])?;
        let tap = HostTap { name };
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.name),
            "1",
        );
        if let Some(cidr) = cidr {
            ip(&["addr", "add", cidr, "dev", &tap.name])?;
        }
        ip(&["link", "set", &tap.name, "up"])?;
        Ok(tap)
    }

    /// A static neighbour entry: frames to `addr` go to `mac` without ARP
    /// (the test kernels do not answer it).
    pub fn neighbour(&self, addr: &str, mac: &str) -> Result<(), IpError> {
        ip(&["neigh", "replace", addr, "lladdr", mac, "dev", &self.name])
    }

    /// The interface's index.
    pub fn ifindex(&self) -> i32 {
        std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", self.name))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.name]);
    }
}

/// A raw packet socket (AF_PACKET) on one interface.
pub struct PacketSocket {
    fd: OwnedFd,
}

const ETH_P_ALL: u16 = 0x0003;

impl PacketSocket {
    /// Open one on interface `ifindex`, with a large receive buffer (a
    /// burst is counted after it arrived).
    pub fn bind(ifindex: i32) -> io::Result<PacketSocket> {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ALL.to_be()),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let size: libc::c_int = 16 << 20;
        // SAFETY: SO_RCVBUFFORCE reads one int through the pointer.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                4,
            )
        };
        // Frames go straight to the TAP's driver, not through its queueing
        // discipline: until the kernel's link watcher has seen the carrier
        // that brisk's attach turned on (asynchronously, later under load)
        // that discipline drops everything.
        let one: libc::c_int = 1;
        // SAFETY: PACKET_QDISC_BYPASS reads one int through the pointer.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                4,
            )
        };
        // SAFETY: zeroed sockaddr_ll is valid; the fields set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = ifindex;
        // SAFETY: `sll` is a valid sockaddr_ll of the length passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSocket { fd })
    }

    /// Send one Ethernet frame out of the interface (to the guest).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is valid for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next frame that came in from the guest (the host's own frames
    /// on the interface are skipped), waiting at most `bound`; `None` if
    /// none came.
    pub fn recv_from_guest(&self, buf: &mut [u8], bound: Duration) -> io::Result<Option<usize>> {
        let deadline = Instant::now() + bound;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r =
                unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Ok(None);
            }
            // SAFETY: zeroed sockaddr_ll is valid to receive into.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: `buf` and `from` are valid for the lengths passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if from.sll_pkttype != libc::PACKET_OUTGOING {
                return Ok(Some(n as usize));
            }
        }
    }
}

/// An Ethernet frame: `dst`, `src`, `ethertype`, then `payload`.
pub fn frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Send an ICMP echo request to `addr` and wait at most `bound` for its
/// reply (a raw ICMP socket: root). Returns whether it came.
pub fn ping(addr: std::net::Ipv4Addr, seq: u16, bound: Duration) -> io::Result<bool> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let id = (std::process::id() as u16) ^ 0xb5;
    let mut msg = vec![8u8, 0, 0, 0];
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(b"brisk ping payload 0123456789");
    let sum = checksum(&msg);
    msg[2..4].copy_from_slice(&sum.to_be_bytes());
    // SAFETY: zeroed sockaddr_in is valid; the fields set below.
    let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    to.sin_family = libc::AF_INET as u16;
    to.sin_addr.s_addr = u32::from(addr).to_be();
    // SAFETY: `msg` and `to` are valid for the lengths passed.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&to as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let deadline = Instant::now() + bound;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if r == 0 {
            return Ok(false);
        }
        if r < 0 {
            continue; // EINTR
        }
        // SAFETY: `buf` is valid for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 20 {
            continue;
        }
        let n = n as usize;
        let ihl = usize::from(buf[0] & 15) * 4;
        let icmp = &buf[ihl.min(n)..n];
        let from = std::net::Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
        if icmp.len() >= 8
            && icmp[0] == 0
            && from == addr
            && icmp[4..6] == id.to_be_bytes()
            && icmp[6..8] == seq.to_be_bytes()
        {
            return Ok(true);
        }
    }
}

/// The Internet checksum (RFC 1071).
fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
