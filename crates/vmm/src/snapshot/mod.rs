//! Snapshots: a paused VM written to a directory, and a VM restored from
//! one (in this process or a new one) that continues exactly there.
//!
//! A snapshot directory holds two files (docs/snapshot.md):
//! - `memory`: guest RAM, the regions one after another, holes where the
//!   pages read as zero; the restore maps it copy-on-write.
//! - `state`: a versioned, checksummed header and the [`SavedVm`] as JSON
//!   (see [`file`]).
//!
//! What is saved, and why it is enough: KVM's view of each vCPU and of
//! the VM ([`brisk_kvm::VcpuSnapshot`], [`brisk_kvm::VmSnapshot`]), every
//! device's versioned state, and the control plane's own share of the
//! guest: the interrupts raised but not yet injected (user irqchip) and
//! whether a vCPU sits halted in user space. The pause that precedes the
//! save completes any PIO/MMIO access that had exited (the control plane
//! settles it before parking), so no access is half-done in the state.

mod diff;
pub mod file;
mod live;
pub(crate) mod memory;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use brisk_control::Deadline;
use brisk_devices::{DeviceState, InterruptSink};
use brisk_kvm::{VcpuSnapshot, VmSnapshot};
use serde::{Deserialize, Serialize};

pub(crate) use diff::DirtyLogUse;
pub use diff::{merge, Layer, MergeError};
pub use live::LiveOptions;
pub use memory::MemoryWritten;

use crate::lifecycle::{HeldVm, Hold, Wait, HOLD_WAIT};
use crate::vm::{setup, Boot, Machine};
use crate::{Output, PauseError, RestoreError, StartError, Vm, VmConfig};

/// The memory files' names in a snapshot directory: `memory-` and 16 hex
/// digits, unique to each snapshot and named in its state file, so a
/// state file always goes with its own memory (a snapshot that fails
/// half-way leaves the previous pair intact).
pub const MEMORY_FILE_PREFIX: &str = "memory-";
/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// How long a snapshot waits for the vCPUs to park, and for each vCPU's
/// state to be read on its thread.
const PAUSE_BOUND: Duration = Duration::from_secs(5);

/// Everything but RAM: the state file's body.
#[derive(Serialize, Deserialize)]
pub struct SavedVm {
    /// The memory file beside it (`memory-` and 16 hex digits): all of
    /// RAM, or the base the diff `layers` go on.
    pub memory_file: String,
    /// Diff snapshots taken since the base, oldest first: each holds the
    /// pages written since the one below (`Vm::snapshot_diff`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<diff::Layer>,
    /// What the VM was built from (the restore builds the same).
    pub config: VmConfig,
    /// The RAM regions (guest address, bytes), in the memory file's order.
    pub regions: Vec<(u64, u64)>,
    pub vcpus: Vec<SavedVcpu>,
    pub vm: VmSnapshot,
    /// Every device's state by name (`DeviceManager::save`).
    pub devices: BTreeMap<String, DeviceState>,
}

/// One vCPU: KVM's state and the control plane's.
#[derive(Serialize, Deserialize)]
pub struct SavedVcpu {
    pub kvm: VcpuSnapshot,
    /// Halted in user space (user irqchip): it resumes halted.
    pub halted: bool,
    /// Vectors raised and not yet injected (user irqchip).
    pub pending: Vec<u8>,
}

