//! api: pause and resume round trips through the API socket (HTTP client ->
//! server thread -> control plane -> reply), against the same operations
//! called in-process.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use brisk_api::client::request;
use brisk_api::ApiServer;
use brisk_control::{pause_all, resume_all, Deadline};
use brisk_vmm::{Output, Vm, VmConfig};

use crate::stats::{Row, Table};
use crate::Opts;

pub fn run(_opts: &Opts) -> Vec<Table> {
    let mut tables = one(2);
    tables.extend(one(1));
    tables
}

/// 200 pauses (the figure the API issue asks for) with `cpus` spinning vCPUs.
fn one(cpus: usize) -> Vec<Table> {
    let n = 200;
    let config = VmConfig {
        payload: brisk_vmm::Payload::builtin("spin"),
        cpus,
        ..VmConfig::default()
    };
    let vm = Arc::new(Vm::start(&config, Output::Null).expect("VM"));
    let path = std::env::temp_dir().join(format!("brisk-bench-api-{}.sock", std::process::id()));
    let server = ApiServer::start(&path, vm.clone()).expect("API socket");
    let put = |p: &str| {
        let r = request(&path, "PUT", p, None, None).expect("API reachable");
        assert_eq!(r.status, 204, "{p}: {}", r.body);
    };
    let deadline = || Deadline::after(Duration::from_secs(5));
    let vcpus = || vm.vcpus().iter().map(|v| &**v);
    let (mut api_pause, mut api_resume, mut direct_pause, mut direct_resume) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..2 * n {
        thread::sleep(Duration::from_millis(2)); // vCPUs back in the guest
        let t0 = Instant::now();
        if i % 2 == 0 {
            put("/api/v1/vm.pause");
            api_pause.push(t0.elapsed().as_nanos() as u64);
            let t1 = Instant::now();
            put("/api/v1/vm.resume");
            api_resume.push(t1.elapsed().as_nanos() as u64);
        } else {
            pause_all(vcpus(), deadline()).expect("pause_all");
            direct_pause.push(t0.elapsed().as_nanos() as u64);
            let t1 = Instant::now();
            resume_all(vcpus());
            direct_resume.push(t1.elapsed().as_nanos() as u64);
        }
    }
    drop(server);
    drop(vm);
    vec![
        Table::new(
            &format!("api: pause round trip, {cpus} spinning vCPU(s), 200 pauses"),
            "brisk ctl's client over the Unix socket vs pause_all called in-process",
            vec![
                Row::new("pause_all in-process", direct_pause),
                Row::new("PUT /api/v1/vm.pause", api_pause),
            ],
        ),
        Table::new(
            &format!("api: resume round trip, {cpus} spinning vCPU(s), 200 resumes"),
            "brisk ctl's client over the Unix socket vs resume_all called in-process; the reply is written after the vCPUs run again, so with as many spinning vCPUs as cores the API thread waits for the scheduler",
            vec![
                Row::new("resume_all in-process", direct_resume),
                Row::new("PUT /api/v1/vm.resume", api_resume),
            ],
        ),
    ]
}
