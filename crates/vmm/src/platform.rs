//! The platforms a payload runs on: which devices exist, where they sit
//! and which interrupt line each one pulls. One list per platform; a new
//! device is added here (and nowhere else).

use std::sync::Arc;
use std::time::Instant;

use brisk_boot::ports;
use brisk_devices::apic::{pic, pit, Pit, IOAPIC_SIZE};
use brisk_devices::{
    Apics, Cmos, CounterDevice, DebugExit, DeviceManager, Doorbell, FwCfg, IoapicLine, IrqLine,
    PciHostBridge, PeriodicTimers, Pic, PmTimer, PowerOff, PvPanic, RateLimiter, Uart, I8042,
    TIMER_STRIDE,
};
use brisk_kvm::Irqchip;
use vmm_sys_util::eventfd::EventFd;

use crate::lifecycle::Lifecycle;
use crate::seccomp::{self, Seccomp, ThreadKind};
use crate::vm::setup;
use crate::{DiskConfig, DiskError, Output, Platform, StartError, UserInterrupts, VmConfig};
use brisk_boot::layout;
use brisk_devices::io_engine::{IoEngine, Source};
use brisk_devices::virtio::mmio::VirtioDevice;
pub use brisk_devices::virtio::Notify;
use brisk_devices::virtio::{DiskImage, Mac, Net, Tap, VirtioMmio, Vsock, MMIO_SIZE, QUEUE_NOTIFY};

/// The PC's ISA IRQ of COM1.
pub const UART_IRQ: u32 = 4;
/// Under the user irqchip, ISA IRQ `n` is vector `USER_IRQ_BASE + n` on
/// vCPU 0 (there is no PIC or IOAPIC to program).
pub const USER_IRQ_BASE: u8 = 0x40;

/// An IOAPIC input (GSI) of KVM's irqchip, pulled through an irqfd: the
/// write is the whole interrupt, no exit and no lock.
struct IrqfdLine(EventFd);

impl IrqLine for IrqfdLine {
    fn trigger(&self) {
        // Fails only if the counter would overflow: not reachable.
        let _ = self.0.write(1);
    }
}

/// A vector on a vCPU, for the user irqchip.
struct UserLine {
    sink: Arc<UserInterrupts>,
    vcpu: usize,
    vector: u8,
}

impl IrqLine for UserLine {
    fn trigger(&self) {
        use brisk_devices::InterruptSink;
        self.sink.raise(self.vcpu, self.vector);
    }
}

/// Routes ISA IRQs (GSIs) to the irqchip the VM has.
pub(crate) enum Lines<'a> {
    Kernel(&'a brisk_kvm::Vm),
    /// Built-in guests: a vector on vCPU 0.
    User(Arc<UserInterrupts>),
    /// Kernels under the user irqchip: brisk's IOAPIC.
    Apic(Arc<Apics>),
}

impl Lines<'_> {
    /// The line of ISA IRQ (GSI) `irq`. KVM's default routing table sends
    /// GSIs 0-23 to the IOAPIC (0-15 also to the PIC), so no route is set.
    fn isa(&self, irq: u32) -> Result<Arc<dyn IrqLine>, StartError> {
        Ok(match self {
            Lines::Kernel(vm) => {
                let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(setup("an irqfd"))?;
                vm.register_irqfd(&evt, irq)?;
                Arc::new(IrqfdLine(evt))
            }
            Lines::User(sink) => Arc::new(UserLine {
                sink: sink.clone(),
                vcpu: 0,
                vector: USER_IRQ_BASE + irq as u8,
            }),
            Lines::Apic(apics) => Arc::new(IoapicLine {
                ioapic: apics.ioapic().clone(),
                pin: irq as usize,
            }),
        })
    }
}

