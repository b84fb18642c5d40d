//! brisk's benchmarks. Each one measures brisk against a baseline in the
//! same run (the machines are shared and noisy: medians and ratios, with
//! variants interleaved in rounds), and reports nanoseconds from a
//! monotonic clock.
//!
//! - [`exit`]: PIO exit round trip through brisk's loop vs a raw KVM_RUN
//!   loop (the floor) vs a KVM_SET_SIGNAL_MASK loop; aggregate exits/s.
//! - [`kick`]: kick latency (spinning, halted in KVM's irqchip) for brisk,
//!   always-signal and signal-mask; cost of stopping a parked vCPU.
//! - [`pause`]: pause_all + resume_all with 1..=8 vCPUs vs one-by-one.
//! - [`api`]: pause/resume through the API socket vs in-process.
//! - [`irq`]: timer interrupt latency with and without idle-time tasks.
//! - [`boot`]: spawn to marker and to exit for built-in, multiboot and
//!   Linux guests; virtio-blk 4 KiB reads vs pread, served by the I/O
//!   engine and inline.
//! - [`net`]: virtio-net on a TAP vs a host thread on the TAP: frames/s
//!   guest → host, round trips host → guest → host.
//! - [`vsock`]: hybrid vsock to an echoing guest vs a Unix socket pair.
//! - [`mn`]: M:N (a pool of host threads runs every vCPU) vs a thread
//!   per vCPU: threads, RSS, CPU, tick latency, pingpong, fairness, wake
//!   latency, the cost of a move.
//! - [`snapshot`]: snapshot create and restore vs writing the bytes and
//!   starting a fresh VM; migration downtime and total time (idle,
//!   dirtying, local fd hand-over) vs pausing in place.

pub mod api;
pub mod boot;
pub mod exit;
pub mod irq;
pub mod kick;
pub mod mn;
pub mod net;
pub mod pause;
pub mod plot;
mod process;
mod rig;
mod sigmask;
pub mod snapshot;
pub mod stats;
pub mod vsock;

use serde::Serialize;
pub use stats::{Row, Table};

/// Which benchmarks to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Exit,
    Kick,
    Pause,
    Api,
    Irq,
    Boot,
    Blk,
    Net,
    Vsock,
    Snapshot,
    Mn,
    All,
}

/// Options shared by the benchmarks.
#[derive(Clone, Debug, Default)]
pub struct Opts {
    /// Fewer samples: the whole suite in well under a minute.
    pub quick: bool,
}

/// Everything one `brisk bench` run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub quick: bool,
    pub host: Host,
    pub tables: Vec<Table>,
}

/// Where it ran.
#[derive(Debug, Serialize)]
pub struct Host {
    pub cores: usize,
    pub kernel: String,
    pub kvm_module: String,
}

impl Host {
    fn probe() -> Host {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
        let kvm_module = modules
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|m| m.starts_with("kvm_"))
            .collect::<Vec<_>>()
            .join(",");
        Host {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            kernel: kernel.trim().to_string(),
            kvm_module,
        }
    }
}

/// Run the selected benchmarks, printing each table as it completes.
pub fn run(which: Which, opts: &Opts, mut print: impl FnMut(&Table)) -> Report {
    let mut tables = Vec::new();
    let mut go = |f: fn(&Opts) -> Vec<Table>| {
        for t in f(opts) {
            print(&t);
            tables.push(t);
        }
    };
    if matches!(which, Which::Exit | Which::All) {
        go(exit::run);
    }
    if matches!(which, Which::Kick | Which::All) {
        go(kick::run);
    }
    if matches!(which, Which::Pause | Which::All) {
        go(pause::run);
    }
    if matches!(which, Which::Api | Which::All) {
        go(api::run);
    }
    if matches!(which, Which::Irq | Which::All) {
        go(irq::run);
    }
    // Minutes under PVM (Linux boots in about 100 s): not part of `all`.
    if which == Which::Boot {
        go(boot::run);
    }
    if matches!(which, Which::Blk | Which::All) {
        go(boot::run_blk);
    }
    if matches!(which, Which::Net | Which::All) {
        go(net::run);
    }
    if matches!(which, Which::Vsock | Which::All) {
        go(vsock::run);
    }
    if matches!(which, Which::Snapshot | Which::All) {
        go(snapshot::run);
    }
    if matches!(which, Which::Mn | Which::All) {
        go(mn::run);
    }
    Report {
        quick: opts.quick,
        host: Host::probe(),
        tables,
    }
}
