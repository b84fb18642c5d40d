//! exit: one PIO exit round trip through brisk's loop, against a raw
//! KVM_RUN loop and a KVM_SET_SIGNAL_MASK loop on the same VM setup; and
//! aggregate exits/s with N vCPUs.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use brisk_control::{Guest, VcpuCtl};
use brisk_kvm::{Exit, Irqchip};

use crate::rig::{answer, Rig, Timed};
use crate::sigmask;
use crate::stats::{Row, Table};
use crate::Opts;

/// Intervals dropped at the start of each run (VM warm-up).
const WARMUP: usize = 200;

#[derive(Clone, Copy)]
enum Loop {
    Raw,
    Brisk,
    SignalMask,
}

/// One vCPU running `pio`; returns `n` exit-to-exit intervals.
fn measure(kind: Loop, n: usize) -> Vec<u64> {
    let mut rig = Rig::new("pio", 1, Irqchip::User);
    let bus = rig.bus.clone();
    let vcpu = rig.vcpus.pop().unwrap();
    let (tx, rx) = mpsc::channel();
    let timed = Timed::intervals(vcpu, n + WARMUP, tx);
    let mut samples = match kind {
        Loop::Brisk => {
            let ctl = Arc::new(VcpuCtl::<Timed>::new(0));
            let c = ctl.clone();
            let t =
                thread::spawn(move || c.run(timed, |t, exit| Ok(answer(&mut t.inner, exit, &bus))));
            let samples = rx.recv().expect("brisk loop samples");
            ctl.request_exit();
            t.join().unwrap().expect("brisk loop");
            samples
        }
        Loop::Raw | Loop::SignalMask => {
            let t = thread::spawn(move || {
                let mut t = timed;
                if matches!(kind, Loop::SignalMask) {
                    sigmask::install(&t.inner);
                }
                let mut value = 0u32;
                for _ in 0..n + WARMUP {
                    // The floor: KVM_RUN, read the exit, answer the `in`.
                    let exit = t.inner.enter().expect("KVM_RUN");
                    t.returned(false);
                    match exit {
                        Some(Exit::IoIn { .. }) => {
                            value = value.wrapping_add(1);
                            let data = t.inner.io_data();
                            let n = data.len().min(4);
                            data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
                        }
                        None => sigmask::eat_signal(),
                        Some(other) => panic!("pio guest: unexpected {other:?}"),
                    }
                }
            });
            let samples = rx.recv().expect("loop samples");
            t.join().unwrap();
            samples
        }
    };
    samples.drain(..WARMUP);
    samples
}

pub fn run(opts: &Opts) -> Vec<Table> {
    let total = if opts.quick { 30_000 } else { 300_000 };
    let rounds = 5;
    // Interleave the variants in rounds so machine noise hits all alike.
    let (mut raw, mut brisk, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        raw.extend(measure(Loop::Raw, total / rounds));
        brisk.extend(measure(Loop::Brisk, total / rounds));
        mask.extend(measure(Loop::SignalMask, total / rounds));
    }
    let single = Table::new(
        "exit: PIO `in` round trip, 1 vCPU (exit to next exit)",
        "raw = KVM_RUN + answer the `in` inline; brisk = VcpuCtl::run (Dekker entry, requests, counters) + bus dispatch; signal-mask = raw + KVM_SET_SIGNAL_MASK (pre-immediate_exit QEMU)",
        vec![
            Row::new("raw KVM_RUN loop (floor)", raw),
            Row::new("brisk vCPU loop", brisk),
            Row::new("KVM_SET_SIGNAL_MASK loop", mask),
        ],
    );
    vec![single, aggregate(opts)]
}

/// brisk's own VM (production threads), `pio` on N vCPUs, each on its own
/// counter device: aggregate exits/s.
fn aggregate(opts: &Opts) -> Table {
    let window = Duration::from_millis(if opts.quick { 300 } else { 2000 });
    let cores = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut rows = Vec::new();
    for n in 1..=cores {
        let config = brisk_vmm::VmConfig {
            payload: brisk_vmm::Payload::builtin("pio"),
            cpus: n,
            ..Default::default()
        };
        let vm = brisk_vmm::Vm::start(&config, brisk_vmm::Output::Null).expect("VM");
        thread::sleep(Duration::from_millis(50));
        let mut per_exit = Vec::new();
        let mut rates = Vec::new();
        for _ in 0..3 {
            let p0: u64 = (0..n).map(|i| vm.progress(i)).sum();
            let t0 = Instant::now();
            thread::sleep(window);
            let p1: u64 = (0..n).map(|i| vm.progress(i)).sum();
            let dt = t0.elapsed();
            let exits = (p1 - p0).max(1);
            per_exit.push((dt.as_nanos() as u64) / exits);
            rates.push(exits as f64 / dt.as_secs_f64());
        }
        rates.sort_by(f64::total_cmp);
        vm.shutdown().expect("VM shutdown");
        rows.push(
            Row::new(format!("{n} vCPU(s), aggregate"), per_exit)
                .with("exits/s", rates[1])
                .with("per vCPU exits/s", rates[1] / n as f64),
        );
    }
    Table::new(
        "exit: aggregate PIO exits with N vCPUs (ns per exit over all vCPUs)",
        "each vCPU loops on its own counter device; dispatch takes no global lock, so the time per exit should fall as 1/N up to the core count",
        rows,
    )
}
