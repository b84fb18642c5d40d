//! Command-line interface.

use std::time::Duration;

use brisk_vmm::seccomp::ThreadKind;
use brisk_vmm::{Irqchip, Output, Payload, Vm, VmConfig, VmEnd};
use clap::{Parser, Subcommand, ValueEnum};

use crate::{signals, status};

/// brisk: a KVM virtual machine monitor whose vCPU control plane never loses
/// a kick and never sends a needless signal.
#[derive(Parser, Debug)]
#[command(name = "brisk", version, propagate_version = true)]
pub struct Cli {
    /// Log more (-v: info, -vv: debug). BRISK_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a built-in guest (with no options: `hello` on 2 vCPUs).
    #[command(after_help = status::HELP)]
    Run(RunArgs),
    /// List the built-in guests.
    Guests,
    /// Stress the vCPU control plane: random kick/stop/resume/pause_all/
    /// run_on/run_on_async/switch_to (and, with stress-irq, interrupt raises
    /// and idle tasks) from several threads against spinning, PIO-looping and
    /// halted vCPUs; checks every deadline and counter, and that no raised
    /// interrupt stays pending past the deadline on a running vCPU.
    #[command(
        after_help = "Exit status: 0 when every property held, 14 when one failed, 4/6/12 as for `run`."
    )]
    Stress(StressArgs),
    /// Drive a running VM through its API socket (`brisk run --api-socket`).
    #[command(
        after_help = "Exit status: 0 on success, 16 when the API answered an error, 18 when the socket cannot be reached."
    )]
    Ctl(CtlArgs),
    /// Measure the exit path, kick latency and pause-all against baselines
    /// run side by side (medians, p99, ratios).
    Bench(BenchArgs),
    /// Be Firecracker: its command line, its config file and its API (on
    /// the same socket as brisk's own), so tools that spawn and drive
    /// Firecracker drive brisk. See docs/kata.md.
    #[command(after_help = status::HELP)]
    Firecracker(crate::firecracker::FirecrackerArgs),
    /// Fold the diff snapshots (`brisk ctl snapshot --diff`) of the
    /// snapshot in DIR into one full memory file (synced and renamed
    /// into place, then the state naming it; the old files go after).
    #[command(
        after_help = "Exit status: 0 when merged (or nothing to merge), 6 when DIR is not a snapshot brisk can read or write."
    )]
    MergeSnapshot {
        /// The snapshot directory.
        dir: std::path::PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct CtlArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "PATH")]
    api_socket: std::path::PathBuf,
    /// Print the raw JSON reply instead of a summary.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    op: CtlOp,
}

