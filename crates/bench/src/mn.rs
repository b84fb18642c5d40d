//! mn: M:N (`--vcpu-threads N`, a pool of N host threads runs every vCPU)
//! against a thread per vCPU, in the same run:
//!
//! - 64 `tick` vCPUs (mostly halted) on 2 pool threads vs 64 threads: the
//!   process's threads, peak RSS and host CPU seconds per guest second
//!   (a whole `brisk run`, from the kernel's accounting), and each tick's
//!   latency (the timer's raise to KVM_INTERRUPT, in process);
//! - 1024 `tick` vCPUs on 2 pool threads vs 1024 threads: start-up time
//!   (spawn to the first tick handled), peak RSS, threads;
//! - `pingpong` round trips on 8 vCPUs, 2 pool threads vs 8 threads;
//! - fairness of CPU-bound vCPUs mixed with halting ones (`stress-irq`
//!   on 12 vCPUs: 3 spin, 3 loop on PIO, 6 halt): each CPU-bound vCPU's
//!   progress, slowest over fastest;
//! - wake latency of a halted vCPU: on no thread (pool) vs halted in user
//!   space on its own thread vs halted inside KVM;
//! - the cost of moving a vCPU to another thread: its first KVM_RUN there
//!   vs a KVM_RUN on the thread that ran it last;
//! - the host CPU a VM of 4 spinning vCPUs takes with 1 pool thread vs 4
//!   threads: M:N keeps the guest's work within N host CPUs.

use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use brisk_control::{Guest, Interrupt, Pool, PoolConfig, PoolVcpu, VcpuCtl};
use brisk_kvm::{Exit, Irqchip};
use brisk_vmm::{Output, Vm, VmConfig, VmEnd};

use crate::kick::{latencies, Kickable};
use crate::rig::{answer, Rig, Timed};
use crate::stats::{Row, Table};
use crate::Opts;

pub fn run(opts: &Opts) -> Vec<Table> {
    vec![
        tick_many(opts),
        start_thousand(opts),
        pingpong(opts),
        fairness(opts),
        wake(opts),
        moving(opts),
        bounded(opts),
    ]
}

fn pooled(guest: &str, cpus: usize, threads: Option<usize>) -> VmConfig {
    VmConfig {
        payload: brisk_vmm::Payload::builtin(guest),
        cpus,
        memory: 64 << 20,
        irqchip: Irqchip::User,
        vcpu_threads: threads,
        ..VmConfig::default()
    }
}

fn threads_name(threads: Option<usize>, cpus: usize) -> String {
    match threads {
        None => format!("{cpus} threads (1:1)"),
        Some(n) => format!("{n} pool threads (M:N)"),
    }
}

/// What the kernel accounted to one whole `brisk run`.
struct Process {
    wall: Duration,
    cpu: Duration,
    max_rss_kib: u64,
    max_threads: u64,
}

/// Why a whole `brisk run` gave no figures.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    Spawn(#[from] crate::process::SpawnError),
    #[error("cannot wait for brisk run {args}: {source}")]
    Wait {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("brisk run {args} did not exit {want}")]
    Exit { args: String, want: i32 },
}

/// Run `brisk run ARGS` to its end, sampling its thread count; its CPU
/// time and peak RSS come from wait4's rusage.
fn whole_run(args: &[String]) -> Result<Process, RunError> {
    whole_run_ending(args, 0)
}

