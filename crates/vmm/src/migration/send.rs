//! The source side: pre-copy with KVM's dirty log, then stop-and-copy.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use brisk_control::Deadline;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::wire::{Kind, MigrationUrl, Stream, MAX_RUN_PAGES, PROTOCOL_VERSION};
use super::{Hello, MigrationError, MigrationOptions, MigrationStatus, Phase};
use crate::snapshot::{file, memory};
use crate::{Vm, VmEnd};

const PAGE: usize = memory::PAGE;

/// A migration in progress (or finished) on the source.
pub(crate) struct Outgoing {
    status: Mutex<MigrationStatus>,
    cancel: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Set once the thread has been joined; waiters other than the
    /// joiner wait on `joined_cv`.
    joined: Mutex<bool>,
    joined_cv: std::sync::Condvar,
}

impl Outgoing {
    pub(crate) fn status(&self) -> MigrationStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub(crate) fn cancel(&self) {
        self.cancel.store(true, SeqCst);
    }

    /// Wait for the worker thread to be done (it is bounded by the
    /// stream's I/O timeout once cancelled), from any number of threads.
    pub(crate) fn join(&self) {
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = handle {
            let _ = t.join();
            *self.joined.lock().unwrap_or_else(|p| p.into_inner()) = true;
            self.joined_cv.notify_all();
            return;
        }
        // Someone else joins it (or has): wait for them.
        let joined = self.joined.lock().unwrap_or_else(|p| p.into_inner());
        let _done = self
            .joined_cv
            .wait_while(joined, |j| !*j)
            .unwrap_or_else(|p| p.into_inner());
    }
}

