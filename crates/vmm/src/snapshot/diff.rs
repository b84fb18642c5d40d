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
    check_destination, file, install, io, is_memory_file_name, new_memory_file_name, SnapshotError,
    SnapshotInfo, Staged, VmState, STATE_FILE,
};
use crate::{PauseError, RestoreError, StartError, Vm};

/// One diff layer: its file, and the page runs (first page, pages) of
/// the memory file's address space it holds. Inside a run, a hole in the
/// file is a page of zeros.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub file: String,
    pub runs: Vec<(u64, u64)>,
}

/// The directory and top memory file of this VM's last snapshot, while
/// the dirty log holds exactly what was written since.
pub(crate) type DiffBase = Option<(PathBuf, String)>;

impl Vm {
    pub(crate) fn forget_diff_base(&self) {
        *self.diff_base.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub(crate) fn set_diff_base(&self, dir: &Path, top: String) {
        if self.config().track_dirty_pages {
            *self.diff_base.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((dir.to_path_buf(), top));
        }
    }

    /// While stopped, after a snapshot read RAM: forget what was written
    /// before (it is in the snapshot).
    pub(crate) fn drain_dirty_pages(&self) -> Result<(), SnapshotError> {
        if self.config().track_dirty_pages {
            self.kvm.take_dirty_pages()?;
        }
        Ok(())
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
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        if self.ended().is_some() {
            return Err(SnapshotError::Pause(PauseError::Ended));
        }
        check_destination(dir)?;
        let below: VmState =
            file::read(&dir.join(STATE_FILE)).map_err(|_| SnapshotError::NoBase)?;
        let base = self
            .diff_base
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match base {
            Some((d, top)) if d == dir && top == below.top_file() => {}
            _ => return Err(SnapshotError::NoBase),
        }
        // Drained while stopped: a failure from here leaves no base to
        // diff on.
        self.forget_diff_base();
        let (staged, pause, stopped) =
            self.while_stopped(&mut paused, start, || self.save_layer(dir, below))?;
        self.finish(dir, staged, start, pause, stopped)
    }

    /// Stopped: the dirty pages into a new layer file, and the state.
    fn save_layer(&self, dir: &Path, below: VmState) -> Result<Staged, SnapshotError> {
        let name = new_memory_file_name();
        let path = dir.join(&name);
        let cannot_write = || io("cannot write guest memory to", &path);
        let mut tmp = memory::TempFile::create(&path).map_err(io("cannot create", &path))?;
        let ram: u64 = self.kvm.memory().iter().map(|r| r.len()).sum();
        tmp.file().set_len(ram).map_err(cannot_write())?;
        let dirty = self.kvm.take_dirty_pages()?;
        let (runs, data) = write_runs(&self.kvm, tmp.file(), &dirty).map_err(cannot_write())?;
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
        })
    }
}

/// Write the pages set in `dirty` (one bitmap per region) at their
/// memory-file offsets, zero pages as holes; the runs written and the
/// bytes of data.
fn write_runs(
    kvm: &brisk_kvm::Vm,
    f: &File,
    dirty: &[Vec<u64>],
) -> std::io::Result<(Vec<(u64, u64)>, u64)> {
    let mem = kvm.memory();
    let mut page = vec![0u8; PAGE];
    let (mut runs, mut data) = (Vec::new(), 0u64);
    for r in memory::runs(kvm, dirty, usize::MAX) {
        runs.push((r.offset / PAGE as u64, r.pages as u64));
        for p in 0..r.pages as u64 {
            let at = p * PAGE as u64;
            mem.read_slice(&mut page, GuestAddress(r.gpa + at))
                .map_err(std::io::Error::other)?;
            if !memory::is_zero(&page) {
                f.write_all_at(&page, r.offset + at)?;
                data += PAGE as u64;
            }
        }
    }
    Ok((runs, data))
}

/// A layer's file, opened and checked against the RAM it goes on.
pub(crate) struct OpenLayer {
    file: File,
    runs: Vec<(u64, u64)>,
}

/// Open `state`'s layers in `dir`, refusing names not brisk's, files not
/// the RAM's size and runs outside it.
pub(crate) fn open_layers(dir: &Path, state: &VmState) -> Result<Vec<OpenLayer>, StartError> {
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
            if l.runs
                .iter()
                .any(|&(first, n)| first.checked_add(n).is_none_or(|end| end > pages))
            {
                return Err(RestoreError::LayerRuns(l.file.clone()).into());
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
    };
    let (_, replaced) = install(dir, staged)?;
    for old in replaced {
        let _ = std::fs::remove_file(old);
    }
    Ok(merged)
}