/// Why a snapshot could not be taken. The VM is left as it was (running
/// or paused).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot pause the VM for a snapshot: {0}")]
    Pause(#[source] PauseError),
    #[error("reading vCPU {vcpu}'s state: {source}")]
    Vcpu {
        vcpu: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Kvm(#[from] brisk_kvm::Error),
    #[error("saving the VM failed (a brisk bug: the thread panicked); the VM goes on as it was")]
    Panicked,
    /// A diff snapshot of a VM that does not track its dirty pages.
    #[error("a diff snapshot needs a VM started with --track-dirty-pages")]
    NotTracking,
    /// No earlier snapshot of this VM there that the dirty log follows.
    #[error("a diff snapshot goes on this VM's last snapshot, which is not in that directory (take a full one there first)")]
    NoBase,
    /// A diff would stack more layers than a restore takes.
    #[error(
        "the snapshot has {0} diff layers already; merge them with brisk merge-snapshot first"
    )]
    TooManyLayers(usize),
    /// A live snapshot needs the dirty log an outgoing migration holds.
    #[error("a migration of this VM is in progress; a live snapshot waits for it to end")]
    MigrationInProgress,
    /// The destination is not one brisk writes a snapshot into.
    #[error("{}: {why}", path.display())]
    Destination { path: PathBuf, why: &'static str },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a snapshot wrote, and how long its parts took.
#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    pub dir: PathBuf,
    pub memory: MemoryWritten,
    /// From the call to every vCPU parked.
    pub pause: Duration,
    /// How long the guest was stopped (the whole save, for a VM that was
    /// running; zero for one that was paused already).
    pub stopped: Duration,
    /// From the call to both files in place.
    pub total: Duration,
}

/// How a restored VM starts.
#[derive(Clone, Copy, Debug, Default)]
pub struct RestoreOptions {
    /// Start paused (resume it through [`Vm::resume`] or the API).
    pub paused: bool,
    /// The seccomp policy of the new process's threads (not the saved one:
    /// it belongs to whoever restores).
    pub seccomp: crate::seccomp::Seccomp,
    /// The most guest RAM a snapshot or a migration's source may make
    /// this process map (`--max-memory`; `None`: the host's RAM).
    pub max_memory: Option<u64>,
    /// Open the disk images a snapshot or a source names (read-write
    /// unless saved read-only): only when whoever restores trusts where
    /// the state came from (`--trust-disk-paths`).
    pub trust_disk_paths: bool,
}

/// What a restore or a migration's destination accepts from a state it
/// did not make: RAM within [`RestoreOptions::max_memory`] (or the
/// host's RAM), and disk paths only when trusted, and never relative (they
/// would be resolved against wherever brisk happens to run).
pub fn check_trusted(config: &VmConfig, opts: &RestoreOptions) -> Result<(), StartError> {
    let max = opts.max_memory.unwrap_or_else(host_memory);
    if config.memory > max {
        return Err(RestoreError::TooMuchMemory {
            saved: config.memory,
            max,
        }
        .into());
    }
    for d in &config.disks {
        if d.path.is_relative() {
            return Err(RestoreError::RelativeDisk {
                path: d.path.clone(),
            }
            .into());
        }
        if !opts.trust_disk_paths {
            return Err(RestoreError::UntrustedDisk {
                path: d.path.clone(),
                readonly: d.readonly,
            }
            .into());
        }
    }
    Ok(())
}

/// A VM described by a snapshot or a source that cannot be built here (a
/// mapping a memory limit refuses, a memory file or memfd of the wrong
/// size) is that description's refusal (exit 6), not brisk's failure.
pub(crate) fn cannot_build_here(e: StartError, what: &'static str) -> StartError {
    use brisk_kvm::Error::{MemoryMap, MemorySize, State};
    match e {
        StartError::Setup { .. } | StartError::Kvm(MemoryMap(_) | MemorySize(_) | State(_)) => {
            RestoreError::CannotBuild {
                what,
                source: Box::new(e),
            }
            .into()
        }
        e => e,
    }
}

/// The host's physical RAM in bytes (u64::MAX if it cannot be told).
fn host_memory() -> u64 {
    // SAFETY: sysconf takes a constant and touches no memory of ours.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || size <= 0 {
        return u64::MAX;
    }
    (pages as u64).saturating_mul(size as u64)
}

impl Vm {
    /// Pause the VM (if running), save it to `dir` (created if missing;
    /// an earlier snapshot there is replaced), and leave it running or
    /// paused as it was.
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotInfo, SnapshotError> {
        let start = Instant::now();
        let mut held = self.hold_for_snapshot()?;
        // Whatever happens next, a diff taken later must not rest on a
        // snapshot that did not complete.
        self.set_diff_base(dir, String::new(), None);
        let (staged, pause, stopped) = self.while_stopped(&mut held, start, || {
            #[cfg(test)]
            tests::IN_SAVE.hit();
            self.save_paused(dir)
        })?;
        self.finish(dir, staged, start, pause, stopped)
    }