impl Vm {
    /// Start migrating this VM to `opts.url` on a thread of its own;
    /// [`Vm::migration_status`] follows it, [`Vm::cancel_migration`]
    /// stops it with the VM still running here. On success the VM here
    /// ends as [`VmEnd::Migrated`].
    pub fn send_migration(self: &Arc<Self>, opts: MigrationOptions) -> Result<(), MigrationError> {
        if self.ended().is_some() {
            return Err(MigrationError::Ended);
        }
        if opts.local && self.kvm.shared_memory().is_none() {
            return Err(MigrationError::NotShared);
        }
        if opts.local && !matches!(opts.url, MigrationUrl::Unix(_)) {
            return Err(MigrationError::LocalNeedsUnix);
        }
        let mut slot = self.migration.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|m| !m.status().phase.is_final()) {
            return Err(MigrationError::InProgress);
        }
        let out = Arc::new(Outgoing {
            status: Mutex::new(MigrationStatus::new(&opts)),
            cancel: AtomicBool::new(false),
            thread: Mutex::new(None),
            joined: Mutex::new(false),
            joined_cv: std::sync::Condvar::new(),
        });
        let (vm, job) = (self.clone(), out.clone());
        let thread = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                let start = Instant::now();
                let r = vm.migrate(&opts, &job);
                job.update(|s| {
                    s.total_ms = ms(start.elapsed());
                    match r {
                        Ok(downtime) => {
                            s.phase = Phase::Completed;
                            s.downtime_ms = Some(ms(downtime));
                        }
                        Err(e) if job.cancel.load(SeqCst) => {
                            s.phase = Phase::Cancelled;
                            s.error = Some(e);
                        }
                        Err(e) => {
                            s.phase = Phase::Failed;
                            s.error = Some(e);
                        }
                    }
                });
            })
            .map_err(MigrationError::Thread)?;
        *out.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread);
        *slot = Some(out);
        Ok(())
    }

    /// The current (or last) outgoing migration.
    pub fn migration_status(&self) -> Option<MigrationStatus> {
        let slot = self.migration.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().map(|m| m.status())
    }

    /// Cancel an outgoing migration: the VM keeps running here (unless it
    /// had already committed to the destination). Returns whether one was
    /// in progress.
    pub fn cancel_migration(&self) -> bool {
        let slot = self.migration.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            Some(m) if !m.status().phase.is_final() => {
                m.cancel();
                true
            }
            _ => false,
        }
    }

    /// Wait for the outgoing migration to end; its last status.
    pub fn wait_migration(&self) -> Option<MigrationStatus> {
        let m = self
            .migration
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        m.join();
        Some(m.status())
    }

    /// Cancel any outgoing migration and wait for its thread (shutdown).
    pub fn stop_migration(&self) {
        let m = self
            .migration
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(m) = m {
            m.cancel();
            m.join();
        }
    }

    /// The whole migration; Ok(downtime).
    fn migrate(&self, opts: &MigrationOptions, job: &Outgoing) -> Result<Duration, String> {
        let url = opts.url.to_string();
        let mut s =
            Stream::connect(&opts.url).map_err(|e| format!("cannot connect to {url}: {e}"))?;
        let hello = serde_json::to_vec(&Hello {
            version: PROTOCOL_VERSION,
            config: self.config.clone(),
            local: opts.local,
        })
        .map_err(|e| e.to_string())?;
        let sent = match (opts.local, self.kvm.shared_memory()) {
            (true, Some(mem)) => {
                use std::os::fd::AsRawFd;
                s.send_with_fd(Kind::Hello, &hello, mem.as_raw_fd())
            }
            _ => s.send(Kind::Hello, &[&hello]),
        };
        sent.map_err(|e| format!("sending to {url}: {e}"))?;
        let r = expect_ready(&mut s, "the VM's configuration")
            .and_then(|()| self.copy_and_switch(opts, job, &mut s));
        if let Err(why) = &r {
            // Best effort: the destination exits either way once the
            // stream closes.
            let _ = s.send(Kind::Abort, &[why.as_bytes()]);
        }
        let _ = self.kvm.set_dirty_log(false);
        r
    }

    fn copy_and_switch(
        &self,
        opts: &MigrationOptions,
        job: &Outgoing,
        s: &mut Stream,
    ) -> Result<Duration, String> {
        let started = Instant::now();
        let check = || -> Result<(), String> {
            if job.cancel.load(SeqCst) {
                return Err("cancelled".into());
            }
            if self.ended().is_some() {
                return Err("the VM ended".into());
            }
            if started.elapsed() > opts.timeout && !opts.force_on_timeout {
                return Err(format!(
                    "did not converge within {} s (the guest dirties memory faster than it can be sent); the VM keeps running here",
                    opts.timeout.as_secs()
                ));
            }
            Ok(())
        };
        let forced = || opts.force_on_timeout && started.elapsed() > opts.timeout;
        let kvm_err = |e: brisk_kvm::Error| e.to_string();
        if !opts.local {
            self.kvm.set_dirty_log(true).map_err(kvm_err)?;
            job.update(|st| st.phase = Phase::Copying);
            // Pass 0: every page the guest may have touched (the
            // destination's RAM starts as zeros).
            let t = Instant::now();
            let first = self.initial_pages();
            let bytes = self.send_pages(s, &first, false, &check)?;
            let mut rate = rate(bytes, t.elapsed());
            job.update(|st| {
                st.bytes_sent += bytes;
                st.rate_bytes_per_s = rate;
            });
            loop {
                check()?;
                let dirty = self.kvm.take_dirty_pages().map_err(kvm_err)?;
                let pages: u64 = dirty
                    .iter()
                    .flatten()
                    .map(|w| u64::from(w.count_ones()))
                    .sum();
                let estimate =
                    Duration::from_secs_f64((pages * PAGE as u64) as f64 / rate.max(1) as f64);
                job.update(|st| {
                    st.dirty_pages = pages;
                    st.estimated_downtime_ms = ms(estimate);
                });
                if estimate <= opts.downtime || forced() {
                    if estimate > opts.downtime {
                        log::warn!(
                            "migration: not converged after {} s; stopping the guest for about {estimate:?} (over the {:?} budget)",
                            opts.timeout.as_secs(),
                            opts.downtime
                        );
                    }
                    // Put them back for the final copy.
                    self.remember(&dirty);
                    break;
                }
                let t = Instant::now();
                let bytes = self.send_pages(s, &dirty, true, &check)?;
                rate = rate_blend(rate, super::send::rate(bytes, t.elapsed()));
                job.update(|st| {
                    st.iteration += 1;
                    st.bytes_sent += bytes;
                    st.rate_bytes_per_s = rate;
                });
            }
        }
        check()?;
        // Stop and copy: from here the guest runs nowhere until the
        // destination runs it (or this side resumes it after a failure).
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        let was_paused = *paused;
        let downtime = Instant::now();
        if !was_paused {
            self.pause_locked(&mut paused, Deadline::after(Duration::from_secs(5)))
                .map_err(|e| format!("cannot pause the VM: {e}"))?;
        }
        job.update(|st| st.phase = Phase::Stopped);
        let r = self.final_copy(opts, job, s);
        let r = r.and_then(|()| match job.cancel.load(SeqCst) {
            true => Err("cancelled".to_string()),
            false => Ok(()),
        });
        if let Err(e) = r {
            if !was_paused {
                self.resume_locked(&mut paused);
            }
            return Err(e);
        }
        // Commit: this side ends first, so the guest never runs twice. If
        // something else ended it meanwhile (a shutdown asked for, a
        // crash), the destination must not run it either.
        let url = opts.url.to_string();
        if !self.end.end(VmEnd::Migrated { to: url.clone() }) {
            return Err(format!(
                "the VM ended here during the switch ({}); not committed",
                self.ended().map_or_else(String::new, |e| e.to_string())
            ));
        }
        // Ended: nothing left for the lock to guard, and the API may read
        // the state meanwhile.
        drop(paused);
        s.send(Kind::Commit, &[&[was_paused as u8]]).map_err(|e| {
            format!("the Commit could not be sent to {url} ({e}): the VM has ended here and runs nowhere")
        })?;
        match s.recv() {
            Ok((Kind::Running, _, _)) => {}
            other => log::warn!("migration to {url}: no Running after Commit ({other:?})"),
        }
        Ok(downtime.elapsed())
    }

    /// Paused: the last dirty pages and the state, until the destination
    /// has restored it (Ready).
    fn final_copy(
        &self,
        opts: &MigrationOptions,
        job: &Outgoing,
        s: &mut Stream,
    ) -> Result<(), String> {
        let url = opts.url.to_string();
        let io = |e: std::io::Error| format!("sending to {url}: {e}");
        if !opts.local {
            let dirty = self.kvm.take_dirty_pages().map_err(|e| e.to_string())?;
            let bytes = self.send_pages(s, &dirty, true, &|| Ok(()))?;
            job.update(|st| st.bytes_sent += bytes);
        }
        let state = self
            .save_state()
            .map_err(|e| format!("saving the VM's state: {e}"))?;
        let bytes = file::encode(&state).map_err(|e| e.to_string())?;
        s.send(Kind::State, &[&bytes]).map_err(io)?;
        expect_ready(s, "the VM's state")
    }

    /// The pages worth sending first: all that may hold data.
    fn initial_pages(&self) -> Vec<Vec<u64>> {
        memory::regions(&self.kvm)
            .iter()
            .map(|r| {
                let touched = r.touched();
                let mut words = vec![0u64; touched.len().div_ceil(64)];
                for (i, t) in touched.into_iter().enumerate() {
                    if t {
                        words[i / 64] |= 1 << (i % 64);
                    }
                }
                words
            })
            .collect()
    }

    /// Mark `dirty` in vm-memory's bitmaps again (taken, but not sent).
    fn remember(&self, dirty: &[Vec<u64>]) {
        for (region, words) in self.kvm.memory().iter().zip(dirty) {
            let bitmap = vm_memory::MmapRegion::bitmap(region);
            for (w, &bits) in words.iter().enumerate() {
                for b in 0..64 {
                    if bits & (1 << b) != 0 {
                        bitmap.set_addr_range((w * 64 + b) * PAGE, PAGE);
                    }
                }
            }
        }
    }

    /// Send the pages set in `bitmaps` (one per region), in runs; zero
    /// runs as Zero messages when `zeros` (else skipped: the
    /// destination's RAM is zero there already). Returns bytes sent.
    fn send_pages(
        &self,
        s: &mut Stream,
        bitmaps: &[Vec<u64>],
        zeros: bool,
        check: &dyn Fn() -> Result<(), String>,
    ) -> Result<u64, String> {
        let mem = self.kvm.memory();
        let mut buf = vec![0u8; MAX_RUN_PAGES * PAGE];
        let mut sent = 0u64;
        for (region, words) in mem.iter().zip(bitmaps) {
            let base = region.start_addr().0;
            let pages = region.len() as usize / PAGE;
            let set = |i: usize| words.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0);
            let mut i = 0;
            while i < pages {
                if !set(i) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < pages && set(i) && i - start < MAX_RUN_PAGES {
                    i += 1;
                }
                check()?;
                let gpa = base + (start * PAGE) as u64;
                let run = &mut buf[..(i - start) * PAGE];
                mem.read_slice(run, GuestAddress(gpa))
                    .map_err(|e| format!("reading guest RAM at {gpa:#x}: {e}"))?;
                sent += send_run(s, gpa, run, zeros)?;
            }
        }
        Ok(sent)
    }
}

