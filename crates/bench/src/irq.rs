//! irq: what idle-time tasks cost the interrupts they share a vCPU with.
//!
//! The `tick` guest halts between 1 ms timer interrupts (user irqchip). We
//! log each interrupt's latency from the timer's raise to KVM_INTERRUPT,
//! first with the vCPU's idle time unused, then with its idle queue kept
//! full of tasks of a fixed length: an interrupt that falls due while a
//! task runs waits for the task to return (tasks are not preempted).
//!
//! Then the cost of brisk's own interrupt controllers against KVM's, in
//! the same run: the `ipistorm` test kernel's IPI round trip (every vCPU
//! pings every other through the x2APIC and waits halted for the pong),
//! as the guest times it with its TSC, on 2 and 4 vCPUs under
//! `--irqchip kernel` (the baseline) and `--irqchip user`; and its timer
//! mode: how late a 200 us one-shot LAPIC timer's handler runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use brisk_test_kernels as k;
use brisk_vmm::{Capture, Irqchip, KernelConfig, KvmVcpu, Output, Vm, VmConfig, VmEnd};

use crate::stats::{Row, Table};
use crate::Opts;

pub fn run(opts: &Opts) -> Vec<Table> {
    // Each VM gives `TICKS` (100) samples; variants interleave by round.
    let rounds = if opts.quick { 2 } else { 10 };
    let tasks_us = [0u64, 10, 50];
    let mut samples: Vec<Vec<u64>> = vec![Vec::new(); tasks_us.len()];
    let mut tasks_run = vec![0u64; tasks_us.len()];
    for _ in 0..rounds {
        for (i, us) in tasks_us.iter().enumerate() {
            let (lat, ran) = one_vm(*us);
            samples[i].extend(lat);
            tasks_run[i] += ran;
        }
    }
    let rows = tasks_us
        .iter()
        .zip(samples)
        .zip(&tasks_run)
        .map(|((us, s), ran)| {
            let name = if *us == 0 {
                "no idle tasks".to_string()
            } else {
                format!("idle tasks of {us} us queued")
            };
            Row::new(name, s).with("idle tasks run", *ran as f64)
        })
        .collect();
    vec![
        Table::new(
            "irq: timer interrupt latency (raise -> KVM_INTERRUPT), tick guest, 1 vCPU, user irqchip",
            "the interrupt-latency cost of idle-time tasks: a tick due while a task runs waits for it to finish",
            rows,
        ),
        ipi_round_trips(opts),
        timer_lateness(opts),
    ]
}

/// The ipistorm kernel's timer mode under each irqchip: per VM the
/// median lateness (the samples) and the p99 (a column).
fn timer_lateness(opts: &Opts) -> Table {
    let rounds = if opts.quick { 1 } else { 5 };
    let irqchips = [Irqchip::Kernel, Irqchip::User];
    let mut medians: Vec<Vec<u64>> = vec![Vec::new(); 2];
    let mut p99s: Vec<Vec<u64>> = vec![Vec::new(); 2];
    for _ in 0..rounds {
        for (i, irqchip) in irqchips.iter().enumerate() {
            match run_ipistorm(*irqchip, 1, "timer") {
                Ok(out) => {
                    let figure = |after: &str| {
                        out.split(after)
                            .nth(1)?
                            .split(" ns")
                            .next()?
                            .parse::<u64>()
                            .ok()
                    };
                    if let (Some(m), Some(p)) = (figure("median "), figure("p99 ")) {
                        medians[i].push(m);
                        p99s[i].push(p);
                    }
                }
                Err(e) => eprintln!("bench irq: timer {irqchip:?}: {e}"),
            }
        }
    }
    let rows = irqchips
        .iter()
        .zip(medians)
        .zip(p99s)
        .map(|((irqchip, m), mut p)| {
            p.sort_unstable();
            let p99 = p.get(p.len() / 2).copied().unwrap_or(0);
            Row::new(irqchip_name(*irqchip), m).with("guest p99 ns", p99 as f64)
        })
        .collect();
    Table::new(
        "irq: LAPIC timer lateness (200 us one-shot, deadline -> handler), ipistorm kernel, 1 vCPU",
        "median over VMs of each VM's median lateness of 200 interrupts, timed by the guest's TSC; halted between interrupts",
        rows,
    )
}

fn irqchip_name(irqchip: Irqchip) -> &'static str {
    match irqchip {
        Irqchip::Kernel => "KVM's LAPICs (--irqchip kernel)",
        Irqchip::User => "brisk's LAPICs (--irqchip user)",
    }
}

