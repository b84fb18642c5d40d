//! A TAP device: an existing host network interface whose Ethernet
//! frames brisk reads and writes through `/dev/net/tun`, each behind a
//! 12-byte virtio-net header (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ`), so
//! checksum and segmentation offloads pass between the guest and the
//! host kernel untouched. brisk attaches to an interface the user made
//! (`ip tuntap add NAME mode tap`), as Firecracker takes `host_dev_name`;
//! it never creates or removes one.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The virtio-net header the TAP puts before every frame (struct
/// virtio_net_hdr_mrg_rxbuf: the modern header, `num_buffers` included).
pub const VNET_HDR_LEN: usize = 12;

/// Why a TAP device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "'{0}' is not a network interface name (1 to 15 characters; no '/', ':' or white space)"
    )]
    BadName(String),
    #[error("there is no network interface {0} (create it first: ip tuntap add {0} mode tap)")]
    Missing(String),
    #[error("network interface {0} is not a TAP device (brisk attaches to one made with: ip tuntap add NAME mode tap)")]
    NotTap(String),
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded?)")]
    NoTun(#[source] io::Error),
    #[error("no permission to attach TAP device {0} (run brisk as root or with CAP_NET_ADMIN, or make the TAP with 'user' set to brisk's user)")]
    Permission(String),
    #[error("TAP device {0} is attached to another process (a migration's destination on the same host needs a TAP of its own)")]
    Busy(String),
    #[error("TAP device {name}: {what}: {source}")]
    Io {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// struct ifreq as TUNSETIFF reads it: the name, then the flags (the
/// rest of the 40-byte union unused).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An attached TAP device (non-blocking).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attach to the existing TAP interface `name`, with virtio-net
    /// headers, no offloads yet.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let bad = name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name
                .bytes()
                .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
        if bad {
            return Err(TapError::BadName(name.escape_debug().to_string()));
        }
        // TUNSETIFF creates an interface that does not exist: look first.
        // (Without sysfs there is nothing to look in; go ahead.)
        let sys = Path::new("/sys/class/net");
        if sys.is_dir() {
            let dev = sys.join(name);
            if !dev.exists() {
                return Err(TapError::Missing(name.into()));
            }
            if !dev.join("tun_flags").exists() {
                return Err(TapError::NotTap(name.into()));
            }
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(TapError::NoTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and writes back) a struct ifreq; `req`
        // has its layout and size (40 bytes) and outlives the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => TapError::Permission(name.into()),
                Some(libc::EBUSY) => TapError::Busy(name.into()),
                // A TUN (not TAP) interface, or one made without virtio
                // headers allowed.
                Some(libc::EINVAL) => TapError::NotTap(name.into()),
                _ => TapError::Io {
                    name: name.into(),
                    what: "TUNSETIFF",
                    source: e,
                },
            });
        }
        let tap = Tap {
            file,
            name: name.into(),
        };
        let hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        let r = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr) };
        if r < 0 {
            return Err(tap.error("TUNSETVNETHDRSZ", io::Error::last_os_error()));
        }
        tap.set_offload(0)
            .map_err(|e| tap.error("TUNSETOFFLOAD", e))?;
        Ok(tap)
    }

    fn error(&self, what: &'static str, source: io::Error) -> TapError {
        TapError::Io {
            name: self.name.clone(),
            what,
            source,
        }
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which offloads (`TUN_F_*`) the host may hand to the guest: what
    /// the guest's driver accepted.
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Read one frame (header first); `WouldBlock` when there is none.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Write one frame (header first).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }

    /// The fd the I/O engine waits on.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_anything_is_opened() {
        for bad in ["", "a/b", "x:1", "has space", "sixteen-chars-xx"] {
            assert!(
                matches!(Tap::open(bad), Err(TapError::BadName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_missing_interface_is_named() {
        if !Path::new("/sys/class/net").is_dir() {
            eprintln!("SKIP: no /sys/class/net");
            return;
        }
        let e = Tap::open("brisk-nothere").unwrap_err();
        assert!(matches!(e, TapError::Missing(_)));
        assert!(e
            .to_string()
            .contains("ip tuntap add brisk-nothere mode tap"));
        // The loopback interface exists and is not a TAP.
        assert!(matches!(Tap::open("lo"), Err(TapError::NotTap(_))));
    }
}