/// As [`whole_run`], for a run that ends with exit status `want`.
fn whole_run_ending(args: &[String], want: i32) -> Result<Process, RunError> {
    let t0 = Instant::now();
    let child = crate::process::brisk_run(args, std::process::Stdio::null())?;
    let pid = child.id() as libc::pid_t;
    // Sample the thread count until the process has exited (a zombie
    // until we reap it).
    let status = format!("/proc/{pid}/status");
    let mut max_threads = 0;
    while let Ok(s) = std::fs::read_to_string(&status) {
        let field = |name: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        if field("State:").starts_with('Z') {
            break;
        }
        let threads = field("Threads:").parse().unwrap_or(0);
        max_threads = max_threads.max(threads);
        thread::sleep(Duration::from_millis(20));
    }
    let mut wstatus = 0;
    // SAFETY: a zeroed rusage for wait4 to fill; our own child's pid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; std's Child is not waited for after this.
    let r = unsafe { libc::wait4(pid, &mut wstatus, 0, &mut usage) };
    let wall = t0.elapsed();
    if r != pid {
        return Err(RunError::Wait {
            args: args.join(" "),
            source: std::io::Error::last_os_error(),
        });
    }
    if !libc::WIFEXITED(wstatus) || libc::WEXITSTATUS(wstatus) != want {
        return Err(RunError::Exit {
            args: args.join(" "),
            want,
        });
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(Process {
        wall,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss as u64,
        max_threads,
    })
}

fn args(guest: &str, cpus: usize, threads: Option<usize>) -> Vec<String> {
    let mut a = vec![
        "--guest".to_string(),
        guest.to_string(),
        "--cpus".into(),
        cpus.to_string(),
    ];
    if let Some(n) = threads {
        a.extend(["--vcpu-threads".to_string(), n.to_string()]);
    }
    a
}

/// Tick latencies of every vCPU of an in-process `tick` VM.
fn tick_latencies(cpus: usize, threads: Option<usize>, ticks: u64) -> Vec<u64> {
    let vm = Vm::start(
        &pooled(&format!("tick={ticks}"), cpus, threads),
        Output::Null,
    )
    .expect("tick VM");
    for id in 0..cpus {
        vm.pending_interrupts(id)
            .expect("user irqchip")
            .log_latencies(true);
    }
    let end = vm.wait(Some(Duration::from_secs(120)), None);
    assert_eq!(end, VmEnd::PowerOff, "tick guest");
    let lat = (0..cpus)
        .flat_map(|id| vm.pending_interrupts(id).unwrap().take_latencies())
        .collect();
    vm.shutdown().expect("vCPU threads");
    lat
}

fn tick_many(opts: &Opts) -> Table {
    let rounds = if opts.quick { 1 } else { 3 };
    let cpus = 64;
    let variants = [None, Some(2)];
    let mut lat: Vec<Vec<u64>> = vec![Vec::new(); 2];
    let mut procs: Vec<Vec<Process>> = vec![Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, threads) in variants.into_iter().enumerate() {
            lat[i].extend(tick_latencies(cpus, threads, 100));
            // 1000 ticks of 1 ms: a second of guest time.
            match whole_run(&args("tick=1000", cpus, threads)) {
                Ok(p) => procs[i].push(p),
                Err(e) => eprintln!("bench mn: {e}"),
            }
        }
    }
    let rows = variants
        .into_iter()
        .zip(lat)
        .zip(procs)
        .map(|((threads, l), p)| {
            let med = |f: &dyn Fn(&Process) -> f64| median(p.iter().map(f).collect());
            Row::new(threads_name(threads, cpus), l)
                .with("threads", med(&|p| p.max_threads as f64))
                .with("RSS MiB", med(&|p| p.max_rss_kib as f64 / 1024.0))
                .with(
                    "CPU s/guest s",
                    med(&|p| p.cpu.as_secs_f64() / p.wall.as_secs_f64()),
                )
        })
        .collect();
    Table::new(
        "mn: 64 tick vCPUs (1 ms timer, HLT between ticks), tick latency raise -> KVM_INTERRUPT",
        "threads, peak RSS and CPU seconds per wall second of a whole `brisk run --guest tick=1000 --cpus 64` (medians of runs); latencies in process",
        rows,
    )
}