    /// Hold the VM for a snapshot, waiting for one in progress.
    pub(crate) fn hold_for_snapshot(&self) -> Result<HeldVm<'_>, SnapshotError> {
        self.hold(Hold::Snapshot, Wait::Until(Deadline::after(HOLD_WAIT)))
            .map_err(SnapshotError::Pause)
    }

    /// Run `save` with the guest stopped: paused first if it runs, and
    /// run again after (still held). A panic in it (a brisk bug) is an
    /// error, never a guest stopped for good. Returns its result, the
    /// time to the pause and the time stopped (zero for a VM paused
    /// already).
    pub(crate) fn while_stopped<T>(
        &self,
        held: &mut HeldVm<'_>,
        start: Instant,
        save: impl FnOnce() -> Result<T, SnapshotError>,
    ) -> Result<(T, Duration, Duration), SnapshotError> {
        let was_paused = held.was_paused();
        held.stop(Deadline::after(PAUSE_BOUND))
            .map_err(SnapshotError::Pause)?;
        let pause = start.elapsed();
        let saved = std::panic::catch_unwind(std::panic::AssertUnwindSafe(save))
            .unwrap_or(Err(SnapshotError::Panicked));
        held.run_again();
        let stopped = match was_paused {
            true => Duration::ZERO,
            false => start.elapsed(),
        };
        Ok((saved?, pause, stopped))
    }

    /// With the guest running again (the VM still held for the snapshot, so
    /// no other snapshot interleaves): `staged`'s files synced and put in
    /// place, then the memory files it replaced removed (their pages
    /// freed; a restored VM mapping one keeps its inode). This VM's next
    /// diff snapshot goes on it.
    fn finish(
        &self,
        dir: &Path,
        staged: Staged,
        start: Instant,
        pause: Duration,
        stopped: Duration,
    ) -> Result<SnapshotInfo, SnapshotError> {
        let (top, epoch) = (staged.state.top_file().to_string(), staged.diff_epoch);
        let (memory, replaced) = install(dir, staged)?;
        for old in replaced {
            let _ = std::fs::remove_file(old);
        }
        self.set_diff_base(dir, top, epoch);
        Ok(SnapshotInfo {
            dir: dir.to_path_buf(),
            memory,
            pause,
            stopped,
            total: start.elapsed(),
        })
    }

    /// The state of a paused VM (every vCPU parked). User-irqchip timers
    /// are frozen meanwhile, so the ticks they counted and the interrupts
    /// pending agree.
    pub(crate) fn save_state(&self) -> Result<SavedVm, SnapshotError> {
        /// Thaws the timers however the reading ends (a panic included).
        struct Frozen<'a>(Option<&'a brisk_devices::PeriodicTimers>);
        impl Drop for Frozen<'_> {
            fn drop(&mut self) {
                if let Some(t) = self.0 {
                    t.thaw();
                }
            }
        }
        let timers = self.irq.as_ref().and_then(|i| i.timers.as_ref());
        if let Some(t) = timers {
            t.freeze();
        }
        let _thaw = Frozen(timers);
        self.collect_state()
    }

    fn collect_state(&self) -> Result<SavedVm, SnapshotError> {
        self.kvm.check_xsave_fits()?;
        let msrs = self.kvm.msr_index_list()?;
        // Devices and the VM's irqchip/PIT first, then the vCPUs: an
        // interrupt raised in between (console input, the in-kernel PIT)
        // is then in both (a spurious one after the restore) rather than
        // in the device's state only (a lost one).
        // The irqchip read below first delivers what the devices pulled
        // through irqfds up to then (brisk_kvm::Vm::save_state).
        let devices = self.devices.save();
        let vm = self.kvm.save_state()?;
        let mut vcpus = Vec::new();
        for ctl in &self.vcpus {
            let id = ctl.id();
            let fail = |source: Box<dyn std::error::Error + Send + Sync>| SnapshotError::Vcpu {
                vcpu: id,
                source,
            };
            let index = msrs.clone();
            let memory = self.kvm.memory().clone();
            let (kvm, ran_hlt) = ctl
                .run_on(
                    move |v| {
                        // Parking settles an exited PIO/MMIO access, but a
                        // string I/O can outlast its bound: its completion
                        // lives in KVM only, so it cannot be saved.
                        if v.io_pending() {
                            return Err(brisk_kvm::Error::State(
                                "it is in the middle of an I/O instruction; try again".into(),
                            ));
                        }
                        v.save_state(&index, &memory)
                    },
                    Deadline::after(PAUSE_BOUND),
                )
                .map_err(|e| fail(Box::new(e)))?
                .map_err(|e| fail(Box::new(e)))?;
            // A HLT run from its STI shadow halts where the HLT does: in
            // KVM with its irqchip (mp_state), else in user space.
            let halted = ctl
                .halted_while_parked()
                .ok_or_else(|| fail("it is not parked".into()))?
                || (ran_hlt && kvm.lapic.is_none());
            let pending = self
                .pending_interrupts(id)
                .map(|p| p.pending_vectors())
                .unwrap_or_default();
            vcpus.push(SavedVcpu {
                kvm,
                halted,
                pending,
            });
        }
        Ok(SavedVm {
            memory_file: new_memory_file_name(),
            layers: Vec::new(),
            config: self.config(),
            regions: brisk_boot::layout::ram_regions(self.memory_size()),
            vcpus,
            vm,
            devices,
        })
    }

    /// What must be done while the guest is stopped: read the state and
    /// write guest RAM into a temporary file ([`install`] does the rest).
    fn save_paused(&self, dir: &Path) -> Result<Staged, SnapshotError> {
        check_destination(dir)?;
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(io("cannot create the snapshot directory", dir))?;
        let earlier = earlier_files(dir);
        remove_stale_temp_files(dir);
        let state = self.save_state()?;
        let mem = dir.join(&state.memory_file);
        // SAFETY: the VM is paused (every vCPU parked), and no device
        // writes guest RAM while it is (they write from vCPU threads).
        let (memory, written) = unsafe { memory::write(&self.kvm, &mem) }
            .map_err(io("cannot write guest memory to", &mem))?;
        // Tracked: a diff taken next holds what is written from here.
        let diff_epoch = self.take_dirty_for_snapshot()?.map(|(_, e)| e);
        Ok(Staged {
            state,
            memory,
            written,
            earlier,
            created,
            diff_epoch,
        })
    }

    /// Build a VM from the snapshot in `dir` and start it, paused or
    /// running as `opts` says. A state file of another format version, cut
    /// short, corrupt, or not matching its memory file is refused with one
    /// sentence ([`StartError::Snapshot`]) before anything is built; a
    /// state KVM refuses ends the new VM (never a half-restored one runs).
    pub fn restore(dir: &Path, output: Output, opts: RestoreOptions) -> Result<Vm, StartError> {
        let (state, mem) = read_snapshot(dir)?;
        check_trusted(&state.config, &opts)?;
        let layers = diff::open_layers(dir, &state)?;
        Self::from_state(state, output, opts, Boot::Restore(&mem), &layers)
    }

    /// Build and start a VM whose RAM `boot` provides, in `state`.
    pub(crate) fn from_state(
        mut state: SavedVm,
        output: Output,
        opts: RestoreOptions,
        boot: Boot<'_>,
        layers: &[diff::OpenLayer],
    ) -> Result<Vm, StartError> {
        state.config.seccomp = opts.seccomp;
        check_state(&state)?;
        let m = Machine::assemble(&state.config, output, boot)
            .map_err(|e| cannot_build_here(e, "the saved VM"))?;
        diff::apply_layers(&m.kvm, layers)?;
        Self::restore_into(m, state, opts)
    }

    /// Put `state` into `m` (built from `state.config`, RAM already
    /// filled) and start it.
    pub(crate) fn restore_into(
        m: Machine,
        state: SavedVm,
        opts: RestoreOptions,
    ) -> Result<Vm, StartError> {
        check_state(&state)?;
        if m.vcpus.len() != state.vcpus.len() {
            return Err(RestoreError::VcpuCount {
                saved: state.vcpus.len(),
                configured: m.vcpus.len(),
            }
            .into());
        }
        let refused = |e: brisk_kvm::Error| StartError::from(RestoreError::Kvm(e));
        let t = Instant::now();
        m.kvm.check_xsave_fits()?;
        // The guest's clocks move on by the time since the save, together.
        let advance = m.kvm.restore_state(&state.vm).map_err(refused)?;
        log::debug!("restore: VM state in {:?}", t.elapsed());
        m.devices
            .restore(&state.devices)
            .map_err(RestoreError::from)?;
        let sink = m.irq_sink();
        let mut saved = state.vcpus.into_iter();
        let vm = Vm::run_machine(m, |v, ctl| {
            let s = saved.next().expect("checked: one state per vCPU");
            v.restore_state(&s.kvm, advance).map_err(refused)?;
            if s.halted {
                ctl.start_halted();
            }
            if opts.paused {
                ctl.start_paused();
            }
            if let Some(sink) = &sink {
                for vector in &s.pending {
                    sink.raise(v.id(), *vector);
                }
            }
            Ok(())
        })?;
        // Every LAPIC is restored now: a line a device pulled while the VM
        // was put back (the UART's restore does) may have been overwritten
        // by KVM_SET_LAPIC. The devices' own state says what is pending:
        // pull those lines again (a spurious interrupt is harmless, a lost
        // one hangs a driver).
        vm.devices.reassert_interrupts();
        if opts.paused {
            // Return once every vCPU (each started paused) has parked,
            // so what follows (a snapshot, say) finds a paused VM, not
            // one still on its way. Never resumed on failure (as a pause
            // would): a migration's destination must not run the guest
            // before the source commits.
            let deadline = Deadline::after(PAUSE_BOUND);
            let parked = brisk_control::pause_all(vm.vcpus().iter().map(|v| &**v), deadline)
                .map_err(PauseError::Control)
                .and_then(|()| vm.quiesce_io(deadline).map_err(PauseError::Io));
            parked.map_err(|e| RestoreError::DidNotPark(Box::new(e)))?;
            vm.life.paused_at_start();
        } else {
            vm.release_io();
        }
        log::debug!("restore: vCPUs and devices in {:?}", t.elapsed());
        Ok(vm)
    }
}

