//! Live snapshots: the guest keeps running while its memory is written.
//!
//! The migration's pre-copy, into the memory file instead of a stream:
//! KVM's dirty log on, every page that may hold data written while the
//! guest runs, then the pages it dirtied meanwhile, pass after pass, until
//! what is left would take at most `max_stop` to write (at the rate seen
//! so far) or `max_passes` are done. Then the guest stops for the last
//! dirty pages and the device and vCPU state, and runs again while the
//! files are synced and put in place as any snapshot's are. A page read
//! while the guest writes it may be torn in the file; the write dirties
//! it, so a later pass (the last one with the guest stopped, at worst)
//! writes it again whole.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use brisk_control::Deadline;
use vm_memory::{Bytes, GuestAddress};

use super::memory::{self, MemoryWritten, PAGE};
use super::{
    check_destination, io, new_memory_file_name, remove_stale_temp_files, SnapshotError,
    SnapshotInfo, Staged, PAUSE_BOUND,
};
use crate::Vm;

/// Pages read and written at a time.
const RUN_PAGES: usize = 256;

/// How a live snapshot decides to stop the guest.
#[derive(Clone, Copy, Debug)]
pub struct LiveOptions {
    /// Stop the guest once the dirty pages left would take at most this
    /// long to write, at the rate of the passes so far.
    pub max_stop: Duration,
    /// Or once this many passes over dirty pages are done, whatever is
    /// left (a guest dirtying faster than the disk takes never converges).
    pub max_passes: u32,
    /// Leave the VM paused at the end: it then stands exactly as saved.
    pub stay_paused: bool,
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            max_stop: Duration::from_millis(10),
            max_passes: 8,
            stay_paused: false,
        }
    }
}

/// Gives the dirty log back to migrations however the snapshot ends.
struct LiveClaim<'a>(&'a Vm);

impl Drop for LiveClaim<'_> {
    fn drop(&mut self) {
        self.0.dirty_use().live = false;
    }
}

/// Turns KVM's dirty log off however the snapshot ends (unless the VM
/// tracks its dirty pages for diff snapshots: then it stays on).
struct DirtyLog<'a>(&'a brisk_kvm::Vm, bool);

impl Drop for DirtyLog<'_> {
    fn drop(&mut self) {
        if !self.1 {
            return;
        }
        if let Err(e) = self.0.set_dirty_log(false) {
            log::warn!("live snapshot: cannot turn the dirty log off: {e}");
        }
    }
}