fn start_thousand(opts: &Opts) -> Table {
    let rounds = if opts.quick { 1 } else { 3 };
    let cpus = 1024;
    let variants = [None, Some(2)];
    let mut procs: Vec<Vec<Process>> = vec![Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, threads) in variants.into_iter().enumerate() {
            // `tick` prints nothing (`hello` would serialise 1024 vCPUs):
            // the run's own end is the figure.
            match whole_run(&args("tick=10", cpus, threads)) {
                Ok(p) => procs[i].push(p),
                Err(e) => eprintln!("bench mn: {e}"),
            }
        }
    }
    let rows = variants
        .into_iter()
        .zip(procs)
        .map(|(threads, p)| {
            let walls = p.iter().map(|p| p.wall.as_nanos() as u64).collect();
            let med = |f: &dyn Fn(&Process) -> f64| median(p.iter().map(f).collect());
            Row::new(threads_name(threads, cpus), walls)
                .with("threads", med(&|p| p.max_threads as f64))
                .with("RSS MiB", med(&|p| p.max_rss_kib as f64 / 1024.0))
                .with("CPU s", med(&|p| p.cpu.as_secs_f64()))
        })
        .collect();
    Table::new(
        "mn: 1024 tick vCPUs (10 ticks each), spawn -> exit of a whole brisk run",
        "start-up, 10 ms of ticks and shut-down of every vCPU; peak threads and RSS from the kernel",
        rows,
    )
}

fn pingpong(opts: &Opts) -> Table {
    let rounds = if opts.quick { 1 } else { 5 };
    let (cpus, laps) = (8, 500u64);
    let variants = [None, Some(2)];
    let mut samples: Vec<Vec<u64>> = vec![Vec::new(); 2];
    for _ in 0..rounds {
        for (i, threads) in variants.into_iter().enumerate() {
            let config = pooled(&format!("pingpong={laps}"), cpus, threads);
            let t0 = Instant::now();
            let vm = Vm::start(&config, Output::Null).expect("pingpong VM");
            let end = vm.wait(Some(Duration::from_secs(120)), None);
            let took = t0.elapsed();
            assert_eq!(end, VmEnd::PowerOff, "pingpong guest");
            vm.shutdown().expect("vCPU threads");
            // One hop: a doorbell ring and the next vCPU's wake.
            samples[i].push(took.as_nanos() as u64 / (laps * cpus as u64));
        }
    }
    let rows = variants
        .into_iter()
        .zip(samples)
        .map(|(threads, s)| {
            let per_s = 1e9 / median(s.iter().map(|&v| v as f64).collect()).max(1.0);
            Row::new(threads_name(threads, cpus), s).with("hops/s", per_s)
        })
        .collect();
    Table::new(
        "mn: pingpong on 8 vCPUs, ns per hop (doorbell ring -> the next vCPU wakes and rings)",
        "a whole VM's run (start to power-off) over its hops; each hop wakes a halted vCPU",
        rows,
    )
}

