//! The source side: pre-copy with KVM's dirty log, then stop-and-copy.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use brisk_control::Deadline;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::wire::{
    never, printable, Bound, Kind, Message, MigrationUrl, Stream, WireError, MAX_RUN_PAGES,
    PARTING_BOUND, PROTOCOL_VERSION,
};
use super::{Hello, MigrationError, MigrationOptions, MigrationStatus, Phase};
use crate::lifecycle::{Hold, Wait, HOLD_WAIT};
use crate::snapshot::{file, memory};
use crate::{Vm, VmEnd};

const PAGE: usize = memory::PAGE;

/// How much longer than its downtime budget (or, forced, than the
/// estimated copy) the guest may stay stopped waiting for the destination:
/// then the source resumes it and reports, whatever the destination does.
pub const SWITCH_GRACE: Duration = Duration::from_secs(5);

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

    /// Wait for the worker thread to be done, from any number of threads.
    /// Bounded: once cancelled, the thread's every wait (connect, each
    /// message) gives up within a slice of the stream (100 ms), and its
    /// other steps (pause, state) have deadlines of their own.
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
        if self
            .dirty_use
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .live
        {
            return Err(MigrationError::LiveSnapshot);
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
                // A panic (a brisk bug) fails the migration rather than
                // leave it "in progress" for good.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    vm.migrate(&opts, &job)
                }))
                .unwrap_or_else(|_| Err(SendError::Panicked));
                job.update(|s| {
                    s.total_ms = ms(start.elapsed());
                    match r {
                        Ok(downtime) => {
                            s.phase = Phase::Completed;
                            s.downtime_ms = Some(ms(downtime));
                        }
                        Err(e) if job.cancel.load(SeqCst) => {
                            s.phase = Phase::Cancelled;
                            s.error = Some(e.to_string());
                        }
                        Err(e) => {
                            s.phase = Phase::Failed;
                            s.error = Some(e.to_string());
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

    /// Whether the migration should stop: cancelled (the API, a signal's
    /// shutdown) or the VM ended here.
    fn stopping(&self, job: &Outgoing) -> bool {
        job.cancel.load(SeqCst) || self.ended().is_some()
    }

    /// The whole migration; Ok(downtime).
    fn migrate(&self, opts: &MigrationOptions, job: &Outgoing) -> Result<Duration, SendError> {
        let url = opts.url.to_string();
        self.dirty_log_taken_elsewhere();
        let stopping = || self.stopping(job);
        let mut s = Stream::connect(&opts.url, &stopping)
            .map_err(wire_err(&format!("cannot connect to {url}")))?;
        let hello = serde_json::to_vec(&Hello {
            version: PROTOCOL_VERSION,
            config: self.config(),
            local: opts.local,
        })
        .map_err(SendError::Hello)?;
        let bound = Bound::message(&stopping, None);
        let sent = match (opts.local, self.kvm.shared_memory()) {
            (true, Some(mem)) => {
                use std::os::fd::AsRawFd;
                s.send_with_fd(Kind::Hello, &hello, mem.as_raw_fd(), &bound)
            }
            _ => s.send(Kind::Hello, &[&hello], &bound),
        };
        sent.map_err(wire_err(&url))?;
        let r = expect_ready(
            &mut s,
            "the VM's configuration",
            &Bound::message(&stopping, None),
        )
        .and_then(|()| {
            // A panic (a brisk bug) still gets the cleanup below: the
            // Abort, and the dirty log turned off.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.copy_and_switch(opts, job, &mut s)
            }))
            .unwrap_or_else(|_| Err(SendError::Panicked))
        });
        if let Err(why) = &r {
            // Best effort, briefly: the destination exits either way once
            // the stream closes.
            let _ = s.send(
                Kind::Abort,
                &[why.to_string().as_bytes()],
                &Bound::within(PARTING_BOUND, &never),
            );
        }
        // A VM tracking its dirty pages keeps the log (its next diff
        // snapshot has no base now: the copy took the bits).
        if !self.config().track_dirty_pages {
            let _ = self.kvm.set_dirty_log(false);
        }
        r
    }

    fn copy_and_switch(
        &self,
        opts: &MigrationOptions,
        job: &Outgoing,
        s: &mut Stream,
    ) -> Result<Duration, SendError> {
        let started = Instant::now();
        let check = || -> Result<(), SendError> {
            if job.cancel.load(SeqCst) {
                return Err(SendError::Cancelled);
            }
            if self.ended().is_some() {
                return Err(SendError::Ended);
            }
            if started.elapsed() > opts.timeout && !opts.force_on_timeout {
                return Err(SendError::NoConvergence(opts.timeout.as_secs()));
            }
            Ok(())
        };
        let forced = || opts.force_on_timeout && started.elapsed() > opts.timeout;
        // The last dirty set's estimated copy time: the stop may take it.
        let mut last_estimate = Duration::ZERO;
        if !opts.local {
            self.kvm.set_dirty_log(true)?;
            job.update(|st| st.phase = Phase::Copying);
            // Pass 0: every page the guest may have touched (the
            // destination's RAM starts as zeros).
            let t = Instant::now();
            let first = memory::touched_bitmaps(&self.kvm);
            let bytes = self.send_pages(s, &first, false, &check, None, job)?;
            let mut rate = rate(bytes, t.elapsed());
            job.update(|st| {
                st.bytes_sent += bytes;
                st.rate_bytes_per_s = rate;
            });
            loop {
                check()?;
                let dirty = self.kvm.take_dirty_pages()?;
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
                last_estimate = estimate;
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
                let bytes = self.send_pages(s, &dirty, true, &check, None, job)?;
                rate = rate_blend(rate, super::send::rate(bytes, t.elapsed()));
                job.update(|st| {
                    st.iteration += 1;
                    st.bytes_sent += bytes;
                    st.rate_bytes_per_s = rate;
                });
            }
        }
        check()?;
        // The bulk of the disks' write-back, while the guest still runs.
        crate::disk_lock::flush(&self.config().disks).map_err(SendError::Flush)?;
        // Stop and copy: from here the guest runs nowhere until the
        // destination runs it (or this side resumes it after a failure).
        let mut held = self
            .hold(Hold::Migration, Wait::Until(Deadline::after(HOLD_WAIT)))
            .map_err(SendError::Pause)?;
        let was_paused = held.was_paused();
        let downtime = Instant::now();
        held.stop(Deadline::after(Duration::from_secs(5)))
            .map_err(SendError::Pause)?;
        job.update(|st| st.phase = Phase::Stopped);
        // However the destination behaves, the guest is stopped here for
        // at most this long before it resumes here.
        // The estimate comes from the rate the destination chose to read
        // at: capped by the migration's own timeout, so a slow reader
        // cannot buy itself minutes of a stopped guest.
        let allowed = opts.downtime.max(last_estimate.min(opts.timeout)) + SWITCH_GRACE;
        // A panic while the guest is stopped (a brisk bug) resumes it here
        // like any other failure.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            #[cfg(test)]
            tests::WHILE_STOPPED.hit();
            self.final_copy(opts, job, s, downtime + allowed)
        }))
        .unwrap_or_else(|_| Err(Stop::Failed(SendError::Panicked)));
        let r = r.map_err(|e| match e {
            Stop::Late => SendError::Late {
                allowed_ms: allowed.as_millis(),
                grace_s: SWITCH_GRACE.as_secs(),
            },
            Stop::Failed(e) => e,
        });
        let r = r.and_then(|()| match job.cancel.load(SeqCst) {
            true => Err(SendError::Cancelled),
            false => Ok(()),
        });
        // On failure the guard resumes the guest here.
        r?;
        // Commit: this side ends first, so the guest never runs twice. If
        // something else ended it meanwhile (a shutdown asked for, a
        // crash), the destination must not run it either.
        let url = opts.url.to_string();
        if !self.life.end(VmEnd::Migrated { to: url.clone() }) {
            return Err(SendError::EndedDuringSwitch(self.ended()));
        }
        // Ended: the hold is over (the guard resumes nothing now). Its
        // disks are the destination's to lock now (on one host, the same
        // images).
        drop(held);
        self.disk_locks.release();
        // Ended here: neither a cancel nor the shutdown that follows may
        // stop the Commit now; only its bound does.
        let bound = Bound::within(SWITCH_GRACE, &never);
        s.send(Kind::Commit, &[&[was_paused as u8]], &bound)
            .map_err(|source| SendError::Commit {
                url: url.clone(),
                source,
            })?;
        match s.recv(&bound) {
            Ok(Message {
                kind: Kind::Running,
                ..
            }) => {}
            Ok(m) => log::warn!(
                "migration to {url}: {:?} instead of Running after Commit",
                m.kind
            ),
            Err(e) => log::warn!("migration to {url}: no Running after Commit ({e})"),
        }
        Ok(downtime.elapsed())
    }

    /// Paused: the last dirty pages and the state, until the destination
    /// has restored it (Ready), all by `until`.
    fn final_copy(
        &self,
        opts: &MigrationOptions,
        job: &Outgoing,
        s: &mut Stream,
        until: Instant,
    ) -> Result<(), Stop> {
        let url = opts.url.to_string();
        let stopping = || self.stopping(job);
        let late = |e: SendError| match Instant::now() >= until {
            true => Stop::Late,
            false => Stop::Failed(e),
        };
        if !opts.local {
            let dirty = self
                .kvm
                .take_dirty_pages()
                .map_err(|e| Stop::Failed(e.into()))?;
            let bytes = self
                .send_pages(s, &dirty, true, &|| Ok(()), Some(until), job)
                .map_err(late)?;
            job.update(|st| st.bytes_sent += bytes);
        }
        // Stopped, no request in flight: every write the guest made to its
        // disks goes to storage before the destination may run it (little
        // is left: they were flushed once before the stop).
        crate::disk_lock::flush(&self.config().disks)
            .map_err(|e| Stop::Failed(SendError::Flush(e)))?;
        if Instant::now() >= until {
            return Err(Stop::Late);
        }
        let state = self
            .save_state()
            .map_err(|e| Stop::Failed(SendError::State(Box::new(e))))?;
        let bytes = file::encode_versioned(&state, state.format_version())
            .map_err(|e| Stop::Failed(SendError::Encode(e)))?;
        s.send(
            Kind::State,
            &[&bytes],
            &Bound::message(&stopping, Some(until)),
        )
        .map_err(|e| late(wire_err(&url)(e)))?;
        expect_ready(s, "the VM's state", &Bound::message(&stopping, Some(until))).map_err(late)
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
        check: &dyn Fn() -> Result<(), SendError>,
        until: Option<Instant>,
        job: &Outgoing,
    ) -> Result<u64, SendError> {
        let stopping = || self.stopping(job);
        let mem = self.kvm.memory();
        let mut buf = vec![0u8; MAX_RUN_PAGES * PAGE];
        let mut sent = 0u64;
        for r in memory::runs(&self.kvm, bitmaps, MAX_RUN_PAGES) {
            check()?;
            let gpa = r.gpa;
            let run = &mut buf[..r.pages * PAGE];
            mem.read_slice(run, GuestAddress(gpa))
                .map_err(|source| SendError::Memory { gpa, source })?;
            sent += send_run(s, gpa, run, zeros, &stopping, until)?;
        }
        Ok(sent)
    }
}