/// The state and memory file of the snapshot in `dir`, checked against
/// each other.
pub fn read_snapshot(dir: &Path) -> Result<(SavedVm, std::fs::File), StartError> {
    if !dir.is_dir() {
        return Err(RestoreError::NotADirectory(dir.into()).into());
    }
    let state: SavedVm = file::read(&dir.join(STATE_FILE))?;
    if !is_memory_file_name(&state.memory_file) {
        let shown = state.memory_file.chars().take(64).collect();
        return Err(RestoreError::MemoryFileName(shown).into());
    }
    let path = dir.join(&state.memory_file);
    // Never a blocking open (a FIFO there would hang the restore), never
    // through a symlink out of the directory.
    let mem = file::open_regular(&path)?;
    let len = mem
        .metadata()
        .map_err(setup("reading the memory file's size"))?
        .len();
    let want: u64 = state.regions.iter().map(|r| r.1).sum();
    if len != want {
        return Err(RestoreError::MemoryFileSize { path, len, want }.into());
    }
    Ok((state, mem))
}

/// Kernel file systems a snapshot never goes into (statfs's `f_type`):
/// writing there is a side effect on the host (a cgroup made, a tracing
/// knob turned), never a snapshot. devtmpfs reads as tmpfs, so /dev is
/// told by its device instead.
const KERNEL_FILE_SYSTEMS: [i64; 13] = [
    0x9fa0,      // proc
    0x6265_6572, // sysfs
    0x0027_e0eb, // cgroup
    0x6367_7270, // cgroup2
    0x6462_6720, // debugfs
    0x7472_6163, // tracefs
    0x1cd1,      // devpts
    0x1980_0202, // mqueue
    0x7363_6673, // securityfs
    0xcafe_4a11, // bpf
    0x6165_676c, // pstore
    0xde5e_81e4, // efivarfs
    0x6265_6570, // configfs
];

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { what, path, source }
}