/// The ipistorm kernel's ns per IPI round trip, each irqchip and vCPU
/// count interleaved by round.
fn ipi_round_trips(opts: &Opts) -> Table {
    let rounds = if opts.quick { 1 } else { 5 };
    let cases = [
        (Irqchip::Kernel, 2),
        (Irqchip::User, 2),
        (Irqchip::Kernel, 4),
        (Irqchip::User, 4),
    ];
    let mut samples: Vec<Vec<u64>> = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        for (i, (irqchip, cpus)) in cases.iter().enumerate() {
            match ipistorm(*irqchip, *cpus) {
                Ok(ns) => samples[i].push(ns),
                Err(e) => eprintln!("bench irq: ipistorm {irqchip:?} {cpus}: {e}"),
            }
        }
    }
    let rows = cases
        .iter()
        .zip(samples)
        .map(|((irqchip, cpus), s)| {
            Row::new(format!("{cpus} vCPUs, {}", irqchip_name(*irqchip)), s)
        })
        .collect();
    Table::new(
        "irq: IPI round trip (ping and pong through the x2APIC, targets halted), ipistorm kernel",
        "per round trip as the guest times it with its TSC; every pair of vCPUs at once; ratios against KVM's irqchip on 2 vCPUs",
        rows,
    )
}

/// Why an ipistorm run gave no figures.
#[derive(Debug, thiserror::Error)]
enum IpistormError {
    #[error("cannot start the ipistorm kernel: {0}")]
    Start(#[from] brisk_vmm::StartError),
    #[error("ended {end:?}: {out}")]
    Failed { end: VmEnd, out: String },
    #[error("no round-trip figure in: {out}")]
    NoFigure { out: String },
}

fn ipistorm(irqchip: Irqchip, cpus: usize) -> Result<u64, IpistormError> {
    let out = run_ipistorm(irqchip, cpus, "")?;
    out.lines()
        .find_map(|l| l.strip_suffix(" ns per round trip"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .ok_or(IpistormError::NoFigure { out })
}

/// Boot the ipistorm kernel with `cmdline`; its console output if it
/// passed.
fn run_ipistorm(irqchip: Irqchip, cpus: usize, cmdline: &str) -> Result<String, IpistormError> {
    let config = VmConfig {
        cpus,
        irqchip,
        payload: brisk_vmm::Payload::Kernel(KernelConfig {
            path: k::IPISTORM.into(),
            cmdline: cmdline.into(),
            ..KernelConfig::default()
        }),
        ..VmConfig::default()
    };
    let capture = Capture::default();
    let vm = Vm::start(&config, Output::Capture(capture.clone()))?;
    let end = vm.wait(Some(Duration::from_secs(120)), None);
    let _ = vm.shutdown();
    let out = capture.text();
    if end != VmEnd::DebugExit(k::PASS as u32) {
        return Err(IpistormError::Failed { end, out });
    }
    Ok(out)
}

/// Run `tick` once; with `task_us` > 0 keep its idle queue full of busy
/// tasks that long. Returns the injection latencies and tasks run.
fn one_vm(task_us: u64) -> (Vec<u64>, u64) {
    let config = VmConfig {
        payload: brisk_vmm::Payload::builtin("tick"),
        cpus: 1,
        ..VmConfig::default()
    };
    let vm = Arc::new(Vm::start(&config, Output::Null).expect("tick VM"));
    let pending = vm.pending_interrupts(0).expect("user irqchip");
    pending.log_latencies(true);
    // More than the ~100 ms of idle time the guest has: the queue is never
    // empty while it ticks. Leftovers are dropped at exit.
    if let Some(n) = 200_000u64.checked_div(task_us) {
        let task = Duration::from_micros(task_us);
        for _ in 0..n as usize {
            let _ticket = vm
                .vcpu(0)
                .run_when_idle(move |_: &mut KvmVcpu| {
                    let t = Instant::now();
                    while t.elapsed() < task {
                        std::hint::spin_loop();
                    }
                })
                .expect("queue an idle task");
        }
    }
    let end = vm.wait(Some(Duration::from_secs(30)), None);
    assert_eq!(end, VmEnd::PowerOff, "tick guest");
    let lat = vm.pending_interrupts(0).unwrap().take_latencies();
    let ran = vm.vcpu(0).counters().snapshot().idle_tasks;
    Arc::try_unwrap(vm)
        .ok()
        .expect("sole owner")
        .shutdown()
        .expect("vCPU threads");
    (lat, ran)
}