#[derive(Subcommand, Debug)]
enum CtlOp {
    /// State, guest, memory, uptime, and each vCPU's mode.
    Info,
    /// Pause every vCPU (returns once all are parked).
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Shut the VM down (brisk exits 0).
    Shutdown,
    /// Per-vCPU counters.
    Counters,
    /// Kick one vCPU out of the guest once.
    Kick {
        /// vCPU index.
        id: usize,
    },
    /// Check the VMM answers; prints its version.
    Ping,
    /// Pause the VM, save it to DIR (guest memory and a versioned state
    /// file; created if missing, an earlier snapshot there replaced), and
    /// let it go on as it was. --live writes memory while the guest runs;
    /// --diff adds a layer of what changed instead of replacing. Restore it with `brisk run --restore DIR`.
    Snapshot {
        /// The snapshot directory (made absolute for the API).
        dir: std::path::PathBuf,
        /// Write guest memory while the guest runs (passes over the pages
        /// it dirties) and stop it only for the last pages and the state.
        #[arg(long)]
        live: bool,
        /// With --live: stop the guest once what is left would take at
        /// most this many milliseconds to write.
        #[arg(long, requires = "live", value_name = "MS")]
        max_stop_ms: Option<u64>,
        /// Write only the pages written since the VM's previous snapshot
        /// in DIR, as a layer on it (needs `run --track-dirty-pages`);
        /// `brisk merge-snapshot DIR` folds the layers into one file.
        #[arg(long, conflicts_with = "live")]
        diff: bool,
    },
    /// Migrate the VM live to a `brisk run --receive-migration URL` that
    /// waits there: pre-copy while the guest runs, then a stop-and-copy
    /// within the downtime budget. Progress (bytes, rate, dirty pages
    /// left, estimated downtime) goes to stderr; exits 0 once the VM runs
    /// at the destination (the source brisk then exits 0 too).
    SendMigration {
        /// `unix:PATH` or `tcp:IP:PORT`.
        url: String,
        /// The longest the guest may be stopped, in milliseconds.
        #[arg(long, default_value_t = 300)]
        downtime_ms: u64,
        /// Give up, the VM still running here, if the copy has not
        /// converged after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
        /// At the timeout, stop the guest and copy the rest anyway (over
        /// the downtime budget) instead of giving up.
        #[arg(long)]
        force: bool,
        /// Local upgrade: hand guest memory to the destination as a file
        /// descriptor (`unix:` only; the VM must run with
        /// --shared-memory): nothing is copied.
        #[arg(long)]
        local: bool,
    },
    /// Cancel a migration in progress: the VM keeps running here.
    CancelMigration,
    /// Bring a VM into a brisk started with --wait-for-vm from a snapshot
    /// directory (vm.restore).
    Restore {
        dir: std::path::PathBuf,
        /// Leave it paused (`brisk ctl resume` starts it).
        #[arg(long)]
        paused: bool,
    },
    /// Make a brisk started with --wait-for-vm wait on URL (`unix:PATH`
    /// or `tcp:IP:PORT`) for a migration (vm.receive-migration);
    /// returns once the VM runs there.
    ReceiveMigration {
        url: String,
        /// Leave it paused once received.
        #[arg(long)]
        paused: bool,
    },
    /// The outgoing migration's progress.
    Migration,
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Which benchmark.
    #[arg(value_enum, default_value_t = BenchWhich::All)]
    which: BenchWhich,
    /// Fewer samples: `all` in under a minute.
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
    /// Also write SVG latency distributions (CDFs) into this directory.
    #[arg(long, value_name = "DIR")]
    plot: Option<std::path::PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum BenchWhich {
    /// PIO exit round trip: brisk vs raw KVM_RUN vs KVM_SET_SIGNAL_MASK; N-vCPU exits/s.
    Exit,
    /// Kick latency (spinning; halted in KVM's irqchip and in user space) for three strategies; stop on a parked vCPU.
    Kick,
    /// pause_all + resume_all with 1..=8 vCPUs vs one-by-one.
    Pause,
    /// Pause/resume round trips through the API socket vs in-process.
    Api,
    /// Timer interrupt latency (user irqchip) with and without idle-time
    /// tasks; IPI round trip and LAPIC timer lateness, KVM's irqchip vs
    /// brisk's (the ipistorm kernel).
    Irq,
    /// Spawn to marker and to exit: built-in hello, a multiboot kernel,
    /// Linux (vmlinux on both irqchips, and bzImage; built by
    /// scripts/guest-kernel.sh).
    /// Minutes under PVM; not part of `all`.
    Boot,
    /// virtio-blk 4 KiB random and sequential reads, served by the I/O
    /// engine and inline on the vCPU, vs pread on the file.
    Blk,
    /// virtio-net on a TAP: guest → host frames/s and host → guest → host
    /// round trips (64 and 1514 bytes) vs a host thread on the TAP. Needs
    /// root (it makes its TAPs).
    Net,
    /// Hybrid vsock: 64-byte round trips and echo throughput through
    /// brisk to an echoing guest vs a Unix socket pair on the host.
    Vsock,
    /// Snapshot create and restore-to-running (1 and 2 vCPUs, 256 MiB and
    /// 2 GiB; --quick: 256 MiB) vs pwrite of the bytes and a fresh VM
    /// start; live migration downtime and total (idle, dirtying, local fd
    /// hand-over at 2 GiB) vs pause + resume in place; live vs
    /// stop-and-copy stop time, diff vs full (512 MiB), restore by RAM
    /// size (256 MiB and 4 GiB), migration tracked by the dirty bitmap vs
    /// the dirty ring (idle, and dirtying 4, 16 and 64 MiB per vCPU).
    Snapshot,
    /// M:N (--vcpu-threads 2) vs a thread per vCPU: 64 tick vCPUs
    /// (threads, RSS, CPU per guest second, tick latency), 1024 tick vCPUs
    /// (start-up to exit, RSS, threads), pingpong on 8 vCPUs, fairness of
    /// CPU-bound vCPUs, wake latency of a halted vCPU (pool, 1:1 user
    /// space, in-kernel), and the cost of moving a vCPU between threads.
    Mn,
    /// All of the above but boot.
    All,
}

#[derive(clap::Args, Debug)]
struct StressArgs {
    /// The guest: stress-irq (user irqchip only: vCPU i by i mod 4 spins or
    /// loops on PIO with interrupts on, or idles in `sti; hlt` woken only by
    /// its timer or by doorbell rings) or stress (vCPU i spins, loops on PIO
    /// or halts with interrupts off, by i mod 3). Default: stress-irq with
    /// --irqchip user, stress with --irqchip kernel.
    #[arg(long, value_parser = ["stress-irq", "stress"])]
    guest: Option<String>,
    /// Operations in total, over all controller threads.
    #[arg(long, default_value_t = 100_000)]
    ops: u64,
    /// Seed of the random choices (same seed, same choices per controller).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// vCPUs (their roles: see --guest).
    #[arg(long, default_value_t = 4)]
    cpus: usize,
    /// Controller threads issuing operations.
    #[arg(long, default_value_t = 2)]
    controllers: usize,
    /// Bound on every synchronous operation, and on how long a raised
    /// interrupt may stay pending on a running vCPU (e.g. 5s).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    deadline: Duration,
    /// Where HLT is handled (see `brisk run --help`).
    #[arg(long, value_enum, default_value_t = IrqchipArg::User)]
    irqchip: IrqchipArg,
    /// Run the vCPUs on a pool of N host threads (see `brisk run --help`).
    #[arg(long, value_name = "N")]
    vcpu_threads: Option<usize>,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Built-in guest to boot (see `brisk guests`).
    #[arg(long, default_value = "hello")]
    guest: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    cpus: usize,
    /// M:N: run all vCPUs on a pool of N host threads (1 to --cpus)
    /// instead of a thread each. A vCPU gives its thread back when it
    /// halts or is paused, and when its time slice ends while another
    /// vCPU waits; a kick to a vCPU on no thread is a queue entry, not a
    /// signal. Halted vCPUs' idle tasks run on the pool. Needs --irqchip
    /// user (under KVM's irqchip a halt never leaves KVM_RUN) and a host
    /// kernel from 6.13 (before it, KVM_RUN on a new thread can stall).
    #[arg(long, value_name = "N")]
    vcpu_threads: Option<usize>,
    /// Guest memory, with a K, M or G suffix (e.g. 64M).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    memory: u64,
    /// Keep guest RAM in a memfd, mapped shared, rather than anonymous
    /// memory: a local upgrade (`brisk ctl send-migration --local`) can
    /// then hand it to the new brisk without copying a page.
    #[arg(long)]
    shared_memory: bool,
    /// Keep KVM's dirty log on from the start, so `brisk ctl snapshot
    /// --diff` can write only the pages written since the VM's previous
    /// snapshot (Firecracker's track_dirty_pages; each first write to a
    /// page after a snapshot then costs a fault).
    #[arg(long)]
    track_dirty_pages: bool,
    /// Track the guest's writes (for migrations, live and diff snapshots)
    /// with KVM's per-vCPU dirty rings (KVM_CAP_DIRTY_LOG_RING) instead of
    /// its per-slot bitmaps: each look at the log then costs in proportion
    /// to the pages written, not to RAM. A vCPU whose ring fills stops to
    /// collect it; where the host outruns that stop (PVM) a ring can
    /// overflow, and brisk then counts every page as dirty (correct, but
    /// no faster than stop-and-copy). Refused where KVM has no ring. Not
    /// the default: never faster than the bitmap on the hosts measured
    /// (docs/benchmarks.md).
    #[arg(long)]
    dirty_ring: bool,
    /// Stop the guest after this long (e.g. 10s, 500ms, 2m); exit status 10.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Where HLT and interrupts are handled: `user` (HLT exits to brisk,
    /// which halts the vCPU in user space and injects interrupts itself;
    /// the default for built-in guests; for a --kernel, brisk's own
    /// LAPICs, IOAPIC, PIC and PIT, so the VMM sees the guest's idle time,
    /// at 4-5x KVM's cost per IPI here) or `kernel` (KVM's in-kernel
    /// PIC/IOAPIC/LAPIC and PIT; the default with --kernel).
    #[arg(long, value_enum)]
    irqchip: Option<IrqchipArg>,
    /// Boot this kernel instead of a built-in guest; its format is read
    /// from the file: a Linux bzImage (64-bit boot protocol) or ELF
    /// vmlinux (its PVH entry when it has the note), or a multiboot (v1)
    /// ELF kernel (32-bit protected mode, EAX=0x2BADB002, EBX=multiboot
    /// info). The PC platform: ACPI tables (MADT, FADT, DSDT with _S5 and
    /// pvpanic), COM1 on IRQ 4, i8042 reset, CMOS RTC, PCI host bridge,
    /// PM timer, fw_cfg; APs wait for INIT/SIPI.
    #[arg(long, value_name = "FILE", conflicts_with = "guest")]
    kernel: Option<std::path::PathBuf>,
    /// The kernel's command line. Linux gets it as given (default
    /// "console=ttyS0 reboot=k panic=-1"), with `virtio_mmio.device=`
    /// for each --disk, --net and --vsock appended; a multiboot kernel is handed its file
    /// name first, then these (as GRUB and QEMU do).
    #[arg(long, default_value = "", requires = "kernel")]
    cmdline: String,
    /// Linux: the initramfs (an uncompressed cpio is fastest to unpack);
    /// multiboot: module 0.
    #[arg(
        long,
        visible_alias = "initramfs",
        value_name = "FILE",
        requires = "kernel"
    )]
    initrd: Option<std::path::PathBuf>,
    /// A raw disk image served as virtio-blk over virtio-mmio
    /// (`/dev/vda`, then `/dev/vdb`, ...): `FILE` (read-write) or
    /// `FILE,readonly`; write a comma in FILE twice (`a,,b.img`). Repeat
    /// for more disks (at most 8). Images are locked as QEMU locks them:
    /// one writer, or any number of read-only users.
    #[arg(long, value_name = "FILE[,readonly]", requires = "kernel")]
    disk: Vec<brisk_vmm::DiskConfig>,
    /// A virtio-net NIC on an existing TAP interface (`eth0`, then
    /// `eth1`, ...; make one with `ip tuntap add NAME mode tap`):
    /// `tap=NAME` or `tap=NAME,mac=06:00:ac:10:00:02` (default MAC:
    /// 06:62:72:6b:00:INDEX). Checksum and TSO offloads and mergeable
    /// receive buffers are negotiated with the guest. Repeat for more
    /// NICs (disks and NICs share 8 slots). Linux can set its address
    /// from the command line: `ip=GUEST::GATEWAY:NETMASK::eth0:off`.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]", requires = "kernel")]
    net: Vec<brisk_vmm::NetConfig>,
    /// A virtio-vsock device, Firecracker's hybrid design: `cid=N,uds=PATH`.
    /// brisk listens on PATH (which must not exist; removed on exit); a
    /// host process connects and writes `CONNECT <port>\n` to reach the
    /// guest's port, and is answered `OK <host_port>\n`; a guest
    /// connection to host port P goes to the Unix socket `PATH_P`.
    #[arg(long, value_name = "cid=N,uds=PATH", requires = "kernel")]
    vsock: Option<brisk_vmm::VsockConfig>,
    /// Firecracker's JSON configuration file (`boot-source`, `drives`,
    /// `machine-config`, `network-interfaces`, `logger`, `metrics`) in
    /// place of the options that choose the VM.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["guest", "kernel", "cpus", "memory", "irqchip", "disk", "net", "vsock", "restore", "receive_migration", "wait_for_vm"])]
    config_file: Option<std::path::PathBuf>,
    /// Who serves the disks' requests: `engine` (brisk's I/O thread,
    /// woken by an ioeventfd: the notifying vCPU goes straight back to
    /// the guest) or `inline` (the notifying vCPU serves them before it
    /// returns to the guest; the benchmarks' baseline).
    #[arg(long, value_enum, default_value_t = DiskIo::Engine, requires = "kernel")]
    disk_io: DiskIo,
    /// KVM's PV send-IPI hypercall in CPUID: `on` (KVM's default) or
    /// `off` (as QEMU's kvm-pv-ipi=off: the guest uses its LAPIC). On a
    /// PVM host a Linux AP hangs at its first PV IPI: use `off` there.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    kvm_pv_ipi: OnOff,
    /// MONITOR/MWAIT: `hide` (not in CPUID, guests idle with HLT), `exit`
    /// (in CPUID; KVM traps MWAIT and runs it as a NOP, so an MWAIT idle
    /// loop polls) or `passthrough` (runs natively; needs a host that can
    /// disable MWAIT exits).
    #[arg(long, value_enum, default_value_t = MwaitArg::Hide)]
    mwait: MwaitArg,
    /// Serve the HTTP API (see openapi.yaml, `brisk ctl`) on this Unix
    /// socket, created 0600 and removed on exit.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<std::path::PathBuf>,
    /// Restore the VM saved in this snapshot directory (`brisk ctl
    /// snapshot DIR`) and continue it where it was: its configuration
    /// (guest, vCPUs, memory, disks) comes from the snapshot, so the
    /// options that choose those are refused with it.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["guest", "kernel", "cpus", "memory", "irqchip", "disk", "net", "vsock", "mwait"])]
    restore: Option<std::path::PathBuf>,
    /// Wait on URL (`unix:PATH`, created 0600 and removed after, or
    /// `tcp:IP:PORT`) for one live migration (`brisk ctl
    /// send-migration URL` on the source), then run the VM as if it had
    /// booted here, exiting with the guest's status. The configuration
    /// comes from the source.
    #[arg(long, value_name = "URL", conflicts_with_all = ["guest", "kernel", "cpus", "memory", "irqchip", "disk", "net", "vsock", "mwait", "restore"])]
    receive_migration: Option<String>,
    /// With --restore or --receive-migration: start the VM paused
    /// (resume it through the API: `brisk ctl resume`).
    #[arg(long)]
    paused: bool,
    /// With --restore, --receive-migration or --wait-for-vm: the most
    /// guest RAM a snapshot or a migration's source may make this brisk
    /// map (K, M or G suffix). Default: the host's RAM.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_memory: Option<u64>,
    /// With --restore, --receive-migration or --wait-for-vm: open the
    /// disk images the snapshot or the source names (read-write unless
    /// saved read-only). Without it such a VM is refused: a snapshot
    /// directory or a migration peer is not trusted to choose host files.
    #[arg(long)]
    trust_disk_paths: bool,
    /// Start with no VM, serving only the API (--api-socket): `brisk ctl
    /// restore DIR` (vm.restore) or `brisk ctl receive-migration URL`
    /// (vm.receive-migration) brings one, which then runs as with
    /// --restore or --receive-migration.
    #[arg(long, requires = "api_socket", conflicts_with_all = ["guest", "kernel", "cpus", "memory", "irqchip", "disk", "mwait", "restore", "receive_migration", "paused"])]
    wait_for_vm: bool,
    /// Per-thread seccomp filters (docs/seccomp.md): `on` (a forbidden
    /// system call is named on stderr and ends brisk, status 12), `log`
    /// (allowed, logged by the kernel) or `off`.
    #[arg(long, value_enum, default_value_t = SeccompArg::On)]
    seccomp: SeccompArg,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DiskIo {
    Engine,
    Inline,
}

