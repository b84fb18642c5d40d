//! A running VM: its vCPU threads, devices and how it ends.

use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use brisk_boot::layout;
use brisk_devices::{Apics, CounterDevice, DeviceManager, Doorbell, PeriodicTimers, Uart};
use brisk_kvm::{InterruptStats, Irqchip, KvmVcpu, MemoryBacking, PendingInterrupts};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::disk_lock::DiskLocks;
use crate::interrupts::LapicSource;
use crate::lifecycle::Lifecycle;
use crate::platform::{self, Lines, Wiring};
use crate::seccomp::{self, Seccomp, ThreadKind};
use crate::vcpu_threads::{Finished, Stopped, VcpuEnv, VcpuThreads};
use crate::{ConfigError, Output, Platform, UserInterrupts, Vcpu, VmConfig, VmEnd};
use brisk_devices::{IoEngine, NotParked};

/// Why a VM could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Kvm(#[from] brisk_kvm::Error),
    /// A NIC's TAP device cannot be attached.
    #[error(transparent)]
    Tap(#[from] brisk_devices::virtio::TapError),
    /// The vsock's Unix socket cannot be made.
    #[error(transparent)]
    Vsock(#[from] brisk_devices::virtio::VsockError),
    /// The kernel (or initrd) file cannot be read or booted.
    #[error(transparent)]
    Kernel(#[from] crate::KernelError),
    /// A disk image cannot be opened, locked or served.
    #[error(transparent)]
    Disk(#[from] crate::DiskError),
    /// A snapshot's file cannot be used (missing, not a regular file, not
    /// a state file of this format, corrupt).
    #[error(transparent)]
    SnapshotFile(#[from] crate::snapshot::file::FileError),
    /// A snapshot's (or a migration source's) state cannot be restored
    /// here (a bad or mismatched file, a state KVM refuses).
    #[error(transparent)]
    Snapshot(#[from] crate::RestoreError),
    /// A migration's destination refused its source or stream.
    #[error(transparent)]
    Receive(#[from] crate::ReceiveError),
    /// The caller's abort (a signal, its timeout) stopped the set-up.
    #[error(transparent)]
    Interrupted(#[from] crate::Interruption),
    /// The vCPUs' threads cannot start (M:N: the pool cannot run here).
    #[error(transparent)]
    Threads(#[from] crate::PoolError),
    /// A step of assembling the VM failed.
    #[error("setting up the VM: {what}: {source}")]
    Setup {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Raise the soft limit on open files (up to the hard one) if a VM of
/// `cpus` vCPUs needs more: each vCPU holds two (its KVM fd and its state
/// eventfd), and a 1024-vCPU guest would pass the common soft limit of
/// 1024. If it cannot be raised, creating a vCPU fails with EMFILE, which
/// the error names.
fn room_for_fds(cpus: usize) {
    let need = (cpus as u64) * 2 + 256;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct on the stack.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < need {
            lim.rlim_cur = need.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// `map_err` for a set-up step named `what`.
pub(crate) fn setup<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> StartError {
    move |e| StartError::Setup {
        what,
        source: Box::new(e),
    }
}

/// A VM assembled but not running: guest loaded, devices on the bus, every
/// vCPU set up with its control block. [`Vm::start`] hands its vCPUs to
/// threads; benchmarks drive them with loops of their own.
pub struct Machine {
    pub kvm: brisk_kvm::Vm,
    /// The devices (by name, with their ranges and state) and their bus.
    pub devices: Arc<DeviceManager>,
    pub vcpus: Vec<KvmVcpu>,
    /// The control blocks the interrupt sources kick.
    pub ctls: Vec<Arc<Vcpu>>,
    pub guest: String,
    /// What it was built from (a snapshot saves it).
    pub config: VmConfig,
    uart: Arc<Uart>,
    counters: Vec<Arc<CounterDevice>>,
    life: Arc<Lifecycle>,
    irq: Option<IrqSources>,
    /// Kernels under the user irqchip: brisk's LAPICs and IOAPIC.
    apics: Option<Arc<Apics>>,
    /// Its disk images' locks (a migration's destination takes them on
    /// Commit).
    disk_locks: DiskLocks,
    /// The thread serving the virtio queues, parked until the VM runs.
    io: Option<IoEngine>,
    virtio: platform::VirtioHandles,
}

/// User irqchip mode: the pending sets and the devices that raise into them.
pub(crate) struct IrqSources {
    pub(crate) sink: Arc<UserInterrupts>,
    pub(crate) timers: Option<PeriodicTimers>,
    doorbell: Option<Arc<Doorbell>>,
}

impl Machine {
    /// Validate `config`, create the VM, load the guest and wire the devices.
    pub fn build(config: &VmConfig, output: Output) -> Result<Machine, StartError> {
        Self::build_with_abort(config, output, &|| false)
    }

    /// As [`Machine::build`], asking `abort` while a kernel loads (so a
    /// signal or a timeout stops it): then [`StartError::Interrupted`].
    pub fn build_with_abort(
        config: &VmConfig,
        output: Output,
        abort: &dyn Fn() -> bool,
    ) -> Result<Machine, StartError> {
        Self::assemble(config, output, Boot::Load(abort))
    }

    /// Create the VM, its memory from `boot`, its vCPUs and devices. A
    /// loaded payload sets the vCPUs' registers; a restore leaves them for
    /// the caller to fill from the snapshot.
    pub(crate) fn assemble(
        config: &VmConfig,
        output: Output,
        boot: Boot<'_>,
    ) -> Result<Machine, StartError> {
        config.validate()?;
        let regions = brisk_boot::layout::ram_regions(config.memory);
        let backing = match &boot {
            Boot::Load(_) => MemoryBacking::Anonymous,
            Boot::Restore(file) => MemoryBacking::SnapshotFile(
                file.try_clone()
                    .map_err(setup("duplicating the memory file"))?,
            ),
            Boot::Receive(Some(file)) => MemoryBacking::Shared(
                file.try_clone()
                    .map_err(setup("duplicating the memory fd"))?,
            ),
            Boot::Receive(None) => MemoryBacking::Anonymous,
        };
        let backing = match (backing, config.shared_memory) {
            (MemoryBacking::Anonymous, true) => MemoryBacking::NewMemfd,
            (b, _) => b,
        };
        let mut kvm = brisk_kvm::Vm::with_backing(&regions, config.irqchip, backing)?;
        kvm.set_mwait(config.mwait)?;
        kvm.set_pv_ipi(config.pv_ipi);
        // A kernel under the user irqchip gets brisk's LAPICs and IOAPIC.
        let user_apic =
            config.irqchip == Irqchip::User && config.payload.platform() == Platform::Pc;
        if user_apic {
            kvm.enable_user_apic()?;
        }
        if config.dirty_ring {
            kvm.enable_dirty_ring()?;
        }
        // Diff snapshots need every write since the last snapshot.
        if config.track_dirty_pages {
            kvm.set_dirty_log(true)?;
        }
        let loaded = match boot {
            Boot::Load(abort) => Some(config.payload.load(
                &kvm,
                (config.memory, config.cpus),
                &platform::kernel_cmdline(config),
                abort,
            )?),
            Boot::Restore(_) | Boot::Receive(_) => None,
        };
        let guest = config.payload.name();

        let life = Arc::new(Lifecycle::new().map_err(setup("an eventfd"))?);
        room_for_fds(config.cpus);
        let ctls: Vec<Arc<Vcpu>> = (0..config.cpus).map(|id| Arc::new(Vcpu::new(id))).collect();
        let mut vcpus = Vec::new();
        for id in 0..config.cpus {
            let start_aps = loaded.as_ref().is_none_or(|l| l.start_aps());
            let v = kvm.create_vcpu(id, config.cpus, start_aps)?;
            if let Some(loaded) = &loaded {
                loaded
                    .start_vcpu(&v, &kvm, id, config.cpus)
                    .map_err(setup("setting a vCPU's registers"))?;
            }
            vcpus.push(v);
        }
        let apics = if user_apic {
            // The APs of a kernel wait for INIT/SIPI (a restore puts back
            // the saved state over this).
            let aps_wait = loaded.as_ref().is_none_or(|l| !l.start_aps());
            Some(apics(&mut vcpus, &ctls, aps_wait, config.seccomp)?)
        } else {
            None
        };
        let sink = match config.irqchip {
            Irqchip::User if !user_apic => Some(user_interrupts(&mut vcpus, &ctls)),
            Irqchip::User | Irqchip::Kernel => None,
        };
        let lines = match (&sink, &apics) {
            (Some(s), _) => Lines::User(s.clone()),
            (None, Some(a)) => Lines::Apic(a.clone()),
            (None, None) => Lines::Kernel(&kvm),
        };
        let wiring = Wiring {
            platform: config.payload.platform(),
            irqchip: config.irqchip,
            cpus: config.cpus,
            memory: config.memory,
            seccomp: config.seccomp,
            end: &life,
            lines,
            disks: &config.disks,
            nets: &config.nets,
            vsock: config.vsock.as_ref(),
            disk_io: config.disk_io,
            kvm: &kvm,
            guest_memory: kvm.memory(),
        };
        let d = platform::devices(wiring, output)?;
        let disk_locks = match boot {
            // The source holds them until it commits.
            Boot::Receive(_) => DiskLocks::default(),
            Boot::Load(_) | Boot::Restore(_) => DiskLocks::take(&config.disks)?,
        };
        let irq = sink.map(|sink| IrqSources {
            sink,
            timers: d.timers,
            doorbell: d.doorbell,
        });
        Ok(Machine {
            kvm,
            devices: Arc::new(d.manager),
            vcpus,
            ctls,
            guest,
            config: config.clone(),
            uart: d.uart,
            counters: d.counters,
            life,
            irq,
            apics,
            disk_locks,
            io: d.io,
            virtio: d.virtio,
        })
    }
}

/// Where a new VM's RAM and registers come from.
pub(crate) enum Boot<'a> {
    /// Load the payload into fresh memory, asking the abort meanwhile.
    Load(&'a dyn Fn() -> bool),
    /// Map a snapshot's memory file; the caller restores the state.
    Restore(&'a std::fs::File),
    /// A migration's destination: fresh memory the source fills, or the
    /// source's own (its memfd, handed over on a local upgrade).
    Receive(Option<&'a std::fs::File>),
}

impl Machine {
    /// The user irqchip's interrupt sink (raising also kicks).
    pub(crate) fn irq_sink(&self) -> Option<Arc<UserInterrupts>> {
        self.irq.as_ref().map(|i| i.sink.clone())
    }
}

/// brisk's LAPICs (one per vCPU, each the source its vCPU injects from,
/// waking it through its control block) and IOAPIC, with the LAPIC
/// timers' thread.
fn apics(
    vcpus: &mut [KvmVcpu],
    ctls: &[Arc<Vcpu>],
    aps_wait: bool,
    policy: Seccomp,
) -> Result<Arc<Apics>, StartError> {
    let wakers = ctls.to_vec();
    let wake = Arc::new(move |i: usize| {
        if let Some(ctl) = wakers.get(i) {
            ctl.kick(brisk_control::Request::Interrupt);
        }
    });
    let init = Box::new(move || {
        if let Err(e) = seccomp::install(ThreadKind::Timer, policy) {
            log::error!("LAPIC timer thread: cannot install its seccomp filter: {e}");
        }
    });
    let apics = Arc::new(
        Apics::new(vcpus.len(), aps_wait, wake, init)
            .map_err(setup("starting the LAPIC timer thread"))?,
    );
    for v in vcpus.iter_mut() {
        let lapic = apics.lapic(v.id()).clone();
        v.set_interrupts(Arc::new(LapicSource(lapic)));
    }
    Ok(apics)
}

/// Give each vCPU a pending-interrupt set, raised into through the sink.
fn user_interrupts(vcpus: &mut [KvmVcpu], ctls: &[Arc<Vcpu>]) -> Arc<UserInterrupts> {
    let pending: Vec<Arc<PendingInterrupts>> = vcpus
        .iter_mut()
        .map(|v| {
            let p = Arc::new(PendingInterrupts::default());
            v.set_interrupts(p.clone());
            p
        })
        .collect();
    Arc::new(UserInterrupts::new(pending, ctls.to_vec()))
}

/// Why [`Vm::pause`] or [`Vm::resume`] did nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PauseError {
    #[error("the VM has shut down")]
    Ended,
    #[error("the VM is already paused")]
    AlreadyPaused,
    #[error("the VM is not paused")]
    NotPaused,
    /// Something else holds the VM; try again after it.
    #[error("{0} is in progress")]
    Busy(crate::lifecycle::Hold),
    /// Some vCPU did not park in time; every vCPU was resumed again.
    #[error("{0}")]
    Control(#[source] brisk_control::Error),
    /// The I/O engine did not finish its request in time; every vCPU was
    /// resumed again.
    #[error(transparent)]
    Io(NotParked),
}

/// Why a running VM's device could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("this VM has no disk {0}")]
    NoDisk(usize),
    #[error("this VM has no NIC {0}")]
    NoNic(usize),
    /// The new image cannot be served (missing, not a regular file, in
    /// use): nothing was changed.
    #[error("{0}")]
    Disk(#[source] StartError),
}

/// How long shutting a VM down waits for its vCPU threads. A thread still
/// running then (stuck in a `run_on` closure, an idle task, or writing
/// guest output to a full pipe) is left behind and reported, never waited
/// for without bound.
pub const SHUTDOWN_BOUND: Duration = Duration::from_secs(5);

/// Shutting down did not stop every vCPU thread cleanly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShutdownError {
    /// These vCPU threads did not leave their loop within the bound; they
    /// were detached, and the VM's memory is kept for them.
    #[error("vCPU {} did not stop within {bound:?} (stuck in a run_on closure, an idle task or a blocked output write); left running", list(.vcpus))]
    Stuck { vcpus: Vec<usize>, bound: Duration },
    /// A vCPU thread panicked.
    #[error("vCPU {vcpu} thread panicked")]
    Panicked { vcpu: usize },
}

fn list(vcpus: &[usize]) -> String {
    brisk_control::Error::list(vcpus)
}

/// A running VM. Dropping it stops and joins every vCPU thread (bounded by
/// [`SHUTDOWN_BOUND`]).
pub struct Vm {
    /// Dropped by hand, last: kept for good if a vCPU thread is stuck, so
    /// no thread that may still run the guest sees its memory unmapped.
    pub(crate) kvm: ManuallyDrop<brisk_kvm::Vm>,
    pub(crate) vcpus: Vec<Arc<Vcpu>>,
    threads: VcpuThreads,
    finished: Arc<Finished>,
    /// A vCPU thread was left running: keep what it may use.
    stuck: bool,
    pub(crate) devices: Arc<DeviceManager>,
    uart: Arc<Uart>,
    counters: Vec<Arc<CounterDevice>>,
    started: Instant,
    guest: String,
    memory_size: u64,
    seccomp: Seccomp,
    /// Where it is in its life, and how it ended (`lifecycle`).
    pub(crate) life: Arc<Lifecycle>,
    /// What it was built from, as changed since (a drive's file swapped).
    config: Mutex<VmConfig>,
    /// The outgoing migration, if one was started.
    pub(crate) migration: Mutex<Option<Arc<crate::migration::Outgoing>>>,
    /// Dropped after the vCPU threads are joined (fields drop after `drop`).
    pub(crate) irq: Option<IrqSources>,
    /// Kernels under the user irqchip: the LAPICs the vCPU threads reach
    /// and their timer thread (stopped when dropped, after the vCPUs).
    apics: Option<Arc<Apics>>,
    /// Who uses the dirty log besides snapshots, and where a diff
    /// snapshot may go (`track_dirty_pages`).
    pub(crate) dirty_use: Mutex<crate::snapshot::DirtyLogUse>,
    /// The disk images' locks (let go by a migrated source).
    pub(crate) disk_locks: DiskLocks,
    /// The I/O engine, quiesced whenever the VM is paused (stopped before
    /// guest memory goes).
    io: Option<IoEngine>,
    /// The disks and NICs, to change on a running VM.
    virtio: platform::VirtioHandles,
}

impl Vm {
    /// Build the VM described by `config` and start its vCPUs.
    pub fn start(config: &VmConfig, output: Output) -> Result<Vm, StartError> {
        Self::start_with_abort(config, output, &|| false)
    }

    /// As [`Vm::start`], asking `abort` while the guest loads.
    pub fn start_with_abort(
        config: &VmConfig,
        output: Output,
        abort: &dyn Fn() -> bool,
    ) -> Result<Vm, StartError> {
        let m = Machine::build_with_abort(config, output, abort)?;
        let vm = Self::run_machine(m, |_, _| Ok(()))?;
        vm.release_io();
        Ok(vm)
    }

    /// Start `m`'s vCPU threads, after `prepare` had each vCPU and its
    /// control block first (a restore fills them from the snapshot).
    pub(crate) fn run_machine(
        mut m: Machine,
        mut prepare: impl FnMut(&mut KvmVcpu, &Vcpu) -> Result<(), StartError>,
    ) -> Result<Vm, StartError> {
        for (v, ctl) in m.vcpus.iter_mut().zip(&m.ctls) {
            prepare(v, ctl)?;
        }
        let config = m.config.clone();
        let mut vm = Vm {
            kvm: ManuallyDrop::new(m.kvm),
            vcpus: m.ctls.clone(),
            threads: VcpuThreads::OneEach(Vec::new()),
            finished: Finished::new(config.cpus),
            stuck: false,
            devices: m.devices,
            uart: m.uart,
            counters: m.counters,
            life: m.life,
            started: Instant::now(),
            guest: m.guest,
            memory_size: config.memory,
            seccomp: config.seccomp,
            config: Mutex::new(m.config),
            migration: Mutex::new(None),
            irq: m.irq,
            apics: m.apics,
            dirty_use: Mutex::new(Default::default()),
            disk_locks: m.disk_locks,
            io: m.io,
            virtio: m.virtio,
        };
        let env = VcpuEnv {
            devices: vm.devices.clone(),
            life: vm.life.clone(),
            mem: vm.kvm.memory().clone(),
            apics: vm.apics.clone(),
            seccomp: vm.seccomp,
            finished: vm.finished.clone(),
        };
        let vcpus = m.vcpus.into_iter().zip(m.ctls).collect();
        vm.threads.start(&env, vcpus, config.vcpu_threads)?;
        vm.life.started();
        // The I/O engine stays parked: the caller releases it once the VM
        // runs (a paused restore, a migration's destination before its
        // Commit, must not serve a queue or a TAP).
        Ok(vm)
    }

    /// The vCPUs' control blocks.
    pub fn vcpus(&self) -> &[Arc<Vcpu>] {
        &self.vcpus
    }

    /// The guest's name.
    pub fn guest(&self) -> &str {
        &self.guest
    }

    /// One vCPU's control block.
    pub fn vcpu(&self, id: usize) -> &Vcpu {
        &self.vcpus[id]
    }

    /// The guest's progress counter for vCPU `id` (see `brisk_guests`).
    pub fn progress(&self, id: usize) -> u64 {
        self.guest_u64(layout::progress(id))
    }

    /// The last value vCPU `id`'s guest read from its counter device.
    pub fn last_read(&self, id: usize) -> u64 {
        self.guest_u64(layout::last_read(id))
    }

    fn guest_u64(&self, addr: u64) -> u64 {
        let host = self
            .kvm
            .memory()
            .get_host_address(GuestAddress(addr))
            .expect("per-vCPU data lies in low memory, which every VM has");
        // SAFETY: an 8-byte aligned address inside guest RAM, mapped for the
        // VM's lifetime; the guest writes it concurrently, hence atomic.
        unsafe { (*(host as *const AtomicU64)).load(Ordering::SeqCst) }
    }

    /// Guest RAM (tests and tools that read what the guest wrote).
    pub fn guest_memory(&self) -> &brisk_kvm::GuestRam {
        self.kvm.memory()
    }

    /// Reads answered by vCPU `id`'s counter device.
    pub fn counter_reads(&self, id: usize) -> u32 {
        self.counters[id].value()
    }

    /// vCPU `id`'s interrupt statistics (user irqchip mode only).
    pub fn interrupt_stats(&self, id: usize) -> Option<InterruptStats> {
        self.pending_interrupts(id).map(|p| p.stats())
    }

    /// vCPU `id`'s pending interrupts (user irqchip mode only).
    pub fn pending_interrupts(&self, id: usize) -> Option<&PendingInterrupts> {
        self.irq.as_ref().map(|i| i.sink.pending(id))
    }

    /// Ticks vCPU `id`'s timer has raised (user irqchip mode only).
    pub fn timer_ticks(&self, id: usize) -> Option<u64> {
        self.irq.as_ref()?.timers.as_ref().map(|t| t.ticks(id))
    }

    /// Doorbell rings delivered (user irqchip mode only).
    pub fn doorbell_rings(&self) -> Option<u64> {
        self.irq.as_ref()?.doorbell.as_ref().map(|d| d.rings())
    }

    /// Accesses to ports or addresses no device claims.
    pub fn unclaimed_accesses(&self) -> u64 {
        self.devices.bus().unclaimed_accesses()
    }

    /// The devices: names, ranges, state.
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// Console input for the guest: bytes queued in the UART's receive
    /// FIFO (raising IRQ 4 if the guest enabled receive interrupts).
    /// Returns how many fit: none while a vCPU holds the UART (it never
    /// waits for one); offer the rest again.
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        self.uart.input(bytes)
    }

    /// Let the I/O engine serve (the VM runs).
    pub(crate) fn release_io(&self) {
        if let Some(io) = &self.io {
            io.release();
        }
    }

    /// Park the I/O engine, waiting at most until `deadline`.
    pub(crate) fn quiesce_io(&self, deadline: brisk_control::Deadline) -> Result<(), NotParked> {
        match &self.io {
            // A pause that took its whole deadline still lets the engine
            // finish the call in progress.
            Some(io) => io.quiesce(deadline.remaining().max(Duration::from_millis(100))),
            None => Ok(()),
        }
    }

    /// Calls the I/O engine has made to the devices (tests: the queues
    /// are served off the vCPU threads).
    pub fn io_serves(&self) -> Option<u64> {
        self.io.as_ref().map(|io| io.serves())
    }

    /// Serve disk `index` from `path` from now on (Firecracker's `PATCH
    /// /drives`: Kata swaps a placeholder's file), as readable or writable
    /// as it was: the new image is checked and locked as at start, the old
    /// lock let go, and the guest told its capacity may have changed.
    pub fn replace_disk(&self, index: usize, path: &std::path::Path) -> Result<(), ChangeError> {
        let dev = self
            .virtio
            .disks
            .get(index)
            .ok_or(ChangeError::NoDisk(index))?;
        let mut config = self.config.lock().unwrap_or_else(|p| p.into_inner());
        let d = crate::DiskConfig {
            path: path.into(),
            ..config.disks[index].clone()
        };
        let image = platform::open_disk(&d, index).map_err(ChangeError::Disk)?;
        self.disk_locks.swap(index, &d).map_err(ChangeError::Disk)?;
        dev.with_device(|disk| disk.replace_image(image));
        dev.config_changed();
        config.disks[index] = d;
        Ok(())
    }

    /// Change disk `index`'s rate limits on a running VM.
    pub fn limit_disk(
        &self,
        index: usize,
        bw: Option<crate::Limit>,
        ops: Option<crate::Limit>,
    ) -> Result<(), ChangeError> {
        let dev = self
            .virtio
            .disks
            .get(index)
            .ok_or(ChangeError::NoDisk(index))?;
        let limiter = brisk_devices::RateLimiter::new(bw, ops, Instant::now());
        dev.with_device(|disk| disk.set_limiter(limiter));
        let mut config = self.config.lock().unwrap_or_else(|p| p.into_inner());
        (config.disks[index].bw, config.disks[index].ops) = (bw, ops);
        Ok(())
    }

    /// Change NIC `index`'s rate limits on a running VM (receive bytes and
    /// frames, transmit bytes and frames).
    pub fn limit_nic(
        &self,
        index: usize,
        limits: [Option<crate::Limit>; 4],
    ) -> Result<(), ChangeError> {
        let dev = self
            .virtio
            .nics
            .get(index)
            .ok_or(ChangeError::NoNic(index))?;
        let [rx_bw, rx_ops, tx_bw, tx_ops] = limits;
        let now = Instant::now();
        let (rx, tx) = (
            brisk_devices::RateLimiter::new(rx_bw, rx_ops, now),
            brisk_devices::RateLimiter::new(tx_bw, tx_ops, now),
        );
        dev.with_device(|nic| nic.set_limiters(rx, tx));
        let mut config = self.config.lock().unwrap_or_else(|p| p.into_inner());
        let n = &mut config.nets[index];
        (n.rx_bw, n.rx_ops, n.tx_bw, n.tx_ops) = (rx_bw, rx_ops, tx_bw, tx_ops);
        Ok(())
    }

    /// Its configuration, as changed since it was built (what a snapshot
    /// or a migration carries).
    pub fn config(&self) -> VmConfig {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The seccomp policy its threads follow.
    pub fn seccomp(&self) -> Seccomp {
        self.seccomp
    }

    /// Guest RAM in bytes.
    pub fn memory_size(&self) -> u64 {
        self.memory_size
    }

    /// Where HLT and interrupts are handled.
    pub fn irqchip(&self) -> brisk_kvm::Irqchip {
        self.kvm.irqchip()
    }

    /// What the guest gets for MONITOR/MWAIT.
    pub fn mwait(&self) -> brisk_kvm::Mwait {
        self.kvm.mwait()
    }

    /// Time since the vCPUs were started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Block until the VM ends, `timeout` passes ([`VmEnd::Timeout`]) or
    /// `interrupt` becomes readable ([`VmEnd::Interrupted`]).
    pub fn wait(&self, timeout: Option<Duration>, interrupt: Option<RawFd>) -> VmEnd {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(end) = self.ended() {
                return end;
            }
            let mut fds = vec![libc::pollfd {
                fd: self.life.ended_fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            if let Some(fd) = interrupt {
                fds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return VmEnd::Timeout;
                    }
                    left.as_millis().clamp(1, i32::MAX as u128) as i32
                }
            };
            // SAFETY: `fds` is a valid array of pollfd for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if n > 0 && fds.get(1).is_some_and(|f| f.revents != 0) && self.ended().is_none() {
                return VmEnd::Interrupted;
            }
            // n == 0 (timeout) is caught at the top; EINTR just loops.
        }
    }

    /// Stop every vCPU thread and join it, waiting at most
    /// [`SHUTDOWN_BOUND`].
    pub fn shutdown(mut self) -> Result<(), ShutdownError> {
        self.stop_threads(SHUTDOWN_BOUND)
    }

    /// As [`Vm::shutdown`], waiting at most `bound` for the vCPU threads.
    pub fn shutdown_within(mut self, bound: Duration) -> Result<(), ShutdownError> {
        self.stop_threads(bound)
    }

    fn stop_threads(&mut self, bound: Duration) -> Result<(), ShutdownError> {
        if self.threads.count() == 0 {
            return Ok(());
        }
        // Ask all first, then wait: no vCPU waits for another to be joined.
        // An exit request also wakes a parked or halted vCPU.
        for v in &self.vcpus {
            v.request_exit();
        }
        match self.threads.stop(&self.finished, Instant::now() + bound) {
            Stopped::Clean => Ok(()),
            Stopped::Panicked(vcpu) => Err(ShutdownError::Panicked { vcpu }),
            Stopped::LeftToFinish => {
                // Dropped on a pool thread: keep what the others may use.
                self.stuck = true;
                Ok(())
            }
            Stopped::Stuck(vcpus) => {
                self.stuck = true;
                Err(ShutdownError::Stuck { vcpus, bound })
            }
        }
    }

    /// Host threads running the vCPUs (with `--vcpu-threads`, the pool's).
    pub fn vcpu_thread_count(&self) -> usize {
        self.threads.count()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Err(e) = self.stop_threads(SHUTDOWN_BOUND) {
            log::warn!("{e}");
        }
        // The I/O thread writes guest memory: stopped (bounded) first.
        drop(self.io.take());
        if self.stuck {
            // A detached vCPU thread may still enter the guest or touch
            // its memory: leave the VM (fds and memory) to process exit.
            return;
        }
        // SAFETY: dropped once, here, after every vCPU thread was joined,
        // except the one running this drop if it is a vCPU thread (the last
        // reference dropped by an orphaned closure in its exit guard): that
        // thread is leaving its loop and neither enters the guest nor touches
        // guest memory again.
        unsafe { ManuallyDrop::drop(&mut self.kvm) };
    }
}
