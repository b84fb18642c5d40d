//! The locks on a VM's disk images, as QEMU locks them: an open-file-
//! description lock on the whole file, exclusive for a writer, shared for
//! `,readonly`. So a second writer, or a writer beside readers, is refused,
//! in the same VM (the image given twice) or another brisk.
//!
//! They are held on descriptors of their own, apart from the images'
//! files, so a live migration on one host can hand them over: the source
//! flushes the images while its guest is stopped and lets go once its VM
//! has ended (before Commit), and the destination, which opened the
//! images without locking, takes them on Commit.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;

use crate::{DiskConfig, DiskError, StartError};

/// The locks a VM holds (none for a destination not yet committed).
#[derive(Default)]
pub(crate) struct DiskLocks(Mutex<Vec<File>>);

impl DiskLocks {
    /// Lock every disk of `disks`, or say which is in use.
    pub(crate) fn take(disks: &[DiskConfig]) -> Result<DiskLocks, StartError> {
        let locks = DiskLocks::default();
        locks.acquire(disks)?;
        Ok(locks)
    }

    /// Lock every disk of `disks` (those held before are let go first).
    pub(crate) fn acquire(&self, disks: &[DiskConfig]) -> Result<(), StartError> {
        let mut held = Vec::new();
        for d in disks {
            held.push(lock(d)?);
        }
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = held;
        Ok(())
    }

    /// Lock `d` in place of disk `index`'s lock (a swapped image): the
    /// new one is taken before the old one goes.
    pub(crate) fn swap(&self, index: usize, d: &DiskConfig) -> Result<(), StartError> {
        use std::os::unix::fs::MetadataExt;
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // The same file again (a resize announced, a hard link): the lock
        // held is the one it needs (a second OFD lock would conflict).
        let same = |f: &File| {
            let (a, b) = (f.metadata(), std::fs::metadata(&d.path));
            matches!((a, b), (Ok(a), Ok(b)) if a.dev() == b.dev() && a.ino() == b.ino())
        };
        if held.get(index).is_some_and(same) {
            return Ok(());
        }
        let new = lock(d)?;
        match held.get_mut(index) {
            Some(old) => *old = new,
            None => held.push(new),
        }
        Ok(())
    }

    /// Let every lock go (a migrated VM's source).
    pub(crate) fn release(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Flush the writable images of `disks` to storage (fdatasync, which
/// flushes the file whichever descriptor asks; each opened anew, so a VM
/// running without its locks is flushed too): a migration's source does
/// this before it stops the guest and again while it is stopped, before
/// the Commit, so a destination on shared storage reads every write the
/// guest made here.
pub(crate) fn flush(disks: &[DiskConfig]) -> std::io::Result<()> {
    for d in disks.iter().filter(|d| !d.readonly) {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(&d.path)?
            .sync_data()?;
    }
    Ok(())
}

/// A new descriptor of `d`'s image, locked.
fn lock(d: &DiskConfig) -> Result<File, StartError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!d.readonly)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&d.path)
        .map_err(|source| DiskError::Lock {
            path: d.path.clone(),
            source,
        })?;
    // SAFETY: a zeroed flock is valid; the fields that matter are set.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = if d.readonly {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    } as libc::c_short;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fcntl on a descriptor we own, with a valid flock to read.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &l) } == 0 {
        return Ok(file);
    }
    let e = std::io::Error::last_os_error();
    Err(match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => DiskError::InUse {
            path: d.path.clone(),
            readonly: d.readonly,
        },
        _ => DiskError::Lock {
            path: d.path.clone(),
            source: e,
        },
    }
    .into())
}
