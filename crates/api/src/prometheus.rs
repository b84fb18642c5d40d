//! `GET /api/v1/vm.counters`: the same figures as JSON or in Prometheus'
//! text exposition format, both rendered from the one list each figure
//! type gives (`CounterSnapshot::fields`, `InterruptStats::fields`).

use std::fmt::Write;

use brisk_control::{CounterSnapshot, ExitKind};
use brisk_vmm::InterruptStats;
use serde_json::{json, Map, Value};

/// One vCPU's counters and, in user irqchip mode, its interrupt statistics.
pub(crate) type VcpuFigures = (usize, CounterSnapshot, Option<InterruptStats>);

/// The JSON body.
pub(crate) fn json(vcpus: &[VcpuFigures], unclaimed: u64) -> Value {
    let vcpus: Vec<Value> = vcpus
        .iter()
        .map(|(id, c, irq)| {
            let mut v = Map::new();
            v.insert("id".into(), json!(id));
            let exits: Map<String, Value> = ExitKind::ALL
                .iter()
                .map(|k| (k.name().to_string(), json!(c.exits_of(*k))))
                .collect();
            v.insert("exits".into(), Value::Object(exits));
            for (name, _, value) in c.fields() {
                v.insert(name.into(), json!(value));
            }
            // User irqchip only: raise -> KVM_INTERRUPT.
            let irq = irq.map(|s| {
                let m: Map<String, Value> = s
                    .fields()
                    .iter()
                    .map(|(name, _, value)| (name.to_string(), json!(value)))
                    .collect();
                Value::Object(m)
            });
            v.insert("interrupts".into(), irq.unwrap_or(Value::Null));
            Value::Object(v)
        })
        .collect();
    json!({ "vcpus": vcpus, "unclaimed_accesses": unclaimed })
}

/// One metric family per figure, one sample per vCPU.
pub(crate) fn render(vcpus: &[VcpuFigures], unclaimed: u64) -> String {
    let mut out = String::new();
    let mut family = |name: &str, help: &str, samples: &mut dyn Iterator<Item = (usize, u64)>| {
        let _ = writeln!(out, "# HELP brisk_vcpu_{name}_total {help}");
        let _ = writeln!(out, "# TYPE brisk_vcpu_{name}_total counter");
        for (id, v) in samples {
            let _ = writeln!(out, "brisk_vcpu_{name}_total{{vcpu=\"{id}\"}} {v}");
        }
    };
    let Some((_, first, _)) = vcpus.first() else {
        return out;
    };
    for (i, (name, help, _)) in first.fields().iter().enumerate() {
        family(
            name,
            help,
            &mut vcpus.iter().map(|(id, c, _)| (*id, c.fields()[i].2)),
        );
    }
    if let Some((_, _, Some(stats))) = vcpus.first() {
        for (i, (name, help, _)) in stats.fields().iter().enumerate() {
            let name = format!("interrupts_{name}");
            family(
                &name,
                help,
                &mut vcpus
                    .iter()
                    .filter_map(|(id, _, s)| Some((*id, s.as_ref()?.fields()[i].2))),
            );
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use brisk_control::Counters;

    /// Every counter and interrupt figure is in both renderings, with the
    /// same value.
    #[test]
    fn every_figure_appears_in_json_and_prometheus() {
        let c = Counters::default().snapshot();
        let stats = InterruptStats {
            raised: 7,
            coalesced: 3,
            injected: 4,
            latency_ns: 100,
            max_latency_ns: 60,
        };
        let figures = [(0, c, Some(stats)), (1, c, None)];
        let j = json(&figures, 9);
        let text = render(&figures, 9);
        let v0 = &j["vcpus"][0];
        let mut names = 0;
        for (name, _, value) in c.fields() {
            assert_eq!(v0[name], json!(value), "JSON lacks {name}");
            let sample = format!("brisk_vcpu_{name}_total{{vcpu=\"1\"}} {value}");
            assert!(
                text.lines().any(|l| l == sample),
                "Prometheus lacks {sample}"
            );
            names += 1;
        }
        for (name, _, value) in stats.fields() {
            assert_eq!(v0["interrupts"][name], json!(value), "JSON lacks {name}");
            let sample = format!("brisk_vcpu_interrupts_{name}_total{{vcpu=\"0\"}} {value}");
            assert!(
                text.lines().any(|l| l == sample),
                "Prometheus lacks {sample}"
            );
            names += 1;
        }
        // Nothing in the JSON that is not listed (id, exits, interrupts).
        assert_eq!(v0.as_object().unwrap().len(), c.fields().len() + 3);
        assert_eq!(names, 19);
        assert!(j["vcpus"][1]["interrupts"].is_null());
        assert!(text.contains("brisk_unclaimed_accesses_total 9"));
        assert!(text.contains("reason=\"mmio\""));
    }
}
