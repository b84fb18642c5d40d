//! snapshot: create and restore-to-running times for 1 and 2 vCPUs at 256
//! MiB and 2 GiB, with the `dirty` guest having touched all of its RAM (a
//! full snapshot, the worst case), against the floor of each in the same
//! run: writing as many bytes to a file with pwrite, and starting a fresh
//! VM of the same shape.
//!
//! live: the guest's stop time and the total time of a live snapshot
//! (memory written while the guest runs) against a stop-and-copy one of
//! the same VM, for a 2 GiB guest that touched all of its RAM and then
//! idles, and for guests dirtying memory all along.
//!
//! diff: a diff snapshot (only what was written since the last one)
//! against a full one of the same VM, and the pwrite of the diff's bytes.
//!
//! lazy restore: from `Vm::restore` to the restored guest's next step
//! (its progress counter moving), for a 256 MiB and a 4 GiB `spin` guest:
//! RAM is mapped from the memory file, not read, so the time should not
//! grow with the RAM size.
//!
//! migration: downtime (source pause to the destination running) and
//! total time, over a Unix socket on this machine, for an idle and a
//! memory-dirtying guest, and a local upgrade (memfd handed over) against
//! copying the same VM (2 GiB, all written once by the `fill` guest); the
//! downtime floor is pausing and resuming the VM in place.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use brisk_control::Deadline;
use brisk_vmm::migration::Phase;
use brisk_vmm::{MigrationOptions, MigrationUrl, Output, Payload, RestoreOptions, Vm, VmConfig};

use crate::stats::{Row, Table};
use crate::Opts;