fn fairness(opts: &Opts) -> Table {
    let rounds = if opts.quick { 1 } else { 3 };
    let cpus = 12;
    let variants = [None, Some(2)];
    let mut samples: Vec<Vec<u64>> = vec![Vec::new(); 2];
    let mut spread: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let busy: Vec<usize> = (0..cpus).filter(|id| id % 4 < 2).collect();
    for _ in 0..rounds {
        for (i, threads) in variants.into_iter().enumerate() {
            let vm = Vm::start(&pooled("stress-irq", cpus, threads), Output::Null)
                .expect("stress-irq VM");
            thread::sleep(Duration::from_millis(100));
            let before: Vec<u64> = busy.iter().map(|&id| vm.progress(id)).collect();
            let t0 = Instant::now();
            thread::sleep(Duration::from_secs(1));
            let took = t0.elapsed().as_nanos() as u64;
            let done: Vec<u64> = busy
                .iter()
                .zip(&before)
                .map(|(&id, b)| vm.progress(id) - b)
                .collect();
            vm.shutdown().expect("vCPU threads");
            // ns per 1000 steps, per vCPU, each role against its own kind.
            for role in [0, 1] {
                let of: Vec<u64> = busy
                    .iter()
                    .zip(&done)
                    .filter(|(id, _)| **id % 4 == role)
                    .map(|(_, d)| *d)
                    .collect();
                let (lo, hi) = (*of.iter().min().unwrap(), *of.iter().max().unwrap());
                spread[i].push(lo as f64 / hi.max(1) as f64);
                samples[i].extend(of.iter().map(|d| took * 1000 / d.max(&1)));
            }
        }
    }
    let rows = variants
        .into_iter()
        .zip(samples)
        .zip(spread)
        .map(|((threads, s), f)| {
            let worst = f.iter().copied().fold(1.0, f64::min);
            Row::new(threads_name(threads, cpus), s)
                .with("slowest/fastest (median)", median(f.clone()))
                .with("worst", worst)
        })
        .collect();
    Table::new(
        "mn: fairness, stress-irq on 12 vCPUs (3 spin, 3 PIO loops, 6 halt on timers and doorbells), ns per 1000 steps of each CPU-bound vCPU",
        "slowest over fastest of the vCPUs of one role over 1 s (1.0: equal shares); on 2 host cores either way",
        rows,
    )
}

/// The `halt` guest on one vCPU run by a pool of `threads` (M:N), kicked
/// with `VcpuCtl::kick`: the vCPU is on no thread when kicked.
fn pool_loop(threads: usize) -> Kickable {
    let mut rig = Rig::new("halt", 1, Irqchip::User);
    let bus = rig.bus.clone();
    let epoch = Instant::now();
    let (tx, returns) = mpsc::channel();
    let timed = Timed::entries(rig.vcpus.pop().unwrap(), epoch, tx);
    let ctl = Arc::new(VcpuCtl::<Timed>::new(0));
    let (done_tx, done) = mpsc::channel();
    let vcpu = PoolVcpu {
        ctl: ctl.clone(),
        guest: timed,
        on_exit: Box::new(move |t: &mut Timed, exit| Ok(answer(&mut t.inner, exit, &bus))),
        on_end: Box::new(move |end| {
            let _ = done_tx.send(end.is_ok());
        }),
    };
    let config = PoolConfig {
        threads,
        slice: Some(brisk_vmm::POOL_SLICE),
        on_thread_start: None,
    };
    let pool = Pool::start(config, vec![vcpu]).expect("pool");
    Kickable::of_vcpu(ctl, returns, epoch, move || {
        assert!(done.recv().unwrap_or(false), "pool loop");
        pool.join();
        drop(rig);
    })
}

fn wake(opts: &Opts) -> Table {
    let n = if opts.quick { 150 } else { 1500 };
    let mut samples = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..3 {
        let k = pool_loop(2);
        samples[0].extend(latencies(&k, n / 3, Duration::from_millis(1)));
        (k.stop)();
        for (i, irqchip) in [(1, Irqchip::User), (2, Irqchip::Kernel)] {
            let (k, _) = crate::kick::halted(irqchip);
            samples[i].extend(latencies(&k, n / 3, Duration::from_millis(1)));
            (k.stop)();
        }
    }
    let [pool, user, kernel] = samples;
    Table::new(
        "mn: halted vCPU woken, kick() -> a thread runs it at its entry point",
        "pool: the vCPU holds no thread, the kick queues it and wakes a sleeping pool thread; 1:1: its own thread blocks on a futex (user-space HLT) or in KVM_RUN (in-kernel HLT, a signal)",
        vec![
            Row::new("1:1, user-space HLT (futex wake)", user),
            Row::new("M:N, on no thread (pool of 2)", pool),
            Row::new("1:1, in-kernel HLT (signal)", kernel),
        ],
    )
}

