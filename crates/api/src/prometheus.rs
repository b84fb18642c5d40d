//! `GET /api/v1/vm.counters` in Prometheus' text exposition format.

use std::fmt::Write;

use brisk_control::{CounterSnapshot, ExitKind};
use brisk_vmm::InterruptStats;

/// One vCPU's counters and, in user irqchip mode, its interrupt statistics.
pub(crate) type VcpuFigures = (usize, CounterSnapshot, Option<InterruptStats>);

/// One metric family per counter, one sample per vCPU.
pub(crate) fn render(vcpus: &[VcpuFigures], unclaimed: u64) -> String {
    let mut out = String::new();
    // One family: HELP, TYPE, then a sample per vCPU that has a value.
    let mut emit = |name: &str, help: &str, value: &dyn Fn(&VcpuFigures) -> Option<u64>| {
        let _ = writeln!(out, "# HELP brisk_vcpu_{name} {help}");
        let _ = writeln!(out, "# TYPE brisk_vcpu_{name} counter");
        for figures in vcpus {
            if let Some(v) = value(figures) {
                let _ = writeln!(out, "brisk_vcpu_{name}{{vcpu=\"{}\"}} {v}", figures.0);
            }
        }
    };
    let mut family = |name: &str, help: &str, value: &dyn Fn(&CounterSnapshot) -> u64| {
        emit(name, help, &|(_, c, _)| Some(value(c)))
    };
    family("entries_total", "Guest entries.", &|c| c.entries);
    family("kicks_total", "Kicks requested.", &|c| c.kicks);
    family("signals_sent_total", "Kick signals sent.", &|c| {
        c.signals_sent
    });
    family(
        "signals_elided_total",
        "Kicks that needed no signal.",
        &|c| c.signals_elided,
    );
    family("wakeups_total", "Futex wake-ups of blocked vCPUs.", &|c| {
        c.wakeups
    });
    family(
        "spurious_exits_total",
        "Entries cut short with nothing to do.",
        &|c| c.spurious_exits,
    );
    family("work_run_total", "run_on closures executed.", &|c| {
        c.work_run
    });
    family("parked_ns_total", "Nanoseconds parked.", &|c| c.parked_ns);
    family(
        "halted_ns_total",
        "Nanoseconds halted in user space.",
        &|c| c.halted_ns,
    );
    family("idle_tasks_total", "Idle-time tasks run.", &|c| {
        c.idle_tasks
    });
    family(
        "idle_task_ns_total",
        "Nanoseconds spent in idle-time tasks.",
        &|c| c.idle_task_ns,
    );
    type Field = fn(&InterruptStats) -> u64;
    let irq: [(&str, &str, Field); 3] = [
        (
            "interrupts_injected_total",
            "Interrupts injected (user irqchip).",
            |s| s.injected,
        ),
        (
            "interrupts_coalesced_total",
            "Interrupts merged into a pending one.",
            |s| s.coalesced,
        ),
        (
            "interrupt_latency_ns_total",
            "Nanoseconds from raise to injection, summed.",
            |s| s.latency_ns,
        ),
    ];
    for (name, help, value) in irq {
        emit(name, help, &|(_, _, s)| s.as_ref().map(value));
    }
    let _ = writeln!(
        out,
        "# HELP brisk_vcpu_exits_total Guest exits handled in user space."
    );
    let _ = writeln!(out, "# TYPE brisk_vcpu_exits_total counter");
    for (id, c, _) in vcpus {
        for k in ExitKind::ALL {
            let _ = writeln!(
                out,
                "brisk_vcpu_exits_total{{vcpu=\"{id}\",reason=\"{}\"}} {}",
                k.name(),
                c.exits_of(k)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP brisk_unclaimed_accesses_total PIO/MMIO accesses no device claimed."
    );
    let _ = writeln!(out, "# TYPE brisk_unclaimed_accesses_total counter");
    let _ = writeln!(out, "brisk_unclaimed_accesses_total {unclaimed}");
    out
}