/// How the stopped phase failed: too late (the guest resumes here, and
/// the note says why), or otherwise.
enum Stop {
    Late,
    Failed(SendError),
}

/// Why an outgoing migration failed: its status's `error` says this.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cancelled")]
    Cancelled,
    #[error("the VM ended")]
    Ended,
    #[error("did not converge within {0} s (the guest dirties memory faster than it can be sent); the VM keeps running here")]
    NoConvergence(u64),
    /// The stream failed: connecting, sending, waiting for an answer.
    #[error("{context}: {source}")]
    Wire {
        context: String,
        #[source]
        source: WireError,
    },
    /// The destination sent Abort instead of Ready (its words, printable).
    #[error("the destination refused {what}: {why}")]
    Refused { what: String, why: String },
    #[error("the destination sent {0:?} instead of Ready")]
    Unexpected(Kind),
    #[error("the VM's configuration cannot be sent: {0}")]
    Hello(#[source] serde_json::Error),
    #[error(transparent)]
    Kvm(#[from] brisk_kvm::Error),
    #[error("flushing the disk images: {0}")]
    Flush(#[source] std::io::Error),
    #[error("cannot pause the VM: {0}")]
    Pause(#[source] crate::PauseError),
    #[error("reading guest RAM at {gpa:#x}: {source}")]
    Memory {
        gpa: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("saving the VM's state: {0}")]
    State(#[source] Box<crate::SnapshotError>),
    #[error("encoding the VM's state: {0}")]
    Encode(#[source] std::io::Error),
    #[error("the destination did not take the VM within {allowed_ms} ms of the pause (the downtime budget, or the estimated copy, plus {grace_s} s); the VM resumed here")]
    Late { allowed_ms: u128, grace_s: u64 },
    #[error("the VM ended here during the switch ({}); not committed", .0.as_ref().map_or(String::new(), |e| e.to_string()))]
    EndedDuringSwitch(Option<VmEnd>),
    #[error(
        "the Commit could not be sent to {url} ({source}): the VM has ended here and runs nowhere"
    )]
    Commit {
        url: String,
        #[source]
        source: WireError,
    },
    #[error("the migration thread panicked (a brisk bug)")]
    Panicked,
}

/// A stream failure as the migration's status says it: a cancel as
/// such, anything else after `context`.
fn wire_err(context: &str) -> impl Fn(WireError) -> SendError + '_ {
    move |e| match e {
        WireError::Cancelled => SendError::Cancelled,
        source => SendError::Wire {
            context: context.into(),
            source,
        },
    }
}

/// Wait for the destination's Ready (it took `what`).
fn expect_ready(s: &mut Stream, what: &str, bound: &Bound) -> Result<(), SendError> {
    let m = s.recv(bound).map_err(wire_err(&format!(
        "waiting for the destination to take {what}"
    )))?;
    match m.kind {
        Kind::Ready => Ok(()),
        Kind::Abort => Err(SendError::Refused {
            what: what.into(),
            why: printable(&m.body),
        }),
        k => Err(SendError::Unexpected(k)),
    }
}

/// One run of pages: the non-zero stretches as Pages, zero ones as Zero
/// (or nothing), each message within its bound. Returns bytes sent.
fn send_run(
    s: &mut Stream,
    gpa: u64,
    run: &[u8],
    zeros: bool,
    stopping: &dyn Fn() -> bool,
    until: Option<Instant>,
) -> Result<u64, SendError> {
    let io = wire_err("sending pages");
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
            let bound = Bound::message(stopping, until);
            s.send(Kind::Pages, &[&at.to_le_bytes(), data], &bound)
                .map_err(&io)?;
            sent += len as u64;
        } else if zeros {
            let bound = Bound::message(stopping, until);
            s.send(
                Kind::Zero,
                &[&at.to_le_bytes(), &(len as u64).to_le_bytes()],
                &bound,
            )
            .map_err(&io)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failpoint::{spin_vm, Failpoint};

    pub(super) static WHILE_STOPPED: Failpoint = Failpoint::new("a migration's stopped phase");

    /// A panic while the migration holds the guest stopped fails the
    /// migration and resumes the guest here (wave2 review #7: it stayed
    /// paused, and the migration "in progress", for good).
    #[test]
    fn a_panicking_migration_resumes_the_guest() {
        crate::require_kvm!();
        let vm = Arc::new(spin_vm());
        let sock = std::env::temp_dir().join(format!("brisk-panic-mig-{}", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let url = MigrationUrl::Unix(sock.clone());
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let destination = std::thread::spawn(move || {
            // Takes the Hello and answers Ready; then only reads.
            let (mut c, _) = listener.accept().unwrap();
            use std::io::{Read, Write};
            let mut head = [0u8; 16];
            c.read_exact(&mut head).unwrap();
            let len = u64::from_le_bytes(head[8..16].try_into().unwrap());
            let mut body = vec![0u8; len as usize];
            c.read_exact(&mut body).unwrap();
            let mut ready = [0u8; 16];
            ready[0] = Kind::Ready as u8;
            c.write_all(&ready).unwrap();
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
        });
        WHILE_STOPPED.arm();
        vm.send_migration(MigrationOptions::new(url)).unwrap();
        let status = vm.wait_migration().unwrap();
        assert_eq!(status.phase, Phase::Failed, "{status:?}");
        assert!(status.error.unwrap().contains("panicked"));
        assert!(!vm.is_paused() && vm.ended().is_none());
        destination.join().unwrap();
        let _ = std::fs::remove_file(&sock);
        let soon = || Deadline::after(Duration::from_secs(5));
        vm.try_pause(soon()).unwrap();
        vm.try_resume().unwrap();
        Arc::try_unwrap(vm).ok().unwrap().shutdown().unwrap();
    }
}
