//! boot: a whole `brisk run` process, from spawn to the guest's marker on
//! its console and from spawn to the process's exit, for the built-in
//! `hello` guest (the baseline), a multiboot test kernel and Linux (a PVH
//! vmlinux with the initramfs, and a bzImage), median of 5 (of 1 with
//! --quick). Linux comes from scripts/guest-kernel.sh (built on first use).
//!
//! blk: virtio-blk 4 KiB reads from the `virtioblk` test kernel (timed by
//! the guest with the ACPI PM timer), random and sequential, against the
//! same reads done with pread on the image file by this process in the
//! same run.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use brisk_test_kernels as k;

use crate::stats::{Row, Table};
use crate::Opts;

/// Why one timed boot gave no figures.
#[derive(Debug, thiserror::Error)]
enum BootError {
    #[error(transparent)]
    Spawn(#[from] crate::process::SpawnError),
    #[error("cannot wait for brisk run: {0}")]
    Wait(#[source] std::io::Error),
    #[error("brisk run {args} ended ({status}) without printing '{marker}'")]
    NoMarker {
        args: String,
        status: ExitStatus,
        marker: String,
    },
}

/// One boot: nanoseconds to the marker and to exit, and the exit status.
fn boot_once(args: &[String], marker: &str) -> Result<(u64, u64), BootError> {
    let t0 = Instant::now();
    let mut child = crate::process::brisk_run(args, Stdio::piped())?;
    let stdout = child.stdout.take().expect("piped");
    let mut to_marker = None;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if to_marker.is_none() && line.contains(marker) {
            to_marker = Some(t0.elapsed().as_nanos() as u64);
        }
    }
    let status = child.wait().map_err(BootError::Wait)?;
    let to_exit = t0.elapsed().as_nanos() as u64;
    let to_marker = to_marker.ok_or_else(|| BootError::NoMarker {
        args: args.join(" "),
        status,
        marker: marker.to_string(),
    })?;
    Ok((to_marker, to_exit))
}

struct Case {
    name: String,
    args: Vec<String>,
    marker: &'static str,
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

pub fn run(opts: &Opts) -> Vec<Table> {
    let runs = if opts.quick { 1 } else { 5 };
    let mut cases = vec![
        Case {
            name: "built-in hello, 1 vCPU".into(),
            args: strings(&["--guest", "hello", "--cpus", "1"]),
            marker: "Hello from vCPU 0",
        },
        Case {
            name: "multiboot hello.elf, 1 vCPU".into(),
            args: strings(&["--kernel", k::HELLO, "--cpus", "1"]),
            marker: "hello: exiting",
        },
    ];
    match k::guest_linux() {
        Ok(linux) => {
            let cmdline = k::linux_cmdline("");
            let common = |kernel: &std::path::Path| {
                let mut a = strings(&["--cpus", "1", "--memory", "256M", "--timeout", "900s"]);
                a.extend(["--kernel".into(), kernel.display().to_string()]);
                a.extend(["--cmdline".into(), cmdline.clone()]);
                a.extend(["--initramfs".into(), linux.initramfs.display().to_string()]);
                a
            };
            cases.push(Case {
                name: "Linux vmlinux (PVH) + initramfs".into(),
                args: common(&linux.vmlinux),
                marker: "Run /init as init process",
            });
            let mut user = common(&linux.vmlinux);
            user.extend(strings(&["--irqchip", "user"]));
            cases.push(Case {
                name: "Linux vmlinux (PVH) + initramfs, brisk's irqchip".into(),
                args: user,
                marker: "Run /init as init process",
            });
            cases.push(Case {
                name: "Linux bzImage + initramfs".into(),
                args: common(&linux.bzimage),
                marker: "Run /init as init process",
            });
        }
        Err(e) => eprintln!("bench boot: no guest Linux ({e}); Linux rows left out"),
    }
    let (mut marker_rows, mut exit_rows) = (Vec::new(), Vec::new());
    for c in &cases {
        let (mut to_marker, mut to_exit) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            match boot_once(&c.args, c.marker) {
                Ok((m, e)) => {
                    to_marker.push(m);
                    to_exit.push(e);
                }
                Err(e) => eprintln!("bench boot: {}: {e}", c.name),
            }
        }
        marker_rows.push(Row::new(c.name.clone(), to_marker));
        exit_rows.push(Row::new(c.name.clone(), to_exit));
    }
    let pvm = if k::host_is_pvm() {
        " Under PVM a Linux guest's user mode cannot make system calls: Linux ends with a pvpanic after 'Run /init'."
    } else {
        ""
    };
    vec![
        Table::new(
            "boot: spawn of `brisk run` to the guest's marker line",
            &format!("markers: 'Hello from vCPU 0', 'hello: exiting', 'Run /init as init process'; median of {runs}.{pvm}"),
            marker_rows,
        ),
        Table::new(
            "boot: spawn of `brisk run` to its exit",
            &format!("median of {runs}.{pvm}"),
            exit_rows,
        ),
    ]
}

/// The figure the `virtioblk` kernel prints for `phase` ("random" or
/// "sequential"): microseconds for its reads.
fn guest_us(out: &str, phase: &str) -> Option<u64> {
    let line = out
        .lines()
        .find(|l| l.contains(&format!("bench {phase} 4k reads")))?;
    line.split(" in ")
        .nth(1)?
        .trim_end_matches(" us")
        .trim()
        .parse()
        .ok()
}

pub fn run_blk(opts: &Opts) -> Vec<Table> {
    let n: u64 = if opts.quick { 500 } else { 5000 };
    let image = std::env::temp_dir().join(format!("brisk-bench-blk-{}.img", std::process::id()));
    let size: u64 = 64 << 20;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&image)
        .expect("bench image");
    file.set_len(size).expect("bench image size");
    // Written, so that both sides read data (and the page cache has it).
    let chunk = vec![0x5au8; 1 << 20];
    for at in (0..size).step_by(chunk.len()) {
        file.write_all_at(&chunk, at).expect("bench image");
    }
    let rounds = if opts.quick { 1 } else { 3 };
    let (mut raw_rand, mut raw_seq) = (Vec::new(), Vec::new());
    // [engine, inline]: random, sequential.
    let mut guest: [(Vec<u64>, Vec<u64>); 2] = Default::default();
    let modes = [
        brisk_vmm::platform::Notify::Engine,
        brisk_vmm::platform::Notify::Inline,
    ];
    for _ in 0..rounds {
        for (mode, (rand, seq)) in modes.iter().zip(guest.iter_mut()) {
            // The guest's reads, per request (ns).
            let capture = brisk_vmm::Capture::default();
            let config = brisk_vmm::VmConfig {
                cpus: 1,
                irqchip: brisk_vmm::Irqchip::Kernel,
                payload: brisk_vmm::Payload::Kernel(brisk_vmm::KernelConfig {
                    path: k::VIRTIOBLK.into(),
                    cmdline: format!("bench={n}"),
                    initrd: None,
                }),
                disks: vec![brisk_vmm::DiskConfig {
                    path: image.clone(),
                    readonly: true,
                    ..Default::default()
                }],
                disk_io: *mode,
                ..brisk_vmm::VmConfig::default()
            };
            let vm = brisk_vmm::Vm::start(&config, brisk_vmm::Output::Capture(capture.clone()))
                .expect("virtioblk kernel");
            vm.wait(Some(Duration::from_secs(600)), None);
            let _ = vm.shutdown();
            let out = capture.text();
            if let (Some(r), Some(s)) = (guest_us(&out, "random"), guest_us(&out, "sequential")) {
                rand.push(r * 1000 / n);
                seq.push(s * 1000 / n);
            } else {
                eprintln!("bench blk: the virtioblk kernel printed no figures:\n{out}");
            }
        }
        // The same reads with pread here: the guest's LCG, the same span.
        let span = (size / 512 / 8) as u32;
        let mut buf = vec![0u8; 4096];
        let mut rng: u32 = 12345;
        let t0 = Instant::now();
        for _ in 0..n {
            rng = rng.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let sector = u64::from(((rng >> 8) % span) * 8);
            file.read_exact_at(&mut buf, sector * 512).expect("pread");
        }
        raw_rand.push(t0.elapsed().as_nanos() as u64 / n);
        let t0 = Instant::now();
        for i in 0..n {
            let sector = u64::from((i as u32 % span) * 8);
            file.read_exact_at(&mut buf, sector * 512).expect("pread");
        }
        raw_seq.push(t0.elapsed().as_nanos() as u64 / n);
    }
    let _ = std::fs::remove_file(&image);
    let mb_s = |ns: &[u64]| {
        let mut v = ns.to_vec();
        v.sort_unstable();
        let m = v.get(v.len() / 2).copied().unwrap_or(0).max(1);
        4096.0 * 1e9 / m as f64 / (1 << 20) as f64
    };
    let row = |name: &str, v: Vec<u64>| {
        let t = mb_s(&v);
        Row::new(name, v).with("MiB/s", t)
    };
    let note = format!(
        "per 4 KiB read, median over {rounds} rounds of {n} reads; guest: the virtioblk test kernel (one request at a time, polling), timed with the PM timer, its requests served by the I/O engine (QueueNotify an ioeventfd, the I/O thread reads) or inline (the notifying vCPU reads before it re-enters); raw: pread on the same file (page cache) here"
    );
    let [(engine_rand, engine_seq), (inline_rand, inline_seq)] = guest;
    vec![
        Table::new(
            "blk: 4 KiB random reads, virtio-blk vs pread",
            &note,
            vec![
                row("raw pread", raw_rand),
                row("virtio-blk, I/O engine", engine_rand),
                row("virtio-blk, inline", inline_rand),
            ],
        ),
        Table::new(
            "blk: 4 KiB sequential reads, virtio-blk vs pread",
            &note,
            vec![
                row("raw pread", raw_seq),
                row("virtio-blk, I/O engine", engine_seq),
                row("virtio-blk, inline", inline_seq),
            ],
        ),
    ]
}