impl From<DiskIo> for brisk_vmm::platform::Notify {
    fn from(d: DiskIo) -> Self {
        match d {
            DiskIo::Engine => Self::Engine,
            DiskIo::Inline => Self::Inline,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OnOff {
    On,
    Off,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum SeccompArg {
    On,
    Log,
    Off,
}

impl From<SeccompArg> for brisk_vmm::seccomp::Seccomp {
    fn from(a: SeccompArg) -> Self {
        use brisk_vmm::seccomp::Seccomp;
        match a {
            SeccompArg::On => Seccomp::Trap,
            SeccompArg::Log => Seccomp::Log,
            SeccompArg::Off => Seccomp::Off,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum IrqchipArg {
    User,
    Kernel,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum MwaitArg {
    Hide,
    Exit,
    Passthrough,
}

impl From<MwaitArg> for brisk_vmm::Mwait {
    fn from(a: MwaitArg) -> Self {
        match a {
            MwaitArg::Hide => brisk_vmm::Mwait::Hide,
            MwaitArg::Exit => brisk_vmm::Mwait::Exit,
            MwaitArg::Passthrough => brisk_vmm::Mwait::Passthrough,
        }
    }
}

impl From<CtlOp> for crate::ctl::Op {
    fn from(op: CtlOp) -> Self {
        use crate::ctl::Op;
        match op {
            CtlOp::Info => Op::Info,
            CtlOp::Pause => Op::Pause,
            CtlOp::Resume => Op::Resume,
            CtlOp::Shutdown => Op::Shutdown,
            CtlOp::Counters => Op::Counters,
            CtlOp::Kick { id } => Op::Kick(id),
            CtlOp::Ping => Op::Ping,
            CtlOp::Snapshot {
                dir,
                live,
                max_stop_ms,
                diff,
            } => Op::Snapshot {
                dir,
                live,
                max_stop_ms,
                diff,
            },
            CtlOp::SendMigration {
                url,
                downtime_ms,
                timeout_s,
                force,
                local,
            } => Op::SendMigration {
                url,
                downtime_ms,
                timeout_s,
                force,
                local,
            },
            CtlOp::CancelMigration => Op::CancelMigration,
            CtlOp::Restore { dir, paused } => Op::Restore(dir, paused),
            CtlOp::ReceiveMigration { url, paused } => Op::ReceiveMigration(url, paused),
            CtlOp::Migration => Op::Migration,
        }
    }
}

impl From<IrqchipArg> for Irqchip {
    fn from(a: IrqchipArg) -> Irqchip {
        match a {
            IrqchipArg::User => Irqchip::User,
            IrqchipArg::Kernel => Irqchip::Kernel,
        }
    }
}

/// The longest duration brisk takes: a century. Longer ones (which would
/// overflow the clock) are a command-line error, not a panic.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Parse `10s`, `500ms`, `2m`... (humantime), up to [`MAX_DURATION`].
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration like 10s or 500ms: {e}"))?;
    if d > MAX_DURATION {
        return Err(format!(
            "'{s}' is longer than brisk waits for (at most 100 years)"
        ));
    }
    Ok(d)
}

/// Parse `64M`, `2G`, `512K` or a plain number of bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 64M, 1G or 4096"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| format!("'{s}' is too large"))
}

impl Cli {
    pub fn log_level(&self) -> &'static str {
        match self.verbose {
            0 => "warn",
            1 => "info",
            _ => "debug",
        }
    }

    /// Run the command; returns the process exit status.
    pub fn execute(self) -> i32 {
        match self.command {
            Command::Guests => {
                for g in brisk_guests::ALL {
                    out!("{:<11} {}", g.name, g.about);
                }
                status::OK
            }
            Command::Run(args) => run(args),
            Command::Stress(args) => stress(args),
            Command::Bench(args) => bench(args),
            Command::Ctl(args) => crate::ctl::run(&args.api_socket, args.json, args.op.into()),
            Command::Firecracker(args) => crate::firecracker::run(args),
            Command::MergeSnapshot { dir } => match brisk_vmm::snapshot::merge(&dir) {
                Ok(0) => {
                    out!("{}: no diff layers to merge", dir.display());
                    status::OK
                }
                Ok(n) => {
                    out!(
                        "{}: {n} diff layer(s) merged into one memory file",
                        dir.display()
                    );
                    status::OK
                }
                Err(e) => {
                    say!("brisk: {e}");
                    status::CONFIG
                }
            },
        }
    }
}

#[cfg(not(feature = "bench"))]
fn bench(_args: BenchArgs) -> i32 {
    say!("brisk: this brisk was built without its benchmarks; build them with `cargo build --release --features bench`");
    status::USAGE
}

#[cfg(feature = "bench")]
fn bench(args: BenchArgs) -> i32 {
    if let Err(e) = brisk_vmm::kvm_available() {
        say!("brisk: {e}");
        return status::NO_KVM;
    }
    let which = match args.which {
        BenchWhich::Exit => brisk_bench::Which::Exit,
        BenchWhich::Kick => brisk_bench::Which::Kick,
        BenchWhich::Pause => brisk_bench::Which::Pause,
        BenchWhich::Api => brisk_bench::Which::Api,
        BenchWhich::Irq => brisk_bench::Which::Irq,
        BenchWhich::Boot => brisk_bench::Which::Boot,
        BenchWhich::Blk => brisk_bench::Which::Blk,
        BenchWhich::Net => brisk_bench::Which::Net,
        BenchWhich::Vsock => brisk_bench::Which::Vsock,
        BenchWhich::Snapshot => brisk_bench::Which::Snapshot,
        BenchWhich::Mn => brisk_bench::Which::Mn,
        BenchWhich::All => brisk_bench::Which::All,
    };
    let opts = brisk_bench::Opts { quick: args.quick };
    let report = brisk_bench::run(which, &opts, |t| out!("{t}\n"));
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).expect("report serialises");
        if let Err(e) = std::fs::write(path, json) {
            say!("brisk: cannot write {}: {e}", path.display());
            return status::CONFIG;
        }
    }
    if let Some(dir) = &args.plot {
        match brisk_bench::plot::write(dir, &report.tables) {
            Ok(files) => out!("plots: {}", files.join(", ")),
            Err(e) => {
                say!("brisk: cannot write plots: {e}");
                return status::CONFIG;
            }
        }
    }
    status::OK
}

fn stress(args: StressArgs) -> i32 {
    use brisk_stress::{StressConfig, StressGuest};
    let irqchip: Irqchip = args.irqchip.into();
    let guest = match args.guest.as_deref() {
        // clap accepts only the two names.
        Some(name) => StressGuest::from_name(name).expect("a stress guest"),
        None => StressGuest::for_irqchip(irqchip),
    };
    let config = StressConfig {
        ops: args.ops,
        seed: args.seed,
        cpus: args.cpus,
        controllers: args.controllers,
        irqchip,
        guest: Some(guest),
        deadline: args.deadline,
        vcpu_threads: args.vcpu_threads,
    };
    if let Err(e) = (VmConfig {
        payload: brisk_vmm::Payload::builtin(guest.name()),
        cpus: args.cpus,
        irqchip,
        vcpu_threads: args.vcpu_threads,
        ..VmConfig::default()
    })
    .validate()
    {
        say!("brisk: {e}");
        return status::CONFIG;
    }
    if let Err(e) = brisk_vmm::kvm_available() {
        say!("brisk: {e}");
        return status::NO_KVM;
    }
    match brisk_stress::run(&config) {
        Ok(report) => {
            out!("{report}");
            status::OK
        }
        Err(e) => {
            say!("brisk: stress failed (seed {}): {e}", args.seed);
            status::STRESS_FAILED
        }
    }
}

fn run(args: RunArgs) -> i32 {
    let payload = match args.kernel {
        Some(path) => Payload::Kernel(brisk_vmm::KernelConfig {
            path,
            cmdline: args.cmdline,
            initrd: args.initrd,
        }),
        None => Payload::Builtin(args.guest),
    };
    let mut config = VmConfig {
        irqchip: args
            .irqchip
            .map(Irqchip::from)
            .unwrap_or(payload.default_irqchip()),
        payload,
        cpus: args.cpus,
        memory: args.memory,
        mwait: args.mwait.into(),
        seccomp: args.seccomp.into(),
        disks: args.disk,
        nets: args.net,
        vsock: args.vsock,
        disk_io: args.disk_io.into(),
        pv_ipi: args.kvm_pv_ipi == OnOff::On,
        shared_memory: args.shared_memory,
        track_dirty_pages: args.track_dirty_pages,
        dirty_ring: args.dirty_ring,
        vcpu_threads: args.vcpu_threads,
    };
    if let Some(path) = &args.config_file {
        match crate::firecracker::config_from_file(path, config.seccomp) {
            Ok(c) => {
                config = VmConfig {
                    mwait: config.mwait,
                    pv_ipi: config.pv_ipi,
                    shared_memory: config.shared_memory,
                    disk_io: config.disk_io,
                    track_dirty_pages: c.track_dirty_pages || config.track_dirty_pages,
                    dirty_ring: config.dirty_ring,
                    vcpu_threads: config.vcpu_threads,
                    ..c
                }
            }
            Err(e) => {
                say!("brisk: --config-file {e}");
                return status::CONFIG;
            }
        }
    }
    let interrupt = match signals::install() {
        Ok(fd) => fd,
        Err(e) => {
            say!("brisk: cannot install signal handlers: {e}");
            return status::INTERNAL;
        }
    };
    // The --timeout clock and the signals cover loading the guest too.
    let deadline = args
        .timeout
        .and_then(|t| std::time::Instant::now().checked_add(t));
    let abort = || signals::last() != 0 || deadline.is_some_and(|d| std::time::Instant::now() >= d);
    let opts = brisk_vmm::RestoreOptions {
        paused: args.paused,
        seccomp: config.seccomp,
        max_memory: args.max_memory,
        trust_disk_paths: args.trust_disk_paths,
    };
    if args.paused && args.restore.is_none() && args.receive_migration.is_none() {
        say!("brisk: --paused goes with --restore or --receive-migration");
        return status::USAGE;
    }
    let brought = args.restore.is_some() || args.receive_migration.is_some() || args.wait_for_vm;
    if (args.max_memory.is_some() || args.trust_disk_paths) && !brought {
        say!("brisk: --max-memory and --trust-disk-paths go with --restore, --receive-migration or --wait-for-vm");
        return status::USAGE;
    }
    let (vm, api) = if args.wait_for_vm {
        let path = args
            .api_socket
            .as_deref()
            .expect("clap: --wait-for-vm requires --api-socket");
        let api = brisk_api::Api::with_slot;
        let what = "vm.restore or vm.receive-migration";
        match wait_for_vm(path, opts, &abort, api, what) {
            Ok(both) => both,
            Err(code) => return code,
        }
    } else {
        let started = match (&args.restore, &args.receive_migration) {
            (Some(dir), _) => Vm::restore(dir, Output::Stdout, opts),
            (None, Some(url)) => match url.parse::<brisk_vmm::MigrationUrl>() {
                Ok(url) => {
                    say!("brisk: waiting for a migration on {url}");
                    Vm::receive_migration(&url, Output::Stdout, opts, &abort)
                }
                Err(e) => {
                    say!("brisk: --receive-migration: {e}");
                    return status::USAGE;
                }
            },
            (None, None) => Vm::start_with_abort(&config, Output::Stdout, &abort),
        };
        let vm = match started {
            Ok(vm) => std::sync::Arc::new(vm),
            Err(e) => {
                say!("brisk: {e}");
                return status::for_start_error(&e, signals::last());
            }
        };
        let api = match &args.api_socket {
            None => None,
            Some(path) => match brisk_api::ApiServer::start(path, vm.clone()) {
                Ok(server) => Some(server),
                Err(e) => {
                    say!("brisk: {e}");
                    vm.request_shutdown();
                    return finish(vm, None, status::CONFIG);
                }
            },
        };
        (vm, api)
    };
    let how = if args.restore.is_some() || args.wait_for_vm {
        "restored"
    } else if args.receive_migration.is_some() {
        "migrated here"
    } else {
        "running"
    };
    supervise(vm, api, config.seccomp, deadline, interrupt, how)
}

/// Run the VM to its end: the console, the main thread's filter, the wait
/// (bounded by `deadline`, ended by a signal on `interrupt`), the
/// teardown. The exit status.
pub(crate) fn supervise(
    vm: std::sync::Arc<Vm>,
    api: Option<brisk_api::ApiServer>,
    seccomp: brisk_vmm::seccomp::Seccomp,
    deadline: Option<std::time::Instant>,
    interrupt: std::os::fd::RawFd,
    how: &str,
) -> i32 {
    let console = match crate::console::Console::start(vm.clone(), seccomp) {
        Ok(c) => c,
        Err(e) => {
            say!("brisk: cannot start the console thread: {e}");
            vm.request_shutdown();
            return finish(vm, api, status::INTERNAL);
        }
    };
    // Everything is set up: from here on the main thread only waits and
    // tears down.
    if let Err(e) = brisk_vmm::seccomp::install(ThreadKind::Main, seccomp) {
        say!("brisk: cannot install the main thread's seccomp filter: {e}");
        vm.request_shutdown();
        drop(console);
        return finish(vm, api, status::INTERNAL);
    }
    // Logged once the vCPUs run and the API (if any) answers.
    log::info!(
        "guest '{}' {} on {} vCPUs ({:?} irqchip)",
        vm.guest(),
        how,
        vm.vcpus().len(),
        vm.irqchip()
    );
    let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
    let end = vm.wait(left, Some(interrupt));
    drop(console);
    let code = status::for_end(&end, signals::last());
    match &end {
        VmEnd::PowerOff | VmEnd::DebugExit(_) | VmEnd::ShutdownRequested => log::info!("{end}"),
        VmEnd::Migrated { .. } => say!("brisk: the VM {end}"),
        VmEnd::Interrupted => say!("brisk: stopped by signal {}", signals::last()),
        _ => say!("brisk: {end}"),
    }
    finish(vm, api, code)
}

/// `--wait-for-vm`: serve the API with no VM until `vm.restore` or
/// `vm.receive-migration` brings one, built here on the main thread (the
/// API thread's filter forbids it). A failed attempt is answered and the
/// wait goes on; a signal or --timeout ends it.
pub(crate) fn wait_for_vm(
    path: &std::path::Path,
    opts: brisk_vmm::RestoreOptions,
    abort: &dyn Fn() -> bool,
    api: impl FnOnce(std::sync::Arc<brisk_api::VmSlot>) -> brisk_api::Api,
    waiting_for: &str,
) -> Result<(std::sync::Arc<Vm>, Option<brisk_api::ApiServer>), i32> {
    use brisk_api::Bring;
    let (slot, requests) = brisk_api::VmSlot::empty();
    let server =
        brisk_api::ApiServer::serve(path, api(slot.clone()), opts.seccomp).map_err(|e| {
            say!("brisk: {e}");
            status::CONFIG
        })?;
    // Declared after the server, so dropped before it on every path: the
    // API's handlers wait for these answers, and the server's drop waits
    // for its handlers.
    let requests = Pending(requests);
    say!(
        "brisk: no VM yet; waiting for {waiting_for} on {}",
        path.display()
    );
    let abort = || abort() || slot.shutdown_requested();
    loop {
        if abort() {
            drop(requests);
            drop(server);
            if slot.shutdown_requested() {
                say!("brisk: shut down through the API with no VM");
                return Err(status::OK);
            }
            let signal = signals::last();
            if signal != 0 {
                say!("brisk: stopped by signal {signal} with no VM");
                return Err(128 + signal);
            }
            say!("brisk: --timeout passed with no VM");
            return Err(status::TIMEOUT);
        }
        let (what, reply) = match requests.0.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                say!("brisk: the API stopped with no VM");
                return Err(status::INTERNAL);
            }
        };
        let built = match what {
            Bring::Restore { dir, paused } => Vm::restore(
                &dir,
                Output::Stdout,
                brisk_vmm::RestoreOptions { paused, ..opts },
            ),
            Bring::Receive { url, paused } => {
                say!("brisk: waiting for a migration on {url}");
                let o = brisk_vmm::RestoreOptions { paused, ..opts };
                Vm::receive_migration(&url, Output::Stdout, o, &abort)
            }
            Bring::Start(config) => Vm::start_with_abort(&config, Output::Stdout, &abort),
        };
        match built {
            Ok(vm) => {
                let vm = std::sync::Arc::new(vm);
                slot.set(vm.clone());
                let _ = reply.send(Ok(()));
                // A vm.shutdown that came while it was being built
                // (answered 204) still ends it.
                if slot.shutdown_requested() {
                    vm.request_shutdown();
                }
                return Ok((vm, Some(server)));
            }
            Err(e) => {
                say!("brisk: {e}");
                let _ = reply.send(Err(brisk_api::BringError::Failed(std::sync::Arc::new(e))));
            }
        }
    }
}

/// The queue of requests to bring a VM. Dropped, it answers whatever is
/// still queued and closes, so no API handler waits for an answer that
/// will not come (whatever path leaves `wait_for_vm`).
struct Pending(std::sync::mpsc::Receiver<brisk_api::BringRequest>);

impl Drop for Pending {
    fn drop(&mut self) {
        for (_, reply) in self.0.try_iter() {
            let _ = reply.send(Err(brisk_api::BringError::ShuttingDown));
        }
    }
}

/// Stop the API (removing its socket), then the vCPUs; `code` unless that
/// fails. A vCPU thread that does not stop within the bound (blocked
/// writing to a full stdout pipe, say) is reported and left to the
/// process's exit: brisk never waits for it without bound.
pub(crate) fn finish(vm: std::sync::Arc<Vm>, api: Option<brisk_api::ApiServer>, code: i32) -> i32 {
    // First an outgoing migration: cancel it if still going (Ctrl-C,
    // --timeout) and wait for its thread, bounded by its stream's I/O
    // timeout; a finished one's API request then gets its answer before
    // the API stops.
    vm.stop_migration();
    drop(api);
    let vm = match std::sync::Arc::try_unwrap(vm) {
        Ok(vm) => vm,
        Err(_) => {
            say!("brisk: the VM is still referenced after the API stopped");
            return status::INTERNAL;
        }
    };
    match vm.shutdown() {
        Ok(()) => code,
        Err(e @ brisk_vmm::ShutdownError::Stuck { .. }) => {
            say!("brisk: {e}; exiting anyway");
            code
        }
        Err(e) => {
            say!("brisk: {e}");
            status::INTERNAL
        }
    }
}
