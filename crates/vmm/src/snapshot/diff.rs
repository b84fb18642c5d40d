//! Diff snapshots (Firecracker's): only the pages written since this VM's
//! previous snapshot in the same directory, as a layer on top of it.
//!
//! A VM started with `track_dirty_pages` keeps KVM's dirty log on (and
//! vm-memory's bitmap, for what devices write); every snapshot drains it
//! while the guest is stopped, so what it holds afterwards is exactly
//! what the guest and its devices wrote since. A diff snapshot writes
//! those pages into a new layer file (zero pages as holes) and a state
//! whose `layers` list it, with the page runs it covers, above the base
//! memory file and any earlier layers. A restore maps the base
//! copy-on-write, then reads each layer's runs over it in order; `merge`
//! folds a directory's layers into one full memory file again.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::memory::{self, MemoryWritten, PAGE};
use super::{
    check_destination, file, install, io, is_memory_file_name, new_memory_file_name, SavedVm,
    SnapshotError, SnapshotInfo, Staged, STATE_FILE,
};
use crate::{RestoreError, StartError, Vm};

/// One diff layer: its file, and the page runs (first page, pages) of
/// the memory file's address space it holds. Inside a run, a hole in the
/// file is a page of zeros.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub file: String,
    pub runs: Vec<(u64, u64)>,
}

/// One bitmap per RAM region, 64 pages a word.
type DirtyBitmaps = Vec<Vec<u64>>;

/// Who uses the VM's dirty log besides its snapshots, and what a diff
/// snapshot may go on. One per VM, behind a mutex.
#[derive(Default)]
pub(crate) struct DirtyLogUse {
    /// Bumped whenever the log's bits go elsewhere (a migration): a base
    /// recorded at an older epoch no longer has every write since it.
    pub(super) epoch: u64,
    /// This VM's last snapshot: its directory, its top memory file, and
    /// the epoch when its bits were taken.
    base: Option<(PathBuf, String, u64)>,
    /// A live snapshot is passing over the log: a migration must wait.
    pub(crate) live: bool,
}

impl Vm {
    pub(super) fn dirty_use(&self) -> std::sync::MutexGuard<'_, DirtyLogUse> {
        self.dirty_use.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The log's bits go elsewhere from now (a migration): no diff may
    /// rest on an earlier snapshot.
    pub(crate) fn dirty_log_taken_elsewhere(&self) {
        let mut u = self.dirty_use();
        u.epoch += 1;
        u.base = None;
    }

    /// This VM's next diff goes on the snapshot just put in `dir` (top file
    /// `top`), if its bits were taken at `epoch` and nothing took them
    /// since.
    pub(crate) fn set_diff_base(&self, dir: &Path, top: String, epoch: Option<u64>) {
        let mut u = self.dirty_use();
        u.base = match epoch {
            Some(e) if e == u.epoch => Some((dir.to_path_buf(), top, e)),
            _ => None,
        };
    }