/// A snapshot written while the guest was stopped, not yet in place.
struct Staged {
    state: SavedVm,
    /// Guest RAM, in a temporary file beside its final name.
    memory: memory::TempFile,
    written: MemoryWritten,
    /// The memory files of the snapshot this one replaces (brisk's):
    /// those the new state does not name go once it is in place.
    earlier: Vec<String>,
    /// The directory was made for it (its own name must be synced too).
    created: bool,
    /// The dirty log's epoch when its bits were taken, stopped (a VM that
    /// tracks dirty pages): the next diff may go on this snapshot.
    diff_epoch: Option<u64>,
}

/// Put a staged snapshot in place durably: the memory file synced and
/// renamed, the directory synced, then the state naming it the same way.
/// A host crash at any point leaves one whole snapshot: the state names
/// only a memory file already on disk, and the replaced memory file
/// (returned, for the caller to remove) goes only after both.
fn install(dir: &Path, staged: Staged) -> Result<(MemoryWritten, Vec<PathBuf>), SnapshotError> {
    let Staged {
        state,
        memory,
        written,
        earlier,
        created,
        diff_epoch: _,
    } = staged;
    if created {
        memory::sync_dir(dir).map_err(io("cannot sync the directory holding", dir))?;
    }
    // The file this snapshot adds (the memory file, or a diff's layer):
    // the one a failure from here removes, never one the old state names.
    let mem = memory.path().to_path_buf();
    let state_path = dir.join(STATE_FILE);
    let unwind = |e: SnapshotError| {
        let _ = std::fs::remove_file(&mem);
        e
    };
    memory
        .install()
        .map_err(io("cannot write guest memory to", &mem))?;
    memory::sync_dir(&mem)
        .map_err(io("cannot sync the snapshot directory", dir))
        .map_err(unwind)?;
    file::write_versioned(&state_path, &state, state.format_version())
        .map_err(io("cannot write the state file", &state_path))
        .map_err(unwind)?;
    // The state is in place and names the new memory file: from here
    // nothing is removed. A failed sync is reported, and the earlier
    // memory file is kept.
    memory::sync_dir(&state_path).map_err(io(
        "the snapshot is in place, but this directory could not be synced",
        dir,
    ))?;
    let replaced = earlier
        .into_iter()
        .filter(|n| !state.files().any(|f| f == n))
        .map(|n| dir.join(n))
        .collect();
    Ok((written, replaced))
}