/// What a Linux kernel's command line needs to find the platform's
/// devices that nothing else announces (the virtio-mmio devices: the
/// disks in the first slots, then the NICs, then the vsock).
pub(crate) fn kernel_cmdline(config: &VmConfig) -> String {
    (0..config.disks.len() + config.nets.len() + usize::from(config.vsock.is_some()))
        .map(|i| {
            format!(
                "virtio_mmio.device={}@{:#x}:{}",
                MMIO_SIZE,
                layout::virtio_mmio(i),
                layout::VIRTIO_IRQS[i]
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Open disk `d` as a virtio-blk image: a regular file (never a device or
/// FIFO: opening one can block or have effects), read-only if asked.
pub(crate) fn open_disk(d: &DiskConfig, i: usize) -> Result<DiskImage, StartError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let cannot = |source: std::io::Error| DiskError::Open {
        path: d.path.clone(),
        source,
    };
    let check = |m: &std::fs::Metadata| {
        let t = m.file_type();
        let kind = if t.is_file() {
            return Ok(());
        } else if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_block_device() || t.is_char_device() {
            "a device"
        } else {
            "not a regular file"
        };
        Err(DiskError::NotRegular {
            path: d.path.clone(),
            kind,
        })
    };
    check(&std::fs::metadata(&d.path).map_err(cannot)?)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!d.readonly)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&d.path)
        .map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    check(&meta)?;
    if meta.len() < 512 {
        return Err(DiskError::TooSmall {
            path: d.path.clone(),
            size: meta.len(),
        }
        .into());
    }
    if meta.len() % 512 != 0 {
        log::warn!(
            "disk {}: {} bytes is not a whole number of sectors; the guest sees the last partial sector as missing",
            d.path.display(),
            meta.len()
        );
    }
    Ok(DiskImage::new(file, d.readonly, &format!("brisk-disk{i}")).map_err(cannot)?)
}

/// The devices the platform's vCPUs see, and the handles the VM keeps.
pub(crate) struct Devices {
    pub(crate) manager: DeviceManager,
    pub(crate) uart: Arc<Uart>,
    /// Test platform: one counter per vCPU.
    pub(crate) counters: Vec<Arc<CounterDevice>>,
    /// Test platform, user irqchip: the timer thread and the doorbell.
    pub(crate) timers: Option<PeriodicTimers>,
    pub(crate) doorbell: Option<Arc<Doorbell>>,
    /// The thread serving the virtio queues (parked until the VM runs).
    pub(crate) io: Option<IoEngine>,
    /// The disks and NICs, in order (changed on a running VM).
    pub(crate) virtio: VirtioHandles,
}

/// The virtio devices a running VM may change.
#[derive(Default)]
pub(crate) struct VirtioHandles {
    pub(crate) disks: Vec<Arc<VirtioMmio<DiskImage>>>,
    pub(crate) nics: Vec<Arc<VirtioMmio<Net>>>,
}

/// What the device list needs from the VM being built.
pub(crate) struct Wiring<'a> {
    pub(crate) platform: Platform,
    pub(crate) irqchip: Irqchip,
    pub(crate) cpus: usize,
    pub(crate) memory: u64,
    pub(crate) seccomp: Seccomp,
    pub(crate) end: &'a Arc<Lifecycle>,
    pub(crate) lines: Lines<'a>,
    pub(crate) disks: &'a [DiskConfig],
    pub(crate) nets: &'a [crate::NetConfig],
    pub(crate) vsock: Option<&'a crate::VsockConfig>,
    pub(crate) disk_io: Notify,
    pub(crate) kvm: &'a brisk_kvm::Vm,
    pub(crate) guest_memory: &'a vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>,
}

/// The rest of the PC a kernel probes: the keyboard controller (its reset
/// line), the CMOS RTC, PCI configuration mechanism #1 with a host bridge,
/// pvpanic; and the virtio devices, with the I/O engine that serves them.
fn pc_devices(
    m: &mut DeviceManager,
    w: &Wiring<'_>,
    handles: &mut VirtioHandles,
) -> Result<Option<IoEngine>, StartError> {
    let place = || setup::<brisk_devices::BusError>("placing a device");
    let i8042 = Arc::new(I8042::new(w.end.clone()));
    m.add_pio("i8042", ports::I8042_DATA, 1, i8042.clone())
        .map_err(place())?;
    m.add_pio("i8042", ports::I8042_COMMAND, 1, i8042)
        .map_err(place())?;
    m.add_pio(
        "cmos",
        ports::CMOS,
        2,
        Arc::new(Cmos::new(layout::low_ram(w.memory))),
    )
    .map_err(place())?;
    m.add_pio(
        "pci-host",
        ports::PCI_CONFIG,
        8,
        Arc::new(PciHostBridge::default()),
    )
    .map_err(place())?;
    m.add_pio(
        "pvpanic",
        ports::PVPANIC,
        1,
        Arc::new(PvPanic::new(w.end.clone())),
    )
    .map_err(place())?;
    let mut sources = Vec::new();
    for (i, d) in w.disks.iter().enumerate() {
        let limiter = RateLimiter::new(d.bw, d.ops, Instant::now());
        let disk = open_disk(d, i)?.with_limiter(limiter);
        let dev = virtio(
            m,
            w,
            &format!("virtio-blk{i}"),
            i,
            disk,
            w.disk_io,
            &mut sources,
        )?;
        handles.disks.push(dev);
    }
    for (j, n) in w.nets.iter().enumerate() {
        let tap = Tap::open(&n.tap)?;
        let now = Instant::now();
        let nic = Net::new(tap, n.mac.unwrap_or(Mac::default_for(j))).with_limiters(
            RateLimiter::new(n.rx_bw, n.rx_ops, now),
            RateLimiter::new(n.tx_bw, n.tx_ops, now),
        );
        let slot = w.disks.len() + j;
        let dev = virtio(
            m,
            w,
            &format!("virtio-net{j}"),
            slot,
            nic,
            Notify::Engine,
            &mut sources,
        )?;
        handles.nics.push(dev);
    }
    if let Some(v) = w.vsock {
        let dev = Vsock::new(v.cid, &v.uds_path)?;
        let slot = w.disks.len() + w.nets.len();
        virtio(
            m,
            w,
            "virtio-vsock",
            slot,
            dev,
            Notify::Engine,
            &mut sources,
        )?;
    }
    if sources.is_empty() {
        return Ok(None);
    }
    let seccomp = w.seccomp;
    let init = move || {
        if let Err(e) = seccomp::install(ThreadKind::Io, seccomp) {
            log::error!("I/O thread: cannot install its seccomp filter: {e}");
        }
    };
    let engine = IoEngine::start(sources, Box::new(init)).map_err(setup("the I/O engine"))?;
    Ok(Some(engine))
}

/// Put `device` in virtio-mmio slot `slot`: on the bus, its interrupt
/// line wired, its queue notifications (engine mode) turned into
/// ioeventfds the engine waits on.
fn virtio<D: VirtioDevice + 'static>(
    m: &mut DeviceManager,
    w: &Wiring<'_>,
    name: &str,
    slot: usize,
    device: D,
    notify: Notify,
    sources: &mut Vec<Source>,
) -> Result<Arc<VirtioMmio<D>>, StartError> {
    let line = w.lines.isa(layout::VIRTIO_IRQS[slot])?;
    let dev = VirtioMmio::new(device, w.guest_memory.clone(), line, notify)
        .map_err(setup("a queue notifier"))?;
    let dev = Arc::new(dev);
    let base = layout::virtio_mmio(slot);
    for (q, n) in dev.notifiers().iter().enumerate() {
        w.kvm.register_ioeventfd(n, base + QUEUE_NOTIFY, q as u32)?;
    }
    sources.extend(dev.engine_sources());
    m.add_mmio(name, base, MMIO_SIZE, dev.clone())
        .map_err(setup::<brisk_devices::BusError>("placing a device"))?;
    Ok(dev)
}