    /// While stopped: take what the dirty log holds (it is in the snapshot
    /// being made, or in the diff), with the epoch it belongs to. `None`
    /// when the VM does not track dirty pages, or while a migration owns
    /// the log (then nothing is taken: its copy needs every bit). The
    /// migration's slot is held meanwhile, so none starts in between.
    pub(crate) fn take_dirty_for_snapshot(
        &self,
    ) -> Result<Option<(DirtyBitmaps, u64)>, SnapshotError> {
        if !self.config().track_dirty_pages {
            return Ok(None);
        }
        let slot = self.migration.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|m| !m.status().phase.is_final()) {
            return Ok(None);
        }
        let bits = self.kvm.take_dirty_pages()?;
        let epoch = self.dirty_use().epoch;
        drop(slot);
        Ok(Some((bits, epoch)))
    }

    /// Save into `dir` only what was written since this VM's previous
    /// snapshot there (full, live or diff), as a layer above it. Needs
    /// `track_dirty_pages`; the VM is paused for it (if running) and left
    /// as it was.
    pub fn snapshot_diff(&self, dir: &Path) -> Result<SnapshotInfo, SnapshotError> {
        let start = Instant::now();
        if !self.config().track_dirty_pages {
            return Err(SnapshotError::NotTracking);
        }
        let mut held = self.hold_for_snapshot()?;
        check_destination(dir)?;
        let below: SavedVm =
            file::read(&dir.join(STATE_FILE)).map_err(|_| SnapshotError::NoBase)?;
        match &self.dirty_use().base {
            Some((d, top, _)) if d == dir && top == below.top_file() => {}
            _ => return Err(SnapshotError::NoBase),
        }
        if below.layers.len() >= MAX_LAYERS {
            return Err(SnapshotError::TooManyLayers(below.layers.len()));
        }
        // Taken while stopped: a failure from here leaves no base to
        // diff on.
        self.set_diff_base(dir, String::new(), None);
        let (staged, pause, stopped) =
            self.while_stopped(&mut held, start, || self.save_layer(dir, below))?;
        self.finish(dir, staged, start, pause, stopped)
    }

    /// Stopped: the dirty pages into a new layer file, and the state.
    fn save_layer(&self, dir: &Path, below: SavedVm) -> Result<Staged, SnapshotError> {
        let name = new_memory_file_name();
        let path = dir.join(&name);
        let cannot_write = || io("cannot write guest memory to", &path);
        let mut tmp = memory::TempFile::create(&path).map_err(io("cannot create", &path))?;
        let ram = self.memory_size();
        tmp.file().set_len(ram).map_err(cannot_write())?;
        let (dirty, epoch) = self
            .take_dirty_for_snapshot()?
            .ok_or(SnapshotError::MigrationInProgress)?;
        let runs = memory::runs(&self.kvm, &dirty, usize::MAX)
            .into_iter()
            .map(|r| (r.offset / PAGE as u64, r.pages as u64))
            .collect();
        let data = super::live::write_pages(&self.kvm, tmp.file(), &dirty, false)
            .map_err(cannot_write())?;
        let mut state = self.save_state()?;
        state.memory_file = below.memory_file;
        state.layers = below.layers;
        state.layers.push(Layer { file: name, runs });
        Ok(Staged {
            state,
            memory: tmp,
            written: MemoryWritten { ram, data },
            // Every file below is still in use.
            earlier: Vec::new(),
            created: false,
            diff_epoch: Some(epoch),
        })
    }
}

/// The most diff layers a snapshot may stack (merge them to go on).
pub const MAX_LAYERS: usize = 64;

/// A layer's file, opened and checked against the RAM it goes on.
pub(crate) struct OpenLayer {
    file: File,
    runs: Vec<(u64, u64)>,
}

/// Open `state`'s layers in `dir`, refusing names not brisk's, files not
/// the RAM's size and runs outside it.
pub(crate) fn open_layers(dir: &Path, state: &SavedVm) -> Result<Vec<OpenLayer>, StartError> {
    if state.layers.len() > MAX_LAYERS {
        return Err(RestoreError::TooManyLayers(state.layers.len()).into());
    }
    let ram: u64 = state.regions.iter().map(|r| r.1).sum();
    let pages = ram / PAGE as u64;
    state
        .layers
        .iter()
        .map(|l| {
            if !is_memory_file_name(&l.file) {
                let shown = l.file.chars().take(64).collect();
                return Err(RestoreError::MemoryFileName(shown).into());
            }
            let path = dir.join(&l.file);
            let file = file::open_regular(&path)?;
            let len = file
                .metadata()
                .map_err(crate::vm::setup("reading a layer's size"))?
                .len();
            if len != ram {
                return Err(RestoreError::MemoryFileSize {
                    path,
                    len,
                    want: ram,
                }
                .into());
            }
            // Runs in order, apart, inside RAM: a layer covers each page
            // at most once, so reading all layers is bounded by their
            // number times RAM.
            let mut next = 0u64;
            for &(first, n) in &l.runs {
                match first.checked_add(n) {
                    Some(end) if n > 0 && first >= next && end <= pages => next = end,
                    _ => return Err(RestoreError::LayerRuns(l.file.clone()).into()),
                }
            }
            Ok(OpenLayer {
                file,
                runs: l.runs.clone(),
            })
        })
        .collect()
}