/// The memory files the snapshot in `dir` uses (brisk's names only).
fn earlier_files(dir: &Path) -> Vec<String> {
    file::read::<SavedVm>(&dir.join(STATE_FILE))
        .map(|s| {
            s.files()
                .filter(|n| is_memory_file_name(n))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

impl SavedVm {
    /// The oldest state file format that holds it: 1 without diff layers,
    /// so a brisk (or a migration destination) of that format reads it.
    pub fn format_version(&self) -> u32 {
        if self.layers.is_empty() {
            file::OLDEST_FORMAT_VERSION
        } else {
            file::FORMAT_VERSION
        }
    }

    /// Every memory file it uses: the base, then its diff layers.
    pub fn files(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.memory_file.as_str())
            .chain(self.layers.iter().map(|l| l.file.as_str()))
    }

    /// The newest of them (what a diff taken next goes on).
    pub fn top_file(&self) -> &str {
        self.layers.last().map_or(&self.memory_file, |l| &l.file)
    }
}

/// Refuse a snapshot destination that is not brisk's to write, before
/// anything is created there: the root directory, a kernel file system
/// (`/dev`, `/proc`, `/sys` and what is mounted under them), or a
/// directory whose `state` is not a brisk state file (it would be
/// replaced).
fn check_destination(dir: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::MetadataExt;
    let refused = |why| SnapshotError::Destination {
        path: dir.to_path_buf(),
        why,
    };
    // The nearest part of the path that exists: what a mkdir would write
    // into.
    let mut existing = dir;
    while std::fs::symlink_metadata(existing).is_err() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => break,
        }
    }
    // By identity, not by name (no path resolution: the API thread's
    // filter allows no readlink).
    let id = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    let here = id(existing).map_err(|source| SnapshotError::Io {
        what: "cannot read the snapshot directory",
        path: existing.to_path_buf(),
        source,
    })?;
    if existing == dir && id(Path::new("/")).is_ok_and(|r| r == here) {
        return Err(refused("brisk writes no snapshot into the root directory"));
    }
    let on_dev = id(Path::new("/dev")).is_ok_and(|(dev, _)| dev == here.0);
    let under = ["/dev", "/proc", "/sys"]
        .iter()
        .any(|top| dir.starts_with(top));
    if under || on_dev || file_system(existing).is_some_and(|t| KERNEL_FILE_SYSTEMS.contains(&t)) {
        return Err(refused(
            "brisk writes no snapshot into a kernel file system (/dev, /proc, /sys, cgroups, ...)",
        ));
    }
    let state = dir.join(STATE_FILE);
    match std::fs::symlink_metadata(&state) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Ok(m) if m.is_file() && file::has_magic(&state) => Ok(()),
        _ => Err(SnapshotError::Destination {
            path: state,
            why: "exists and is not a brisk state file; brisk replaces only its own snapshots",
        }),
    }
}

