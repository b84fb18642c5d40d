//! pause: pause_all + resume_all wall time with 1..=8 vCPUs, against
//! stopping them one by one (signal and wait each, cloud-hypervisor#7290).

use std::thread;
use std::time::{Duration, Instant};

use brisk_control::{pause_all, resume_all, Deadline, ExclusiveGroup};
use brisk_vmm::{Output, Vm, VmConfig};

use crate::stats::{Row, Table};
use crate::Opts;

pub fn run(opts: &Opts) -> Vec<Table> {
    let iterations = if opts.quick { 40 } else { 400 };
    let deadline = || Deadline::after(Duration::from_secs(5));
    let (mut together, mut one_by_one) = (Vec::new(), Vec::new());
    for n in 1..=8 {
        let config = VmConfig {
            payload: brisk_vmm::Payload::builtin("spin"),
            cpus: n,
            ..VmConfig::default()
        };
        let vm = Vm::start(&config, Output::Null).expect("VM");
        let vcpus = || vm.vcpus().iter().map(|v| &**v);
        let (mut all, mut seq) = (Vec::new(), Vec::new());
        for i in 0..iterations {
            // Let every vCPU get back into the guest before the next pause.
            thread::sleep(Duration::from_millis(2));
            let t0 = Instant::now();
            if i % 2 == 0 {
                pause_all(vcpus(), deadline()).expect("pause_all");
                resume_all(vcpus());
                all.push(t0.elapsed().as_nanos() as u64);
            } else {
                for v in vcpus() {
                    v.stop(deadline()).expect("stop");
                }
                for v in vcpus() {
                    v.resume();
                }
                seq.push(t0.elapsed().as_nanos() as u64);
            }
        }
        vm.shutdown().expect("VM shutdown");
        let (a, s) = (
            Row::new(format!("{n} vCPUs"), all),
            Row::new(format!("{n} vCPUs"), seq),
        );
        let speedup = s.median_ns as f64 / a.median_ns.max(1) as f64;
        together.push(a.with("one-by-one / pause_all", speedup));
        one_by_one.push(s);
    }
    vec![
        exclusive_switch(iterations),
        Table::new(
            "pause: pause_all + resume_all (signal all, then wait for all), spinning vCPUs",
            "ratio: to 1 vCPU; the extra column is the one-by-one median divided by this one",
            together,
        ),
        Table::new(
            "pause: stop each vCPU in turn, then resume each (signal and wait one by one)",
            "the pattern cloud-hypervisor#7290 replaced; ratio: to 1 vCPU",
            one_by_one,
        ),
    ]
}

/// An exclusive group of two spinning vCPUs (one runs at a time):
/// `switch_to` the other (stop the running one synchronously, resume the
/// other) against stopping and resuming the running one itself.
fn exclusive_switch(iterations: usize) -> Table {
    let deadline = || Deadline::after(Duration::from_secs(5));
    let config = VmConfig {
        payload: brisk_vmm::Payload::builtin("spin"),
        cpus: 2,
        ..VmConfig::default()
    };
    let vm = Vm::start(&config, Output::Null).expect("VM");
    let group = ExclusiveGroup::new(vm.vcpus().to_vec(), 0, deadline()).expect("group");
    let (mut switch, mut stop_resume) = (Vec::new(), Vec::new());
    for i in 0..2 * iterations {
        thread::sleep(Duration::from_millis(2)); // the running one is in the guest
        let running = group.running().expect("a member runs");
        let t0 = Instant::now();
        if i % 2 == 0 {
            group.switch_to(1 - running, deadline()).expect("switch_to");
            switch.push(t0.elapsed().as_nanos() as u64);
        } else {
            let v = vm.vcpu(running);
            v.stop(deadline()).expect("stop");
            v.resume();
            stop_resume.push(t0.elapsed().as_nanos() as u64);
        }
    }
    drop(group);
    vm.shutdown().expect("VM shutdown");
    Table::new(
        "pause: exclusive group switch_to between 2 spinning vCPUs",
        "switch_to = stop the running member (synchronous) + resume the other; baseline: stop + resume of the running member itself",
        vec![
            Row::new("stop + resume of the running vCPU", stop_resume),
            Row::new("ExclusiveGroup::switch_to", switch),
        ],
    )
}