const MIB: u64 = 1 << 20;

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let p = std::env::temp_dir().join(format!("brisk-bench-snapshot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch directory");
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(guest: String, cpus: usize, memory: u64, shared: bool) -> VmConfig {
    VmConfig {
        payload: Payload::Builtin(guest),
        cpus,
        memory,
        shared_memory: shared,
        ..VmConfig::default()
    }
}

/// The `dirty` guest sized to touch nearly all of `memory`.
fn dirty_guest(cpus: usize, memory: u64) -> String {
    let per = (memory - brisk_guests::DIRTY_BASE - 8 * MIB) / cpus as u64 / MIB;
    format!("dirty={per}")
}

/// Wait (bounded) until every vCPU finished `sweeps` sweeps.
fn wait_sweeps(vm: &Vm, sweeps: u64) {
    let until = Instant::now() + Duration::from_secs(600);
    for id in 0..vm.vcpus().len() {
        while vm.progress(id) < sweeps {
            assert!(Instant::now() < until, "the dirty guest made no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

pub fn run(opts: &Opts) -> Vec<Table> {
    let scratch = Scratch::new();
    let samples = if opts.quick { 1 } else { 5 };
    let mut shapes = vec![(1, 256 * MIB), (2, 256 * MIB)];
    if !opts.quick {
        shapes.extend([(1, 2048 * MIB), (2, 2048 * MIB)]);
    }
    let (mut create, mut restore) = (Vec::new(), Vec::new());
    for &(cpus, memory) in &shapes {
        let (c, r) = snapshot_shape(&scratch.0, cpus, memory, samples);
        create.extend(c);
        restore.extend(r);
    }
    vec![
        Table::new(
            "snapshot: create (pause, write RAM, resume, sync and rename RAM + state), RAM fully touched by the dirty guest",
            "baselines: pwrite of the same number of bytes to a file in the same directory (page cache), and the same followed by fdatasync (a snapshot syncs its memory file before the state names it); Firecracker reports 180 ms for a full snapshot of 2 vCPUs / 256 MiB",
            create,
        ),
        Table::new(
            "snapshot: restore to running (read + check the state, map RAM copy-on-write, set KVM state, start vCPUs)",
            "baseline: starting a fresh VM of the same shape (KVM VM, vCPUs, devices, payload); pages fault in from the file as the guest touches them",
            restore,
        ),
        live_snapshots(&scratch.0, opts.quick, samples),
        diff_snapshots(&scratch.0, samples),
        lazy_restore(&scratch.0, samples),
        migration(&scratch.0, opts.quick, samples),
        dirty_trackers(&scratch.0, opts.quick, samples),
    ]
}

/// Migrations of the same VM tracked by KVM's dirty bitmap and by its
/// dirty ring (`--dirty-ring`), at several sizes of what the guest keeps
/// dirtying: downtime in the rows, totals and the ring's ratio in columns.
fn dirty_trackers(dir: &Path, quick: bool, samples: usize) -> Table {
    let big = if quick { 256 * MIB } else { 2048 * MIB };
    let cases = [
        ("spin".to_string(), big, 0, "idle"),
        (
            "dirty=4".to_string(),
            256 * MIB,
            1,
            "dirtying 4 MiB per vCPU",
        ),
        (
            "dirty=16".to_string(),
            256 * MIB,
            1,
            "dirtying 16 MiB per vCPU",
        ),
        (
            "dirty=64".to_string(),
            256 * MIB,
            1,
            "dirtying 64 MiB per vCPU",
        ),
    ];
    let mut rows = Vec::new();
    for (guest, memory, warm, what) in cases {
        let mut bitmap_median = 0;
        for ring in [false, true] {
            let c = VmConfig {
                dirty_ring: ring,
                ..config(guest.clone(), 2, memory, false)
            };
            let (mut down, mut total) = (Vec::new(), Vec::new());
            for _ in 0..samples {
                let (d, t) = migrate_once(dir, &c, false, warm);
                down.push(d);
                total.push(t);
            }
            let tracker = if ring { "ring" } else { "bitmap" };
            let row = Row::new(
                format!("{tracker}, 2 vCPUs, {} MiB, {what}", memory / MIB),
                down,
            );
            let row = row.with(
                "total ms (median)",
                Row::new("", total).median_ns as f64 / 1e6,
            );
            rows.push(match ring {
                false => {
                    bitmap_median = row.median_ns;
                    row
                }
                true => {
                    let ratio = row.median_ns as f64 / bitmap_median.max(1) as f64;
                    row.with("downtime vs bitmap", ratio)
                }
            });
        }
    }
    Table::new(
        "migration: dirty bitmap (KVM_GET_DIRTY_LOG) vs dirty ring (KVM_CAP_DIRTY_LOG_RING), unix socket on this host",
        "rows: median/p99 downtime of the same migration with each tracker; columns: median total time, and the ring's downtime over the bitmap's. A ring found overflowed (this host's emulated writes outrun its ring-full exit) counts every page as dirty from then on",
        rows,
    )
}

/// Live against stop-and-copy snapshots of the same VM, interleaved:
/// rows of the guest's stop time, the total in a column.
fn live_snapshots(dir: &Path, quick: bool, samples: usize) -> Table {
    let memory = if quick { 256 * MIB } else { 2048 * MIB };
    let fill = (memory - brisk_guests::DIRTY_BASE - 8 * MIB) / 2 / MIB;
    let cases = [
        (
            format!("fill={fill}"),
            memory,
            "touched all its RAM, then idle",
        ),
        (
            "dirty=8".to_string(),
            256 * MIB,
            "dirtying 8 MiB per vCPU without pause",
        ),
    ];
    let mut rows = Vec::new();
    for (guest, memory, what) in cases {
        let snap = dir.join("live");
        let vm = Vm::start(&config(guest, 2, memory, false), Output::Null).expect("VM");
        wait_sweeps(&vm, 1);
        let (mut plain, mut live, mut plain_total, mut live_total) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..samples {
            let info = vm.snapshot(&snap).expect("snapshot");
            plain.push(ns(info.stopped));
            plain_total.push(ns(info.total));
            let info = vm
                .snapshot_live(&snap, brisk_vmm::LiveOptions::default())
                .expect("live snapshot");
            live.push(ns(info.stopped));
            live_total.push(ns(info.total));
        }
        vm.shutdown().expect("shutdown");
        let _ = std::fs::remove_dir_all(&snap);
        let shape = format!("2 vCPUs, {} MiB, {what}", memory / MIB);
        let total = |t: Vec<u64>| Row::new("", t).median_ns as f64 / 1e6;
        rows.push(
            Row::new(format!("stop-and-copy, {shape}"), plain).with("total ms", total(plain_total)),
        );
        rows.push(Row::new(format!("live, {shape}"), live).with("total ms", total(live_total)));
    }
    Table::new(
        "snapshot: guest stop time, live (memory written while the guest runs, 10 ms budget) vs stop-and-copy",
        "rows: median/p99 time the guest was stopped; the column: median total time. Ratios against the first row",
        rows,
    )
}

/// Diff against full snapshots of a tracking VM whose guest sweeps 16
/// MiB of its 512 MiB (the rest holding data written once), interleaved;
/// and the pwrite floor of the bytes a diff wrote.
fn diff_snapshots(dir: &Path, samples: usize) -> Table {
    let memory = 512 * MIB;
    let snap = dir.join("diff");
    let mut c = config("dirty=16".into(), 1, memory, false);
    c.track_dirty_pages = true;
    let vm = Vm::start(&c, Output::Null).expect("VM");
    // The rest of RAM holds data too (written here, once), so a full
    // snapshot writes all of it.
    let from = brisk_guests::DIRTY_BASE + 16 * MIB;
    let chunk = vec![0x5au8; MIB as usize];
    for at in (from..memory).step_by(MIB as usize) {
        vm_memory::Bytes::write_slice(vm.guest_memory(), &chunk, vm_memory::GuestAddress(at))
            .expect("guest RAM");
    }
    wait_sweeps(&vm, 1);
    let (mut full, mut diff, mut floor, mut bytes) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for _ in 0..samples {
        let info = vm.snapshot(&snap).expect("snapshot");
        full.push(ns(info.total));
        let at = vm.progress(0);
        wait_sweeps(&vm, at + 1);
        let info = vm.snapshot_diff(&snap).expect("diff snapshot");
        diff.push(ns(info.total));
        bytes = info.memory.data;
        floor.push(pwrite_floor(dir, bytes.max(4096), Floor::Sync));
    }
    vm.shutdown().expect("shutdown");
    let _ = std::fs::remove_dir_all(&snap);
    let mib = bytes as f64 / MIB as f64;
    Table::new(
        "snapshot: diff (pages written since the last snapshot) vs full, 1 vCPU, 512 MiB, the guest sweeping 16 MiB",
        "each diff follows a full snapshot and one sweep of the guest; the floor: pwrite + fdatasync of the diff's bytes to a file in the same directory",
        vec![
            Row::new("full snapshot", full),
            Row::new(format!("diff snapshot ({mib:.0} MiB written)"), diff),
            Row::new(format!("pwrite + fdatasync {mib:.0} MiB"), floor),
        ],
    )
}

/// Wait (spin-polled: a sleep would round the figure up to its tick)
/// until vCPU 0's progress counter moves.
fn first_step(vm: &Vm, since: Instant) {
    let saved = vm.progress(0);
    let until = since + Duration::from_secs(60);
    while vm.progress(0) == saved {
        assert!(Instant::now() < until, "the spin guest made no progress");
        std::hint::spin_loop();
    }
}

/// Restore to the guest's first step after the restore, by RAM size.
fn lazy_restore(dir: &Path, samples: usize) -> Table {
    let sizes = [256 * MIB, 4096 * MIB];
    let mut rows = Vec::new();
    for memory in sizes {
        let snap = dir.join(format!("lazy-{}", memory / MIB));
        let vm = Vm::start(&config("spin".into(), 1, memory, false), Output::Null).expect("VM");
        wait_sweeps(&vm, 1);
        vm.snapshot(&snap).expect("snapshot");
        vm.shutdown().expect("shutdown");
        let (mut took, mut fresh) = (Vec::new(), Vec::new());
        for _ in 0..samples {
            let t = Instant::now();
            let vm = Vm::restore(&snap, Output::Null, RestoreOptions::default()).expect("restore");
            first_step(&vm, t);
            took.push(ns(t.elapsed()));
            vm.shutdown().expect("shutdown");
            // The floor: a new VM of the same size to its first step
            // (what KVM's memory slots of that size cost either way).
            let t = Instant::now();
            let c = config("spin".into(), 1, memory, false);
            let vm = Vm::start(&c, Output::Null).expect("VM");
            first_step(&vm, t);
            fresh.push(ns(t.elapsed()));
            vm.shutdown().expect("shutdown");
        }
        let _ = std::fs::remove_dir_all(&snap);
        let mib = memory / MIB;
        rows.push(Row::new(format!("fresh spin VM, 1 vCPU, {mib} MiB"), fresh));
        rows.push(Row::new(format!("brisk restore, 1 vCPU, {mib} MiB"), took));
    }
    Table::new(
        "snapshot: restore to the guest's first step (Vm::restore until its progress counter moves), by RAM size",
        "baseline: a fresh VM of that size to its first step. RAM is mapped copy-on-write from the memory file, not read, so a restore should add no time that grows with RAM (cloud-hypervisor #7623: an eager copy took 55 s where lazy paging took 317 ms)",
        rows,
    )
}

/// Create and restore rows (and their baselines) for one shape.
fn snapshot_shape(dir: &Path, cpus: usize, memory: u64, samples: usize) -> (Vec<Row>, Vec<Row>) {
    let shape = format!(
        "{cpus} vCPU{}, {} MiB",
        if cpus > 1 { "s" } else { "" },
        memory / MIB
    );
    let snap = dir.join(format!("snap-{cpus}-{}", memory / MIB));
    let vm = Vm::start(
        &config(dirty_guest(cpus, memory), cpus, memory, false),
        Output::Null,
    )
    .expect("VM");
    wait_sweeps(&vm, 1);
    // Interleaved with the floors, so all see the same machine: a
    // snapshot into a new directory (create) and one over the previous
    // snapshot (replace: the old memory file is removed, its pages freed,
    // before it returns), against writing the bytes to a new file, and to
    // a new file that replaces an old one of the same size.
    let (mut made, mut replaced) = (Vec::new(), Vec::new());
    let (mut floor, mut synced, mut synced_replacing) = (Vec::new(), Vec::new(), Vec::new());
    // The first one to replace; it also says how many bytes a snapshot
    // writes (the guest touched all its RAM: each writes as many), which
    // the floors write too.
    let written = vm.snapshot(&snap).expect("snapshot").memory.data;
    for i in 0..samples {
        // Floors first every other round: whichever runs first in a
        // round gets the page-cache pages the previous round freed, and
        // on a nested host fresh pages cost more (docs/benchmarks.md).
        let floors_first = i % 2 == 1;
        let mut floors = || {
            for (how, out) in [
                (Floor::Write, &mut floor),
                (Floor::Sync, &mut synced),
                (Floor::SyncReplacing, &mut synced_replacing),
            ] {
                settle_storage();
                out.push(pwrite_floor(dir, written, how));
            }
        };
        if floors_first {
            floors();
        }
        let fresh_dir = dir.join(format!("create-{i}"));
        settle_storage();
        let info = vm.snapshot(&fresh_dir).expect("snapshot");
        made.push(ns(info.total));
        flush(&fresh_dir);
        let _ = std::fs::remove_dir_all(&fresh_dir);
        settle_storage();
        let info = vm.snapshot(&snap).expect("snapshot");
        replaced.push(ns(info.total));
        flush(&snap);
        if !floors_first {
            floors();
        }
    }
    vm.shutdown().expect("shutdown");
    let (mut restored, mut fresh) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        let t = Instant::now();
        let vm = Vm::restore(&snap, Output::Null, RestoreOptions::default()).expect("restore");
        restored.push(ns(t.elapsed()));
        vm.shutdown().expect("shutdown");
        let t = Instant::now();
        let vm = Vm::start(&config("spin".into(), cpus, memory, false), Output::Null).expect("VM");
        fresh.push(ns(t.elapsed()));
        vm.shutdown().expect("shutdown");
    }
    let _ = std::fs::remove_dir_all(&snap);
    let mib = written as f64 / MIB as f64;
    let over = |a: &Row, b: &Row| a.median_ns as f64 / b.median_ns.max(1) as f64;
    let (floor, synced, made) = (
        Row::new(format!("pwrite {mib:.0} MiB ({shape})"), floor),
        Row::new(format!("pwrite + fdatasync {mib:.0} MiB ({shape})"), synced),
        Row::new(format!("brisk snapshot, new dir, {shape}"), made),
    );
    let (synced_replacing, replaced) = (
        Row::new(
            format!("pwrite + fdatasync + unlink old {mib:.0} MiB ({shape})"),
            synced_replacing,
        ),
        Row::new(format!("brisk snapshot, replacing, {shape}"), replaced),
    );
    let made = {
        let (x, xs) = (over(&made, &floor), over(&made, &synced));
        made.with("MiB written", mib)
            .with("x its pwrite", x)
            .with("x its pwrite + fdatasync", xs)
    };
    let replaced = {
        let x = over(&replaced, &synced_replacing);
        replaced.with("x its pwrite + fdatasync + unlink", x)
    };
    let (fresh, restored) = (
        Row::new(format!("fresh VM start, {shape}"), fresh),
        Row::new(format!("brisk restore, {shape}"), restored),
    );
    let restored = {
        let x = over(&restored, &fresh);
        restored.with("x its fresh start", x)
    };
    (
        vec![floor, synced, made, synced_replacing, replaced],
        vec![fresh, restored],
    )
}

/// Sync a snapshot's files (untimed), so the next writes do not wait for
/// their writeback.
fn flush(snap: &Path) {
    let name = brisk_vmm::snapshot::file::read::<brisk_vmm::snapshot::SavedVm>(
        &snap.join(brisk_vmm::snapshot::STATE_FILE),
    )
    .expect("the state just written")
    .memory_file;
    let mem = std::fs::File::open(snap.join(name));
    mem.and_then(|f| f.sync_all())
        .expect("flushing the memory file");
}

/// Untimed, before each timed write: the file system's earlier work
/// (writeback, freed blocks, the journal) done, so no variant pays for
/// the one before it.
fn settle_storage() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

/// What the floor does with the bytes.
#[derive(Clone, Copy, PartialEq)]
enum Floor {
    /// pwrite them into the page cache.
    Write,
    /// and fdatasync them (a snapshot syncs its memory file).
    Sync,
    /// and remove an old file of the same size, synced, as a snapshot
    /// that replaces an earlier one does.
    SyncReplacing,
}

/// Write `bytes` of touched, non-zero memory (as large as the guest's,
/// so it costs the same to walk) to a new file in 1 MiB pwrites, as
/// `how` says; the time.
fn pwrite_floor(dir: &Path, bytes: u64, how: Floor) -> u64 {
    let buf = vec![0x5au8; bytes as usize];
    let write = |path: &Path| {
        let f = std::fs::File::create(path).expect("floor file");
        f.set_len(bytes).expect("set_len");
        for (i, chunk) in buf.chunks(MIB as usize).enumerate() {
            f.write_all_at(chunk, i as u64 * MIB).expect("pwrite");
        }
        f
    };
    let old = dir.join("floor-old");
    if how == Floor::SyncReplacing {
        write(&old).sync_all().expect("fsync");
    }
    let path = dir.join("floor");
    let t = Instant::now();
    let f = write(&path);
    if how != Floor::Write {
        f.sync_data().expect("fdatasync");
    }
    if how == Floor::SyncReplacing {
        std::fs::remove_file(&old).expect("unlink");
    }
    let took = ns(t.elapsed());
    drop(f);
    let _ = std::fs::remove_file(path);
    took
}

/// One migration of a new VM `c` to a destination thread: (downtime, total).
fn migrate_once(dir: &Path, c: &VmConfig, local: bool, warm: u64) -> (u64, u64) {
    let src = Arc::new(Vm::start(c, Output::Null).expect("VM"));
    if warm > 0 {
        wait_sweeps(&src, warm);
    }
    let sock = dir.join("migration.sock");
    let _ = std::fs::remove_file(&sock);
    let url = MigrationUrl::Unix(sock.clone());
    let dst = {
        let url = url.clone();
        std::thread::spawn(move || {
            Vm::receive_migration(&url, Output::Null, RestoreOptions::default(), &|| false)
        })
    };
    let until = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(Instant::now() < until, "the destination never listened");
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut opts = MigrationOptions::new(url);
    opts.local = local;
    opts.timeout = Duration::from_secs(20);
    opts.force_on_timeout = true;
    src.send_migration(opts).expect("migration starts");
    let s = src.wait_migration().expect("status");
    assert_eq!(s.phase, Phase::Completed, "{s:?}");
    let vm = dst
        .join()
        .expect("destination thread")
        .expect("destination VM");
    vm.shutdown().expect("shutdown");
    Arc::try_unwrap(src)
        .ok()
        .expect("the source VM is ours again")
        .shutdown()
        .expect("shutdown");
    let downtime = (s.downtime_ms.unwrap_or(0.0) * 1e6) as u64;
    (downtime, (s.total_ms * 1e6) as u64)
}

fn migration(dir: &Path, quick: bool, samples: usize) -> Table {
    let mut cases = vec![
        (
            "idle (spin), 2 vCPUs, 256 MiB",
            config("spin".into(), 2, 256 * MIB, false),
            false,
            0,
        ),
        (
            "dirtying (dirty=64), 2 vCPUs, 256 MiB",
            config("dirty=64".into(), 2, 256 * MIB, false),
            false,
            1,
        ),
    ];
    if !quick {
        // RAM all written once, then idle (the fill guest halts).
        let fill = |shared| {
            let per = (2048 * MIB - brisk_guests::DIRTY_BASE - 8 * MIB) / 2 / MIB;
            config(format!("fill={per}"), 2, 2048 * MIB, shared)
        };
        cases.push((
            "filled then idle, 2 vCPUs, 2 GiB, copied",
            fill(false),
            false,
            1,
        ));
        cases.push((
            "filled then idle, 2 vCPUs, 2 GiB, local fd",
            fill(true),
            true,
            1,
        ));
    }
    // The floor of a downtime: stopping the same VM and resuming it.
    let floor = {
        let vm = Vm::start(&config("spin".into(), 2, 256 * MIB, false), Output::Null).expect("VM");
        let d = || Deadline::after(Duration::from_secs(5));
        let v: Vec<u64> = (0..samples.max(5))
            .map(|_| {
                std::thread::sleep(Duration::from_millis(2));
                let t = Instant::now();
                vm.pause(d()).expect("pause");
                vm.resume().expect("resume");
                ns(t.elapsed())
            })
            .collect();
        vm.shutdown().expect("shutdown");
        v
    };
    let mut rows = vec![Row::new("pause + resume in place, 2 vCPUs", floor)];
    for (name, c, local, warm) in cases {
        let (mut down, mut total) = (Vec::new(), Vec::new());
        for _ in 0..samples {
            let (d, t) = migrate_once(dir, &c, local, warm);
            down.push(d);
            total.push(t);
        }
        let total = Row::new("", total);
        rows.push(
            Row::new(format!("migrate {name}"), down)
                .with("total ms (median)", total.median_ns as f64 / 1e6),
        );
    }
    Table::new(
        "migration: downtime (source pause to destination running), unix socket on this host",
        "rows: median/p99 downtime; the extra column is the median total time. cloud-hypervisor reports ~50 ms downtime for a local upgrade of an idle 4 GiB VM (3 s copying)",
        rows,
    )
}