/// KVM_RUN (one PIO exit of `pio`) right after the vCPU moved to another
/// thread, and again on the same thread, for `moves` moves.
fn moving(opts: &Opts) -> Table {
    let moves = if opts.quick { 200 } else { 2000 };
    let mut rig = Rig::new("pio", 1, Irqchip::User);
    let bus = rig.bus.clone();
    let vcpu = rig.vcpus.pop().unwrap();
    // Two threads hand the vCPU back and forth; each times its first
    // entry (the move) and a second one (same thread).
    let (to_b, at_b) = mpsc::channel::<brisk_kvm::KvmVcpu>();
    let (to_a, at_a) = mpsc::channel::<brisk_kvm::KvmVcpu>();
    let (res_tx, res) = mpsc::channel::<(u64, u64)>();
    let worker = |rx: mpsc::Receiver<brisk_kvm::KvmVcpu>,
                  tx: mpsc::Sender<brisk_kvm::KvmVcpu>,
                  res: mpsc::Sender<(u64, u64)>,
                  bus: Arc<brisk_devices::DeviceManager>| {
        thread::spawn(move || {
            while let Ok(mut v) = rx.recv() {
                let _interrupt: Box<dyn Interrupt> = v.bind_thread();
                let mut once = || {
                    let t = Instant::now();
                    let exit = v.enter().expect("KVM_RUN");
                    let took = t.elapsed().as_nanos() as u64;
                    if let Some(e @ Exit::IoIn { .. }) = exit {
                        answer(&mut v, e, &bus);
                    }
                    took
                };
                let moved = once();
                let same = once();
                v.unbind_thread();
                if res.send((moved, same)).is_err() || tx.send(v).is_err() {
                    return;
                }
            }
        })
    };
    let a = worker(at_a, to_b.clone(), res_tx.clone(), bus.clone());
    let b = worker(at_b, to_a.clone(), res_tx, bus);
    to_a.send(vcpu).unwrap();
    let (mut moved, mut same) = (Vec::new(), Vec::new());
    for _ in 0..moves {
        let (m, s) = res.recv().expect("moves");
        moved.push(m);
        same.push(s);
    }
    drop((to_a, to_b, res));
    let _ = (a.join(), b.join());
    drop(rig);
    Table::new(
        "mn: moving a vCPU, KVM_RUN round trip (one PIO exit) on its next thread",
        "two threads hand one vCPU back and forth; each times its first KVM_RUN (the vCPU just moved) and a second one; host kernel 6.13+ (no synchronize_rcu on a move)",
        vec![
            Row::new("KVM_RUN on the same thread", same),
            Row::new("first KVM_RUN after a move", moved),
        ],
    )
}

/// 4 vCPUs spinning for 1 s (`--timeout 1s`, exit status 10): the host
/// CPU time of the whole process per second of wall time.
fn bounded(opts: &Opts) -> Table {
    let rounds = if opts.quick { 1 } else { 3 };
    let cpus = 4;
    let variants = [None, Some(1)];
    let mut samples: Vec<Vec<u64>> = vec![Vec::new(); 2];
    for _ in 0..rounds {
        for (i, threads) in variants.into_iter().enumerate() {
            let mut a = args("spin", cpus, threads);
            a.extend(["--timeout".to_string(), "1s".to_string()]);
            match whole_run_ending(&a, 10) {
                Ok(p) => samples[i].push((p.cpu.as_secs_f64() / p.wall.as_secs_f64() * 1e9) as u64),
                Err(e) => eprintln!("bench mn: {e}"),
            }
        }
    }
    let rows = variants
        .into_iter()
        .zip(samples)
        .map(|(threads, s)| Row::new(threads_name(threads, cpus), s))
        .collect();
    Table::new(
        "mn: host CPU of 4 spinning vCPUs, CPU ns per wall second of a whole brisk run (1e9 = one host CPU)",
        "M:N keeps the guest's work within its N threads (here 1 of the 2 cores); 1:1 takes every core it can",
        rows,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
