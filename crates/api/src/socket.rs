//! The API socket's file: claimed under a lock, never replacing anything
//! but a stale socket of ours, and removed on exit only while it is still
//! the one we bound.
//!
//! `PATH.lock` is held (flock) for the life of the socket and removed with
//! it. Whoever holds it owns `PATH`: a second brisk on the same path finds
//! the lock taken and refuses, so two instances can never remove each
//! other's socket; a socket left by a brisk that died (lock free, nothing
//! listening) is replaced, and so is the lock file it left. A lock file is
//! brisk's only if brisk created it (exclusively) or it is a regular file
//! holding exactly brisk's mark: anything else at `PATH.lock` is refused
//! and left alone, never opened for writing, never removed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// The socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another process is serving on this path (or holds its lock).
    #[error("{} is in use by another brisk; choose another --api-socket", .0.display())]
    InUse(PathBuf),
    /// Something that is not a socket is at the path: never removed.
    #[error("{} exists and is not a socket (it is {kind}); brisk will not replace it: choose another --api-socket", .path.display())]
    NotASocket { path: PathBuf, kind: &'static str },
    /// Something that is not brisk's lock file is at `PATH.lock`.
    #[error("{} exists and is not a brisk lock file ({why}); brisk will not use or remove it: remove it yourself if it is stale, or choose another --api-socket", .path.display())]
    NotOurLock { path: PathBuf, why: &'static str },
    #[error("API socket {}: {err}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
}

/// A bound socket file and its lock.
pub(crate) struct SocketFile {
    path: PathBuf,
    /// Identity of the socket we bound, to remove only that one.
    ino: (u64, u64),
    lock: File,
    lock_path: PathBuf,
}

fn kind(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "a regular file"
    }
}

/// What a lock file of brisk's holds.
const LOCK_MARK: &[u8] = b"brisk API socket lock\n";

/// Open `lock_path`: created (then `true`) whole, mark and all, by
/// linking a marked temporary file into place (so no brisk ever finds one
/// of brisk's lock files empty, and an existing file is never replaced);
/// or the existing one, only if it is a regular file (never through a
/// symlink, never blocking, never for writing), whose mark is checked once
/// its lock is held.
fn open_lock(lock_path: &Path) -> std::io::Result<(File, bool)> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut tmp = lock_path.as_os_str().to_owned();
    tmp.push(format!(".{}.{nanos}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    let linked = f
        .write_all(LOCK_MARK)
        .and_then(|()| std::fs::hard_link(&tmp, lock_path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok((f, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let m = std::fs::symlink_metadata(lock_path)?;
            if !m.is_file() {
                return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
            }
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(
                    libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC,
                )
                .open(lock_path)?;
            Ok((f, false))
        }
        Err(e) => Err(e),
    }
}

/// Why the file at `lock_path` (held open as `f`) is not brisk's lock.
fn not_our_lock(f: &File) -> Option<&'static str> {
    match f.metadata() {
        Ok(m) if !m.is_file() => return Some("it is not a regular file"),
        Ok(m) if m.len() != LOCK_MARK.len() as u64 => return Some("its contents are not brisk's"),
        Ok(_) => {}
        Err(_) => return Some("it cannot be read"),
    }
    let mut got = Vec::new();
    match f.take(LOCK_MARK.len() as u64 + 1).read_to_end(&mut got) {
        Ok(_) if got == LOCK_MARK => None,
        Ok(_) => Some("its contents are not brisk's"),
        Err(_) => Some("it cannot be read"),
    }
}

/// Whether a server accepts on the socket at `path`, asked without
/// waiting: a non-blocking connect (a full backlog, EAGAIN, still means
/// someone listens; ECONNREFUSED means nobody does).
fn listening(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid; the path is copied in below,
    // bounded by sun_path's size less its terminating NUL.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return false;
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: `addr` is a valid sockaddr_un for the call; `fd` is ours.
    let r = unsafe {
        libc::connect(
            fd,
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    let errno = std::io::Error::last_os_error().raw_os_error();
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    r == 0 || errno == Some(libc::EAGAIN) || errno == Some(libc::EINPROGRESS)
}

impl SocketFile {
    /// Lock `PATH.lock`, check what is at `path`, bind a new socket there
    /// (mode 0600).
    pub(crate) fn claim(path: &Path) -> Result<(SocketFile, UnixListener), SocketError> {
        let io = |err| SocketError::Io {
            path: path.to_path_buf(),
            err,
        };
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let not_ours = |why| SocketError::NotOurLock {
            path: lock_path.clone(),
            why,
        };
        let (lock, created) = open_lock(&lock_path).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => not_ours("it is not a regular file"),
            _ => io(e),
        })?;
        // SAFETY: flock on a file we own; LOCK_NB never blocks.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(SocketError::InUse(path.to_path_buf()));
        }
        if !created {
            if let Some(why) = not_our_lock(&lock) {
                return Err(not_ours(why));
            }
        }
        // The owner removes the lock file (under the lock) as it exits: a
        // lock won on a file that is no longer at the path is worthless.
        let held = lock.metadata().map_err(io)?;
        if !std::fs::symlink_metadata(&lock_path)
            .is_ok_and(|m| (m.dev(), m.ino()) == (held.dev(), held.ino()))
        {
            return Err(SocketError::InUse(path.to_path_buf()));
        }
        // From here the lock is ours: on any refusal, remove its file too.
        let refuse = |e: SocketError| {
            let _ = std::fs::remove_file(&lock_path);
            e
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                // Ours to replace only if nobody serves on it.
                if listening(path) {
                    return Err(refuse(SocketError::InUse(path.to_path_buf())));
                }
                std::fs::remove_file(path).map_err(io).map_err(refuse)?;
            }
            Ok(m) => {
                return Err(refuse(SocketError::NotASocket {
                    path: path.to_path_buf(),
                    kind: kind(m.file_type()),
                }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(refuse(io(e))),
        }
        // SAFETY: umask only swaps the process's file-creation mask; it is
        // restored right after the bind so the socket is born 0600.
        let old = unsafe { libc::umask(0o177) };
        let listener = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = listener.map_err(io).map_err(refuse)?;
        let m = std::fs::symlink_metadata(path)
            .map_err(io)
            .map_err(refuse)?;
        Ok((
            SocketFile {
                path: path.to_path_buf(),
                ino: (m.dev(), m.ino()),
                lock,
                lock_path,
            },
            listener,
        ))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Only the socket we bound: if someone replaced it, it is theirs.
        if std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == self.ino)
        {
            let _ = std::fs::remove_file(&self.path);
        }
        // Still holding the lock: a brisk that opened the lock file before
        // this unlink finds, after its flock, that it is no longer at the
        // path, and refuses. Then the lock goes with the file; only ours
        // (someone may have replaced it meanwhile).
        let ours = self.lock.metadata().is_ok_and(|held| {
            std::fs::symlink_metadata(&self.lock_path)
                .is_ok_and(|m| (m.dev(), m.ino()) == (held.dev(), held.ino()))
        });
        if ours {
            let _ = std::fs::remove_file(&self.lock_path);
        }
    }
}