impl Vm {
    /// Snapshot into `dir` while the guest runs, stopping it only for the
    /// last pages and the state ([`LiveOptions`]); the files are those of
    /// [`Vm::snapshot`], restored the same way. A VM already paused gets a
    /// plain snapshot. Refused while an outgoing migration (which uses the
    /// same dirty log) is in progress.
    pub fn snapshot_live(
        &self,
        dir: &Path,
        opts: LiveOptions,
    ) -> Result<SnapshotInfo, SnapshotError> {
        let start = Instant::now();
        let mut held = self.hold_for_snapshot()?;
        if held.was_paused() {
            drop(held);
            return self.snapshot(dir);
        }
        // The dirty log is ours until the end: checked and claimed under
        // the migration's slot, which `send_migration` takes to start one
        // (and refuses while `live`); not held, so the API answers meanwhile.
        let _claim = {
            let slot = self.migration.lock().unwrap_or_else(|p| p.into_inner());
            if slot.as_ref().is_some_and(|m| !m.status().phase.is_final()) {
                return Err(SnapshotError::MigrationInProgress);
            }
            self.dirty_use().live = true;
            LiveClaim(self)
        };
        check_destination(dir)?;
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(io("cannot create the snapshot directory", dir))?;
        let earlier = super::earlier_files(dir);
        self.set_diff_base(dir, String::new(), None);
        remove_stale_temp_files(dir);
        let name = new_memory_file_name();
        let path = dir.join(&name);
        let mut tmp = memory::TempFile::create(&path).map_err(io("cannot create", &path))?;
        let ram = self.memory_size();
        let cannot_write = || io("cannot write guest memory to", &path);
        tmp.file().set_len(ram).map_err(cannot_write())?;

        self.kvm.set_dirty_log(true)?;
        // Kept on for a VM that tracks its dirty pages: the last pass
        // (stopped) leaves only what the guest writes after the snapshot.
        let log = DirtyLog(&self.kvm, !self.config().track_dirty_pages);
        // Pass 0, running: every page that may hold data.
        let t = Instant::now();
        let first = memory::touched_bitmaps(&self.kvm);
        let mut data = write_pages(&self.kvm, tmp.file(), &first, false).map_err(cannot_write())?;
        let mut rate = per_second(data, t.elapsed());
        let mut passes = 0;
        let left = loop {
            let dirty = self.kvm.take_dirty_pages()?;
            let bytes = count(&dirty) * PAGE as u64;
            let estimate = Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
            if estimate <= opts.max_stop || passes >= opts.max_passes {
                break dirty;
            }
            let t = Instant::now();
            let wrote = write_pages(&self.kvm, tmp.file(), &dirty, true).map_err(cannot_write())?;
            data += wrote;
            rate = (rate + per_second(wrote, t.elapsed())) / 2;
            passes += 1;
        };
        // Stopped: the last pages and the state.
        let stop = Instant::now();
        held.stop(Deadline::after(PAUSE_BOUND))
            .map_err(SnapshotError::Pause)?;
        let pause = start.elapsed();
        let saved = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut dirty = self.kvm.take_dirty_pages()?;
            for (d, l) in dirty.iter_mut().flatten().zip(left.iter().flatten()) {
                *d |= l;
            }
            data += write_pages(&self.kvm, tmp.file(), &dirty, true).map_err(cannot_write())?;
            let mut state = self.save_state()?;
            state.memory_file = name.clone();
            // No migration could start meanwhile: the log's epoch is ours.
            Ok((state, self.dirty_use().epoch))
        }))
        .unwrap_or(Err(SnapshotError::Panicked));
        match opts.stay_paused {
            true => held.leave_paused(),
            false => held.run_again(),
        }
        let stopped = stop.elapsed();
        drop(log);
        let (state, epoch) = saved?;
        log::debug!(
            "live snapshot: {passes} passes after the first, {data} bytes, stopped {stopped:?}"
        );
        let staged = Staged {
            state,
            memory: tmp,
            written: MemoryWritten { ram, data },
            earlier,
            created,
            diff_epoch: self.config().track_dirty_pages.then_some(epoch),
        };
        self.finish(dir, staged, start, pause, stopped)
    }
}

fn count(bitmaps: &[Vec<u64>]) -> u64 {
    bitmaps
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

fn per_second(bytes: u64, took: Duration) -> u64 {
    (bytes as f64 / took.as_secs_f64().max(1e-6)) as u64
}

/// Write the pages set in `bitmaps` (one per region) into `f` at their
/// offsets in the memory file, read from guest RAM as it is now. A page
/// of zeros is left a hole, or made one (`punch`: the file may hold an
/// older copy there). Returns the bytes written.
pub(super) fn write_pages(
    kvm: &brisk_kvm::Vm,
    f: &File,
    bitmaps: &[Vec<u64>],
    punch: bool,
) -> std::io::Result<u64> {
    let mem = kvm.memory();
    let mut buf = vec![0u8; RUN_PAGES * PAGE];
    let mut written = 0u64;
    for r in memory::runs(kvm, bitmaps, RUN_PAGES) {
        let run = &mut buf[..r.pages * PAGE];
        // A volatile copy: the guest may be writing these pages.
        mem.read_slice(run, GuestAddress(r.gpa))
            .map_err(std::io::Error::other)?;
        written += write_run(f, run, r.offset, punch)?;
    }
    Ok(written)
}

/// Write `run` (whole pages) at `at`, its zero pages as holes.
fn write_run(f: &File, run: &[u8], at: u64, punch: bool) -> std::io::Result<u64> {
    let mut written = 0;
    let pages: Vec<&[u8]> = run.chunks(PAGE).collect();
    let mut p = 0;
    while p < pages.len() {
        let zero = memory::is_zero(pages[p]);
        let first = p;
        while p < pages.len() && memory::is_zero(pages[p]) == zero {
            p += 1;
        }
        let (start, len) = (at + (first * PAGE) as u64, ((p - first) * PAGE) as u64);
        if !zero {
            f.write_all_at(&run[first * PAGE..p * PAGE], start)?;
            written += len;
        } else if punch {
            punch_hole(f, start, len)?;
        }
    }
    Ok(written)
}

fn punch_hole(f: &File, at: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            at as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(e);
    }
    // A file system without holes: write the zeros.
    f.write_all_at(&vec![0u8; len as usize], at)
}