/// The type of the file system `p` is on (statfs's `f_type`).
fn file_system(p: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: a zeroed statfs is valid to be filled in.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_type as i64)
}

/// Remove the temporary files (`.memory-HEX.PID.tmp`, `.state.PID.tmp`)
/// a brisk that was killed mid-snapshot left in `dir`: only names brisk
/// makes, and only of processes that are gone.
fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((file, pid)) = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(|n| n.rsplit_once('.'))
        else {
            continue;
        };
        let ours = file == STATE_FILE || is_memory_file_name(file);
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        let gone = !Path::new("/proc").join(pid.to_string()).exists();
        if ours && gone && e.file_type().is_ok_and(|t| t.is_file()) {
            log::info!(
                "removing {name}, left by a brisk (pid {pid}) that did not finish its snapshot"
            );
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// `memory-` and 16 hex digits: a name brisk made (and may remove).
pub fn is_memory_file_name(n: &str) -> bool {
    n.strip_prefix(MEMORY_FILE_PREFIX)
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A new memory file name, unique for the directory (random: std's
/// hasher keys come from the OS's random source, plus the time).
fn new_memory_file_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    format!("{MEMORY_FILE_PREFIX}{:016x}", h.finish())
}

/// What must hold before a VM is built from `state` (pure: no KVM, no
/// files; the fuzz target drives it).
pub fn check_state(state: &SavedVm) -> Result<(), StartError> {
    let c = &state.config;
    c.validate().map_err(RestoreError::Config)?;
    if state.regions != brisk_boot::layout::ram_regions(c.memory) {
        return Err(RestoreError::Regions.into());
    }
    if state.vcpus.len() != c.cpus {
        return Err(RestoreError::VcpuCount {
            saved: state.vcpus.len(),
            configured: c.cpus,
        }
        .into());
    }
    let user = c.irqchip == brisk_kvm::Irqchip::User;
    if state
        .vcpus
        .iter()
        .any(|v| !user && (v.halted || !v.pending.is_empty()))
    {
        return Err(RestoreError::UserStateForKernelIrqchip.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failpoint::{spin_vm, Failpoint};

    pub(super) static IN_SAVE: Failpoint = Failpoint::new("a snapshot's save");

    /// A panic while a snapshot holds the VM paused leaves it running as
    /// it was (wave2 review #7: it stayed paused, and the API answered
    /// "busy" for good).
    #[test]
    fn a_panicking_save_leaves_the_vm_as_it_was() {
        crate::require_kvm!();
        let vm = spin_vm();
        let dir = std::env::temp_dir().join(format!("brisk-panic-snap-{}", std::process::id()));
        IN_SAVE.arm();
        assert!(matches!(vm.snapshot(&dir), Err(SnapshotError::Panicked)));
        assert!(!vm.is_paused());
        let soon = || Deadline::after(Duration::from_secs(5));
        vm.try_pause(soon()).unwrap();
        vm.try_resume().unwrap();
        vm.snapshot(&dir).unwrap();
        vm.shutdown().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
