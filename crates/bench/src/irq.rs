//! irq: what idle-time tasks cost the interrupts they share a vCPU with.
//!
//! The `tick` guest halts between 1 ms timer interrupts (user irqchip). We
//! log each interrupt's latency from the timer's raise to KVM_INTERRUPT,
//! first with the vCPU's idle time unused, then with its idle queue kept
//! full of tasks of a fixed length: an interrupt that falls due while a
//! task runs waits for the task to return (tasks are not preempted).

use std::sync::Arc;
use std::time::{Duration, Instant};

use brisk_vmm::{KvmVcpu, Output, Vm, VmConfig, VmEnd};

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
    vec![Table::new(
        "irq: timer interrupt latency (raise -> KVM_INTERRUPT), tick guest, 1 vCPU, user irqchip",
        "the interrupt-latency cost of idle-time tasks: a tick due while a task runs waits for it to finish",
        rows,
    )]
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