/// Read each layer's runs over guest RAM, oldest first (before any vCPU
/// runs).
pub(crate) fn apply_layers(kvm: &brisk_kvm::Vm, layers: &[OpenLayer]) -> Result<(), StartError> {
    let mem = kvm.memory();
    let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    let mut buf = vec![0u8; PAGE];
    for layer in layers {
        for &(first, n) in &layer.runs {
            for p in first..first + n {
                let offset = p * PAGE as u64;
                layer
                    .file
                    .read_exact_at(&mut buf, offset)
                    .map_err(crate::vm::setup("reading a diff layer"))?;
                let gpa = gpa_of(&regions, offset).ok_or(RestoreError::Regions)?;
                mem.write_slice(&buf, GuestAddress(gpa))
                    .map_err(crate::vm::setup("writing a diff layer into guest RAM"))?;
            }
        }
    }
    Ok(())
}

/// The guest address of memory-file offset `offset` (regions laid out
/// one after another).
fn gpa_of(regions: &[(u64, u64)], mut offset: u64) -> Option<u64> {
    for &(start, len) in regions {
        if offset < len {
            return Some(start + offset);
        }
        offset -= len;
    }
    None
}

/// Why a snapshot directory's layers could not be merged.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Read(#[from] StartError),
    #[error(transparent)]
    Write(#[from] SnapshotError),
}

/// Fold the diff layers of the snapshot in `dir` into one full memory
/// file (written beside, synced, then the state naming it; the old files
/// go after). Returns how many layers were merged (0: nothing to do).
pub fn merge(dir: &Path) -> Result<usize, MergeError> {
    let (mut state, base) = super::read_snapshot(dir)?;
    super::check_state(&state)?;
    if state.layers.is_empty() {
        return Ok(0);
    }
    let layers = open_layers(dir, &state)?;
    let ram: u64 = state.regions.iter().map(|r| r.1).sum();
    let name = new_memory_file_name();
    let path = dir.join(&name);
    let cannot_write = || io("cannot write guest memory to", &path);
    let mut tmp = memory::TempFile::create(&path).map_err(io("cannot create", &path))?;
    tmp.file().set_len(ram).map_err(cannot_write())?;
    let mut page = vec![0u8; PAGE];
    let mut data = 0;
    let mut put = |src: &File, offset: u64, out: &mut File| -> std::io::Result<()> {
        src.read_exact_at(&mut page, offset)?;
        out.write_all_at(&page, offset)?;
        data += PAGE as u64;
        Ok(())
    };
    // The base's data (its holes stay holes), then each layer's runs.
    let mut extents = Vec::new();
    memory::data_extents(&base, 0, ram, &mut extents).map_err(cannot_write())?;
    for (from, to) in extents {
        for offset in (from..to).step_by(PAGE) {
            put(&base, offset, tmp.file()).map_err(cannot_write())?;
        }
    }
    for l in &layers {
        for &(first, n) in &l.runs {
            for p in first..first + n {
                put(&l.file, p * PAGE as u64, tmp.file()).map_err(cannot_write())?;
            }
        }
    }
    let earlier: Vec<String> = state.files().map(str::to_string).collect();
    state.memory_file = name;
    state.layers.clear();
    let merged = layers.len();
    let staged = Staged {
        state,
        memory: tmp,
        written: MemoryWritten { ram, data },
        earlier,
        created: false,
        diff_epoch: None,
    };
    let (_, replaced) = install(dir, staged)?;
    for old in replaced {
        let _ = std::fs::remove_file(old);
    }
    Ok(merged)
}