/// brisk's interrupt controllers: the IOAPIC at its MMIO window, the
/// 8259 pair's and the 8254's registers, and each LAPIC's state (its registers are
/// reached from its vCPU's exits, not the bus).
fn interrupt_controllers(m: &mut DeviceManager, apics: &Apics) -> Result<(), StartError> {
    let place = || setup::<brisk_devices::BusError>("placing an interrupt controller");
    m.add_mmio(
        "ioapic",
        u64::from(layout::IOAPIC_BASE),
        IOAPIC_SIZE,
        apics.ioapic().clone(),
    )
    .map_err(place())?;
    let p = Arc::new(Pic::default());
    for base in [pic::PIC_MASTER, pic::PIC_SLAVE, pic::PIC_ELCR] {
        m.add_pio("pic", base, 2, p.clone()).map_err(place())?;
    }
    let pit = Arc::new(Pit::default());
    m.add_pio("pit", pit::PIT_PORTS, 4, pit.clone())
        .map_err(place())?;
    m.add_pio("pit", pit::PORT_61, 1, pit).map_err(place())?;
    for l in apics.lapics().iter() {
        m.add_state(&format!("lapic{}", l.id()), l.clone())
            .map_err(place())?;
    }
    Ok(())
}

/// Register `w.platform`'s devices.
pub(crate) fn devices(w: Wiring<'_>, output: Output) -> Result<Devices, StartError> {
    let place = || setup::<brisk_devices::BusError>("placing a device");
    let mut m = DeviceManager::new();
    // Common to both: the PC's COM1, isa-debug-exit, ACPI PM1a control
    // (power-off) and timer, fw_cfg.
    let uart = Arc::new(Uart::new(output.into_writer(), w.lines.isa(UART_IRQ)?));
    m.add_pio("uart", ports::COM1, 8, uart.clone())
        .map_err(place())?;
    m.add_pio(
        "debug-exit",
        ports::DEBUG_EXIT,
        4,
        Arc::new(DebugExit::new(w.end.clone())),
    )
    .map_err(place())?;
    m.add_pio(
        "pm1a-control",
        ports::PM1A_CNT,
        2,
        Arc::new(PowerOff::new(w.end.clone())),
    )
    .map_err(place())?;
    m.add_pio("pm-timer", ports::PM_TIMER, 4, Arc::new(PmTimer::default()))
        .map_err(place())?;
    let fw_cfg = FwCfg::new(w.cpus as u16, w.memory, &[]);
    m.add_pio("fw_cfg", ports::FW_CFG, 2, Arc::new(fw_cfg))
        .map_err(place())?;
    let mut devices = Devices {
        manager: m,
        uart,
        counters: Vec::new(),
        timers: None,
        doorbell: None,
        io: None,
        virtio: VirtioHandles::default(),
    };
    if let Lines::Apic(apics) = &w.lines {
        interrupt_controllers(&mut devices.manager, apics)?;
    }
    if w.platform == Platform::Pc {
        devices.io = pc_devices(&mut devices.manager, &w, &mut devices.virtio)?;
        return Ok(devices);
    }
    // The built-in guests' test devices.
    let m = &mut devices.manager;
    for id in 0..w.cpus {
        let dev = Arc::new(CounterDevice::default());
        m.add_pio(&format!("counter{id}"), ports::counter(id), 4, dev.clone())
            .map_err(place())?;
        devices.counters.push(dev);
    }
    if let (Irqchip::User, Lines::User(sink)) = (w.irqchip, &w.lines) {
        let seccomp = w.seccomp;
        let init = move || {
            if let Err(e) = seccomp::install(ThreadKind::Timer, seccomp) {
                log::error!("timer thread: cannot install its seccomp filter: {e}");
            }
        };
        let timers = PeriodicTimers::with_thread_init(w.cpus, sink.clone(), Box::new(init))
            .map_err(setup("starting the timer thread"))?;
        // vCPUs 0-63 in the low window, the rest in the high one.
        let low = w.cpus.min(layout::MAX_VCPUS);
        let high = w.cpus - low;
        let windows = vec![(ports::TIMER, 0), (ports::TIMER_HIGH, layout::MAX_VCPUS)];
        let dev = timers.windows(windows);
        m.add_pio(
            "timers",
            ports::TIMER,
            TIMER_STRIDE * low as u16,
            dev.clone(),
        )
        .map_err(place())?;
        if high > 0 {
            let len = TIMER_STRIDE * high as u16;
            m.add_pio("timers", ports::TIMER_HIGH, len, dev)
                .map_err(place())?;
        }
        let doorbell = Arc::new(Doorbell::new(sink.clone(), w.cpus));
        m.add_pio("doorbell", ports::DOORBELL, 4, doorbell.clone())
            .map_err(place())?;
        devices.timers = Some(timers);
        devices.doorbell = Some(doorbell);
    }
    Ok(devices)
}