/// Wait for the destination's Ready (it took `what`).
fn expect_ready(s: &mut Stream, what: &str) -> Result<(), String> {
    match s.recv()? {
        (Kind::Ready, _, _) => Ok(()),
        (Kind::Abort, why, _) => Err(format!(
            "the destination refused {what}: {}",
            String::from_utf8_lossy(&why)
        )),
        (k, _, _) => Err(format!("the destination sent {k:?} instead of Ready")),
    }
}

/// One run of pages: the non-zero stretches as Pages, zero ones as Zero
/// (or nothing). Returns bytes sent.
fn send_run(s: &mut Stream, gpa: u64, run: &[u8], zeros: bool) -> Result<u64, String> {
    let io = |e: std::io::Error| format!("sending pages: {e}");
    let mut sent = 0;
    let pages: Vec<&[u8]> = run.chunks(PAGE).collect();
    let mut i = 0;
    while i < pages.len() {
        let zero = memory::is_zero(pages[i]);
        let start = i;
        while i < pages.len() && memory::is_zero(pages[i]) == zero {
            i += 1;
        }
        let at = gpa + (start * PAGE) as u64;
        let len = (i - start) * PAGE;
        if !zero {
            let data = &run[start * PAGE..i * PAGE];
            s.send(Kind::Pages, &[&at.to_le_bytes(), data])
                .map_err(io)?;
            sent += len as u64;
        } else if zeros {
            s.send(
                Kind::Zero,
                &[&at.to_le_bytes(), &(len as u64).to_le_bytes()],
            )
            .map_err(io)?;
            sent += 16;
        }
    }
    Ok(sent)
}

pub(crate) fn rate(bytes: u64, took: Duration) -> u64 {
    (bytes as f64 / took.as_secs_f64().max(1e-6)) as u64
}

/// The last pass's rate counts most; a tiny pass (few pages, high
/// overhead) does not swing the estimate.
fn rate_blend(old: u64, new: u64) -> u64 {
    (old / 2).saturating_add(new / 2).max(1)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
