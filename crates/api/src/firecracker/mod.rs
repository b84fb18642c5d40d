//! Firecracker's REST API, served on the same socket as brisk's own
//! (`/api/v1/...`; Firecracker's paths do not collide with it), so tools
//! that drive Firecracker can drive brisk. Its pre-boot model: the
//! configuration calls (`/machine-config`, `/boot-source`, `/drives`,
//! `/network-interfaces`, `/logger`, `/metrics`) fill a [`PreBoot`] until
//! `InstanceStart` turns it into a [`VmConfig`] and has brisk's main
//! thread build the VM; after that, the calls Firecracker allows on a
//! running microVM (`PATCH /vm`, `/snapshot/create`, `/actions`, the
//! GETs). Errors have Firecracker's shape (`{"fault_message": ...}`, 400).
//! What brisk does not have (balloon, MMDS, entropy, pmem, hotplug, CPU
//! templates) is a 400 naming it.

pub mod model;

use std::sync::Mutex;

use brisk_vmm::{DiskConfig, Irqchip, Limit, NetConfig, Payload, VmConfig};
use model::*;

use crate::routes::Reply;
use crate::slot::{Bring, VmSlot};

/// The Firecracker API version whose shapes brisk follows (`GET
/// /version`): tools that check it see the API they speak.
pub const API_VERSION: &str = "1.12.0";
/// The command line a kernel gets without `boot_args`: brisk's console,
/// no PCI (the devices are virtio-mmio).
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// Why a Firecracker call is refused (each a 400 with its sentence).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FcError {
    #[error("{0}")]
    Body(String),
    #[error("The requested operation is not supported after starting the microVM.")]
    AfterStart,
    #[error("The requested operation is not supported before starting the microVM.")]
    BeforeStart,
    #[error("the microVM is being started; its configuration can no longer change")]
    Starting,
    #[error("brisk does not support {0}")]
    Unsupported(String),
    #[error("the id in the path ({path}) and in the body ({body}) differ")]
    IdMismatch { path: String, body: String },
    #[error("{0}")]
    Invalid(String),
    #[error("brisk has room for {max} drives and network interfaces", max = brisk_boot::layout::MAX_VIRTIO_DEVICES)]
    Full,
    #[error("Invalid request method and/or path: {0}")]
    NoRoute(String),
    /// Building or changing the VM failed.
    #[error("{0}")]
    Vm(String),
}

impl FcError {
    fn reply(&self) -> Reply {
        let fault = Fault {
            fault_message: self.to_string(),
        };
        Reply::json(400, serde_json::to_value(fault).unwrap_or_default())
    }
}

/// The microVM as the pre-boot calls configured it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PreBoot {
    pub machine: MachineConfiguration,
    pub boot_source: Option<BootSource>,
    pub drives: Vec<Drive>,
    pub nets: Vec<NetworkInterface>,
    pub logger: Option<Logger>,
    pub metrics: Option<Metrics>,
    pub vsock: Option<Vsock>,
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, FcError> {
    serde_json::from_slice(body).map_err(|e| FcError::Body(format!("the body does not parse: {e}")))
}

/// The id in the path must be the body's.
fn same_id(path: &str, body: &str) -> Result<(), FcError> {
    if path != body {
        return Err(FcError::IdMismatch {
            path: path.into(),
            body: body.into(),
        });
    }
    Ok(())
}

fn limits(r: &Option<RateLimiter>) -> (Option<Limit>, Option<Limit>) {
    let bucket = |b: &Option<TokenBucket>| {
        b.filter(|b| b.size > 0 && b.refill_time > 0)
            .map(|b| Limit {
                size: b.size,
                refill_time_ms: b.refill_time,
                one_time_burst: b.one_time_burst,
            })
    };
    match r {
        Some(r) => (bucket(&r.bandwidth), bucket(&r.ops)),
        None => (None, None),
    }
}

/// `patch` over `old`: the buckets it names replace theirs, the others
/// stay (Firecracker's PATCH).
fn merge(old: Option<RateLimiter>, patch: RateLimiter) -> RateLimiter {
    let old = old.unwrap_or_default();
    RateLimiter {
        bandwidth: patch.bandwidth.or(old.bandwidth),
        ops: patch.ops.or(old.ops),
    }
}

impl PreBoot {
    /// `PUT /machine-config` (or `PATCH`, merged first).
    pub fn set_machine(&mut self, m: MachineConfiguration) -> Result<(), FcError> {
        let max = brisk_boot::layout::MAX_VCPUS as u64;
        if !(1..=max).contains(&m.vcpu_count) {
            return Err(FcError::Invalid(format!(
                "vcpu_count {} is outside 1 to {max}",
                m.vcpu_count
            )));
        }
        if m.mem_size_mib == 0 {
            return Err(FcError::Invalid("mem_size_mib must be positive".into()));
        }
        if m.smt {
            return Err(FcError::Unsupported(
                "smt (simultaneous multithreading)".into(),
            ));
        }
        for (what, v) in [
            ("cpu_template", &m.cpu_template),
            ("huge_pages", &m.huge_pages),
        ] {
            if let Some(v) = v.as_deref().filter(|v| *v != "None") {
                return Err(FcError::Unsupported(format!("{what} {v}")));
            }
        }
        self.machine = m;
        Ok(())
    }

    /// `PATCH /machine-config`.
    pub fn patch_machine(&mut self, p: MachineConfigurationPatch) -> Result<(), FcError> {
        let m = self.machine.clone();
        self.set_machine(MachineConfiguration {
            vcpu_count: p.vcpu_count.unwrap_or(m.vcpu_count),
            mem_size_mib: p.mem_size_mib.unwrap_or(m.mem_size_mib),
            smt: p.smt.unwrap_or(m.smt),
            track_dirty_pages: p.track_dirty_pages.unwrap_or(m.track_dirty_pages),
            cpu_template: p.cpu_template.or(m.cpu_template),
            huge_pages: p.huge_pages.or(m.huge_pages),
        })
    }

    /// `PUT /boot-source`.
    pub fn set_boot_source(&mut self, b: BootSource) -> Result<(), FcError> {
        if b.kernel_image_path.is_empty() {
            return Err(FcError::Invalid("kernel_image_path is empty".into()));
        }
        self.boot_source = Some(b);
        Ok(())
    }

    fn devices(&self) -> usize {
        self.drives.len() + self.nets.len() + usize::from(self.vsock.is_some())
    }

    /// `PUT /drives/{id}`: added, or replacing the drive with that id.
    pub fn put_drive(&mut self, id: &str, d: Drive) -> Result<(), FcError> {
        same_id(id, &d.drive_id)?;
        if d.socket.is_some() {
            return Err(FcError::Unsupported(
                "vhost-user-block drives (socket)".into(),
            ));
        }
        if d.path_on_host.as_deref().is_none_or(str::is_empty) {
            return Err(FcError::Invalid(format!("drive {id} needs path_on_host")));
        }
        if let Some(c) = d
            .cache_type
            .as_deref()
            .filter(|c| !matches!(*c, "Unsafe" | "Writeback"))
        {
            return Err(FcError::Invalid(format!(
                "cache_type {c} is neither Unsafe nor Writeback"
            )));
        }
        if let Some(e) = d
            .io_engine
            .as_deref()
            .filter(|e| !matches!(*e, "Sync" | "Async"))
        {
            return Err(FcError::Invalid(format!(
                "io_engine {e} is neither Sync nor Async"
            )));
        }
        let other_root = self
            .drives
            .iter()
            .any(|o| o.is_root_device && o.drive_id != id);
        if d.is_root_device && other_root {
            return Err(FcError::Invalid(
                "a root device is already configured".into(),
            ));
        }
        let full = self.devices() >= brisk_boot::layout::MAX_VIRTIO_DEVICES;
        match self.drives.iter_mut().find(|o| o.drive_id == id) {
            Some(old) => *old = d,
            None if full => return Err(FcError::Full),
            None => self.drives.push(d),
        }
        Ok(())
    }

    /// `PUT /network-interfaces/{id}`.
    pub fn put_net(&mut self, id: &str, n: NetworkInterface) -> Result<(), FcError> {
        same_id(id, &n.iface_id)?;
        if n.mtu.is_some() {
            return Err(FcError::Unsupported("mtu (VIRTIO_NET_F_MTU)".into()));
        }
        if let Some(mac) = &n.guest_mac {
            mac.parse::<brisk_vmm::Mac>().map_err(FcError::Invalid)?;
        }
        if n.host_dev_name.is_empty() {
            return Err(FcError::Invalid(format!(
                "interface {id} needs host_dev_name"
            )));
        }
        let same_tap = self
            .nets
            .iter()
            .any(|o| o.host_dev_name == n.host_dev_name && o.iface_id != id);
        if same_tap {
            return Err(FcError::Invalid(format!(
                "{} is the host device of another interface",
                n.host_dev_name
            )));
        }
        let full = self.devices() >= brisk_boot::layout::MAX_VIRTIO_DEVICES;
        match self.nets.iter_mut().find(|o| o.iface_id == id) {
            Some(old) => *old = n,
            None if full => return Err(FcError::Full),
            None => self.nets.push(n),
        }
        Ok(())
    }

    /// `PUT /vsock`.
    pub fn set_vsock(&mut self, v: Vsock) -> Result<(), FcError> {
        if v.guest_cid < 3 || v.guest_cid > u64::from(u32::MAX) {
            return Err(FcError::Invalid(format!(
                "guest_cid {} is reserved or too large (3 to 4294967295)",
                v.guest_cid
            )));
        }
        if v.uds_path.is_empty() {
            return Err(FcError::Invalid("uds_path is empty".into()));
        }
        let full = self.devices() >= brisk_boot::layout::MAX_VIRTIO_DEVICES;
        if self.vsock.is_none() && full {
            return Err(FcError::Full);
        }
        self.vsock = Some(v);
        Ok(())
    }

    /// `PUT /logger`: the level applies at once; brisk logs to stderr.
    pub fn set_logger(&mut self, l: Logger) -> Result<(), FcError> {
        if let Some(level) = &l.level {
            let filter = match level.to_ascii_lowercase().as_str() {
                "error" => log::LevelFilter::Error,
                "warning" | "warn" => log::LevelFilter::Warn,
                "info" => log::LevelFilter::Info,
                "debug" => log::LevelFilter::Debug,
                "trace" => log::LevelFilter::Trace,
                "off" => log::LevelFilter::Off,
                _ => {
                    return Err(FcError::Invalid(format!(
                        "log level {level} is not one of Error, Warning, Info, Debug, Trace, Off"
                    )))
                }
            };
            log::set_max_level(filter);
        }
        if let Some(p) = &l.log_path {
            log::warn!("logger: brisk logs to its stderr, not to {p}");
        }
        self.logger = Some(l);
        Ok(())
    }

    /// The configuration a config file describes, each section checked as
    /// its PUT is.
    pub fn from_file(f: FullVmConfiguration) -> Result<PreBoot, FcError> {
        for (what, v) in [
            ("balloon", &f.balloon),
            ("mmds-config", &f.mmds_config),
            ("entropy", &f.entropy),
            ("cpu-config", &f.cpu_config),
            ("pmem", &f.pmem),
            ("memory-hotplug", &f.memory_hotplug),
        ] {
            if v.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(FcError::Unsupported(format!("the {what} section")));
            }
        }
        let mut p = PreBoot::default();
        if let Some(m) = f.machine_config {
            p.set_machine(m)?;
        }
        if let Some(b) = f.boot_source {
            p.set_boot_source(b)?;
        }
        for d in f.drives {
            p.put_drive(&d.drive_id.clone(), d)?;
        }
        for n in f.network_interfaces {
            p.put_net(&n.iface_id.clone(), n)?;
        }
        if let Some(v) = f.vsock {
            p.set_vsock(v)?;
        }
        if let Some(l) = f.logger {
            p.set_logger(l)?;
        }
        p.metrics = f.metrics;
        Ok(p)
    }

    /// The disk a drive became at InstanceStart: the root first, then the
    /// others in the order they were put.
    fn disk_index(&self, id: &str) -> Option<usize> {
        let mut order = self
            .drives
            .iter()
            .filter(|d| d.is_root_device)
            .chain(self.drives.iter().filter(|d| !d.is_root_device));
        order.position(|d| d.drive_id == id)
    }

    /// `PATCH /drives/{id}` on a running VM: a new file, new limits.
    fn patch_drive(
        &mut self,
        vm: &brisk_vmm::Vm,
        id: &str,
        p: PartialDrive,
    ) -> Result<(), FcError> {
        same_id(id, &p.drive_id)?;
        let index = self
            .disk_index(id)
            .ok_or_else(|| FcError::Invalid(format!("there is no drive {id}")))?;
        let vm_err = |e: brisk_vmm::ChangeError| FcError::Vm(e.to_string());
        if let Some(path) = &p.path_on_host {
            vm.replace_disk(index, std::path::Path::new(path))
                .map_err(vm_err)?;
        }
        if p.rate_limiter.is_some() {
            let (bw, ops) = limits(&p.rate_limiter);
            vm.limit_disk(index, bw, ops).map_err(vm_err)?;
        }
        let d = self
            .drives
            .iter_mut()
            .find(|d| d.drive_id == id)
            .expect("indexed above");
        if let Some(path) = p.path_on_host {
            d.path_on_host = Some(path);
        }
        if p.rate_limiter.is_some() {
            d.rate_limiter = p.rate_limiter;
        }
        Ok(())
    }

    /// `PATCH /network-interfaces/{id}` on a running VM: new limits.
    fn patch_net(
        &mut self,
        vm: &brisk_vmm::Vm,
        id: &str,
        p: PartialNetworkInterface,
    ) -> Result<(), FcError> {
        same_id(id, &p.iface_id)?;
        let index = self
            .nets
            .iter()
            .position(|n| n.iface_id == id)
            .ok_or_else(|| FcError::Invalid(format!("there is no network interface {id}")))?;
        let n = &mut self.nets[index];
        if let Some(patch) = p.rx_rate_limiter {
            n.rx_rate_limiter = Some(merge(n.rx_rate_limiter, patch));
        }
        if let Some(patch) = p.tx_rate_limiter {
            n.tx_rate_limiter = Some(merge(n.tx_rate_limiter, patch));
        }
        let (rx_bw, rx_ops) = limits(&n.rx_rate_limiter);
        let (tx_bw, tx_ops) = limits(&n.tx_rate_limiter);
        vm.limit_nic(index, [rx_bw, rx_ops, tx_bw, tx_ops])
            .map_err(|e| FcError::Vm(e.to_string()))
    }

    /// What `GET /vm/config` shows.
    pub fn full(&self) -> FullVmConfiguration {
        FullVmConfiguration {
            boot_source: self.boot_source.clone(),
            drives: self.drives.clone(),
            machine_config: Some(self.machine.clone()),
            network_interfaces: self.nets.clone(),
            logger: self.logger.clone(),
            metrics: self.metrics.clone(),
            vsock: self.vsock.clone(),
            ..FullVmConfiguration::default()
        }
    }

    /// The VM `InstanceStart` builds: Linux (or a multiboot kernel) on the
    /// kernel irqchip, the root drive as `/dev/vda` (told to the kernel
    /// with `root=` unless `boot_args` says), the other drives after it in
    /// the order they were put, then the network interfaces.
    pub fn vm_config(&self, seccomp: brisk_vmm::seccomp::Seccomp) -> Result<VmConfig, FcError> {
        let Some(boot) = &self.boot_source else {
            return Err(FcError::Invalid(
                "InstanceStart needs a boot source: PUT /boot-source first".into(),
            ));
        };
        let mut cmdline = boot
            .boot_args
            .clone()
            .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string());
        let mut drives: Vec<&Drive> = self.drives.iter().filter(|d| d.is_root_device).collect();
        drives.extend(self.drives.iter().filter(|d| !d.is_root_device));
        if let Some(root) = drives.first().filter(|d| d.is_root_device) {
            if !cmdline.split_whitespace().any(|w| w.starts_with("root=")) {
                let dev = match &root.partuuid {
                    Some(u) => format!("PARTUUID={u}"),
                    None => "/dev/vda".into(),
                };
                let mode = if root.is_read_only { "ro" } else { "rw" };
                cmdline = format!("{cmdline} root={dev} {mode}");
            }
        }
        let disks = drives
            .iter()
            .map(|d| {
                let (bw, ops) = limits(&d.rate_limiter);
                DiskConfig {
                    path: d.path_on_host.clone().unwrap_or_default().into(),
                    readonly: d.is_read_only,
                    bw,
                    ops,
                }
            })
            .collect();
        let nets = self
            .nets
            .iter()
            .map(|n| {
                let (rx_bw, rx_ops) = limits(&n.rx_rate_limiter);
                let (tx_bw, tx_ops) = limits(&n.tx_rate_limiter);
                let mac = n.guest_mac.as_deref().map(str::parse).transpose();
                Ok(NetConfig {
                    tap: n.host_dev_name.clone(),
                    mac: mac.map_err(FcError::Invalid)?,
                    rx_bw,
                    rx_ops,
                    tx_bw,
                    tx_ops,
                })
            })
            .collect::<Result<_, FcError>>()?;
        let config = VmConfig {
            payload: Payload::Kernel(brisk_vmm::KernelConfig {
                path: boot.kernel_image_path.clone().into(),
                cmdline,
                initrd: boot.initrd_path.clone().map(Into::into),
            }),
            cpus: self.machine.vcpu_count as usize,
            memory: self.machine.mem_size_mib << 20,
            irqchip: Irqchip::Kernel,
            seccomp,
            track_dirty_pages: self.machine.track_dirty_pages,
            disks,
            nets,
            vsock: self.vsock.as_ref().map(|v| brisk_vmm::VsockConfig {
                cid: v.guest_cid,
                uds_path: v.uds_path.clone().into(),
            }),
            ..VmConfig::default()
        };
        config
            .validate()
            .map_err(|e| FcError::Invalid(e.to_string()))?;
        Ok(config)
    }
}

/// Firecracker's API over a [`VmSlot`]: the pre-boot configuration, then
/// the VM it started.
pub struct Firecracker {
    pub id: String,
    pre: Mutex<PreBoot>,
    seccomp: brisk_vmm::seccomp::Seccomp,
    /// An InstanceStart or snapshot load is building the VM: the
    /// configuration is no longer open (what is built is what it said).
    starting: std::sync::atomic::AtomicBool,
}

/// The endpoints Firecracker has and brisk does not: a 400 naming them.
const UNSUPPORTED: [(&str, &str); 8] = [
    ("/balloon", "the balloon device"),
    ("/mmds", "MMDS (the metadata service)"),
    ("/entropy", "the entropy device"),
    ("/pmem/", "virtio-pmem"),
    ("/hotplug/", "hotplug"),
    ("/memory-hotplug", "memory hotplug"),
    ("/cpu-config", "CPU configuration templates"),
    ("/serial", "serial output redirection"),
];

/// Whether a Firecracker request may block for long (it builds, saves
/// or restores a VM): served off the API's event loop.
pub fn is_slow(path: &str) -> bool {
    matches!(path, "/actions" | "/snapshot/create" | "/snapshot/load")
}

/// Firecracker's three instance states, for brisk's: a VM held by a
/// pause, resume, snapshot or migration is named as it was when the hold
/// began (Firecracker's state changes once an action is done), an ended
/// one "Paused" (Firecracker exits with its guest).
fn instance_state(state: &brisk_vmm::VmState) -> &'static str {
    use brisk_vmm::{VmState, Was};
    match state {
        VmState::Configured => "Not started",
        VmState::Paused | VmState::Held(_, Was::Paused) | VmState::Ended(_) => "Paused",
        VmState::Running | VmState::Held(_, Was::Running) => "Running",
    }
}

fn ok() -> Reply {
    Reply::no_content()
}

fn json<T: serde::Serialize>(v: &T) -> Reply {
    Reply::json(200, serde_json::to_value(v).unwrap_or_default())
}

impl Firecracker {
    pub fn new(id: &str, pre: PreBoot, seccomp: brisk_vmm::seccomp::Seccomp) -> Firecracker {
        Firecracker {
            id: id.into(),
            pre: Mutex::new(pre),
            seccomp,
            starting: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn pre(&self) -> std::sync::MutexGuard<'_, PreBoot> {
        self.pre.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answer one request on a Firecracker path.
    pub fn handle(&self, slot: &VmSlot, method: &str, path: &str, body: &[u8]) -> Reply {
        let path = path.split('?').next().unwrap_or(path);
        match self.route(slot, method, path, body) {
            Ok(reply) => reply,
            Err(e) => e.reply(),
        }
    }

    fn route(
        &self,
        slot: &VmSlot,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<Reply, FcError> {
        let vm = slot.get();
        if let Some((_, what)) = UNSUPPORTED.iter().find(|(p, _)| path.starts_with(p)) {
            return Err(FcError::Unsupported(what.to_string()));
        }
        let id_of = |prefix: &str| {
            path.strip_prefix(prefix)
                .filter(|id| !id.is_empty() && !id.contains('/'))
                .map(str::to_string)
        };
        match (method, path) {
            ("GET", "/") => Ok(json(&InstanceInfo {
                app_name: "brisk".into(),
                id: self.id.clone(),
                state: instance_state(&slot.state()).into(),
                vmm_version: env!("CARGO_PKG_VERSION").into(),
            })),
            ("GET", "/version") => Ok(json(&FirecrackerVersion {
                firecracker_version: API_VERSION.into(),
            })),
            ("GET", "/machine-config") => Ok(json(&self.pre().machine)),
            ("GET", "/vm/config") => Ok(json(&self.pre().full())),
            ("PUT", "/machine-config") => {
                self.configuring(slot)?.set_machine(parse(body)?)?;
                Ok(ok())
            }
            ("PATCH", "/machine-config") => {
                self.configuring(slot)?.patch_machine(parse(body)?)?;
                Ok(ok())
            }
            ("PUT", "/boot-source") => {
                self.configuring(slot)?.set_boot_source(parse(body)?)?;
                Ok(ok())
            }
            ("PUT", "/logger") => {
                self.pre().set_logger(parse(body)?)?;
                Ok(ok())
            }
            ("PUT", "/vsock") => {
                self.configuring(slot)?.set_vsock(parse(body)?)?;
                Ok(ok())
            }
            ("PUT", "/metrics") => {
                self.configuring(slot)?.metrics = Some(parse(body)?);
                Ok(ok())
            }
            ("PUT", p) if p.starts_with("/drives/") => {
                let id =
                    id_of("/drives/").ok_or_else(|| FcError::NoRoute(format!("{method} {p}")))?;
                self.configuring(slot)?.put_drive(&id, parse(body)?)?;
                Ok(ok())
            }
            ("PUT", p) if p.starts_with("/network-interfaces/") => {
                let id = id_of("/network-interfaces/")
                    .ok_or_else(|| FcError::NoRoute(format!("{method} {p}")))?;
                self.configuring(slot)?.put_net(&id, parse(body)?)?;
                Ok(ok())
            }
            ("PATCH", p) if p.starts_with("/drives/") => {
                let id =
                    id_of("/drives/").ok_or_else(|| FcError::NoRoute(format!("{method} {p}")))?;
                let vm = vm.ok_or(FcError::BeforeStart)?;
                self.pre().patch_drive(&vm, &id, parse(body)?)?;
                Ok(ok())
            }
            ("PATCH", p) if p.starts_with("/network-interfaces/") => {
                let id = id_of("/network-interfaces/")
                    .ok_or_else(|| FcError::NoRoute(format!("{method} {p}")))?;
                let vm = vm.ok_or(FcError::BeforeStart)?;
                self.pre().patch_net(&vm, &id, parse(body)?)?;
                Ok(ok())
            }
            ("PUT", "/actions") => self.action(slot, vm, parse(body)?),
            ("PATCH", "/vm") => {
                let Some(vm) = vm else {
                    return Err(FcError::BeforeStart);
                };
                let change: VmStateChange = parse(body)?;
                let deadline = brisk_control::Deadline::after(std::time::Duration::from_secs(2));
                let done = match change.state.as_str() {
                    "Paused" => vm.try_pause(deadline),
                    "Resumed" => vm.try_resume(),
                    other => {
                        return Err(FcError::Invalid(format!(
                            "state {other} is neither Paused nor Resumed"
                        )))
                    }
                };
                match done {
                    Ok(())
                    | Err(brisk_vmm::PauseError::AlreadyPaused)
                    | Err(brisk_vmm::PauseError::NotPaused) => Ok(ok()),
                    Err(e) => Err(FcError::Vm(e.to_string())),
                }
            }
            ("PUT", "/snapshot/create") => {
                let Some(vm) = vm else {
                    return Err(FcError::BeforeStart);
                };
                let p: SnapshotCreateParams = parse(body)?;
                let diff = match p.snapshot_type.as_deref() {
                    None | Some("Full") => false,
                    Some("Diff") => true,
                    Some(t) => return Err(FcError::Invalid(format!("snapshot_type {t}"))),
                };
                // Another snapshot holding it: this one waits for it.
                let paused = matches!(
                    vm.state(),
                    brisk_vmm::VmState::Paused
                        | brisk_vmm::VmState::Held(
                            brisk_vmm::Hold::Snapshot,
                            brisk_vmm::Was::Paused
                        )
                );
                if !paused {
                    return Err(FcError::Invalid(
                        "the microVM must be paused to create a snapshot (PATCH /vm)".into(),
                    ));
                }
                if p.mem_file_path.is_empty() {
                    return Err(FcError::Invalid("mem_file_path is empty".into()));
                }
                // brisk's snapshot is a directory (its state and memory
                // files, replaced durably): snapshot_path names it.
                let dir = std::path::Path::new(&p.snapshot_path);
                match diff {
                    true => vm.snapshot_diff(dir),
                    false => vm.snapshot(dir),
                }
                .map_err(|e| FcError::Vm(e.to_string()))?;
                Ok(ok())
            }
            ("PUT", "/snapshot/load") => {
                let p: SnapshotLoadParams = parse(body)?;
                if p.mem_backend
                    .as_ref()
                    .is_some_and(|b| b.backend_type != "File")
                {
                    return Err(FcError::Unsupported("a UFFD memory backend".into()));
                }
                if !p.network_overrides.is_empty() || p.vsock_override.is_some() {
                    return Err(FcError::Unsupported("network or vsock overrides".into()));
                }
                let what = Bring::Restore {
                    dir: p.snapshot_path.into(),
                    paused: !p.resume_vm,
                };
                self.start(slot, |_| Ok(what))?;
                Ok(ok())
            }
            _ => Err(FcError::NoRoute(format!(
                "{method} {}",
                crate::routes::shorten(path)
            ))),
        }
    }

    /// The pre-boot configuration, open for a change: refused once a VM
    /// runs or one is being built. Checked under the configuration's
    /// lock, which a start holds while it reads the configuration and
    /// marks itself starting: no change slips in between.
    fn configuring(&self, slot: &VmSlot) -> Result<std::sync::MutexGuard<'_, PreBoot>, FcError> {
        use std::sync::atomic::Ordering::SeqCst;
        let pre = self.pre();
        match slot.get() {
            Some(_) => Err(FcError::AfterStart),
            None if self.starting.load(SeqCst) => Err(FcError::Starting),
            None => Ok(pre),
        }
    }

    /// Have brisk's main thread build the VM that `what` makes of the
    /// configuration, the configuration closed meanwhile (and open again
    /// if it fails).
    fn start(
        &self,
        slot: &VmSlot,
        what: impl FnOnce(&PreBoot) -> Result<Bring, FcError>,
    ) -> Result<(), FcError> {
        use std::sync::atomic::Ordering::SeqCst;
        /// Opens the configuration again however the start ends.
        struct Started<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Started<'_> {
            fn drop(&mut self) {
                self.0.store(false, SeqCst);
            }
        }
        let (what, _started) = {
            let pre = self.configuring(slot)?;
            let what = what(&pre)?;
            self.starting.store(true, SeqCst);
            (what, Started(&self.starting))
        };
        slot.bring(what).map_err(|e| FcError::Vm(e.to_string()))
    }

    fn action(
        &self,
        slot: &VmSlot,
        vm: Option<std::sync::Arc<brisk_vmm::Vm>>,
        a: InstanceActionInfo,
    ) -> Result<Reply, FcError> {
        match (a.action_type.as_str(), vm) {
            ("InstanceStart", Some(_)) => Err(FcError::AfterStart),
            ("InstanceStart", None) => {
                self.start(slot, |pre| {
                    Ok(Bring::Start(Box::new(pre.vm_config(self.seccomp)?)))
                })?;
                Ok(ok())
            }
            // brisk has no keyboard to press it on: the VM is shut down
            // (Firecracker's guest reboots, and a reboot ends Firecracker).
            ("SendCtrlAltDel", Some(vm)) => {
                vm.request_shutdown();
                Ok(ok())
            }
            ("FlushMetrics", _) if self.pre().metrics.is_none() => Err(FcError::Invalid(
                "metrics are not configured: PUT /metrics first".into(),
            )),
            // brisk's counters are served live (GET /api/v1/vm.counters).
            ("FlushMetrics", _) => Ok(ok()),
            ("SendCtrlAltDel", None) => Err(FcError::BeforeStart),
            (other, _) => Err(FcError::Invalid(format!(
                "action_type {other} is not one of InstanceStart, SendCtrlAltDel, FlushMetrics"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A held VM is reported as it was when the hold began: a live
    /// snapshot of a running VM leaves it "Running", a snapshot of a
    /// paused one "Paused", a resume on its way still "Paused".
    #[test]
    fn a_held_vm_reports_what_it_was() {
        use brisk_vmm::{Hold, VmState, Was};
        for (state, want) in [
            (VmState::Configured, "Not started"),
            (VmState::Running, "Running"),
            (VmState::Paused, "Paused"),
            (VmState::Held(Hold::Snapshot, Was::Running), "Running"),
            (VmState::Held(Hold::Snapshot, Was::Paused), "Paused"),
            (VmState::Held(Hold::Migration, Was::Paused), "Paused"),
            (VmState::Held(Hold::Pausing, Was::Running), "Running"),
            (VmState::Held(Hold::Resuming, Was::Paused), "Paused"),
        ] {
            assert_eq!(instance_state(&state), want, "{state:?}");
        }
    }

    fn drive(id: &str, root: bool) -> Drive {
        Drive {
            drive_id: id.into(),
            is_root_device: root,
            path_on_host: Some(format!("/img/{id}")),
            ..Drive::default()
        }
    }

    #[test]
    fn the_root_drive_is_vda_and_told_to_the_kernel() {
        let mut p = PreBoot::default();
        p.set_boot_source(BootSource {
            kernel_image_path: "/k".into(),
            ..BootSource::default()
        })
        .unwrap();
        p.put_drive("data", drive("data", false)).unwrap();
        p.put_drive("rootfs", drive("rootfs", true)).unwrap();
        let c = p.vm_config(brisk_vmm::seccomp::Seccomp::Off).unwrap();
        assert_eq!(c.disks[0].path, std::path::PathBuf::from("/img/rootfs"));
        assert_eq!(c.disks[1].path, std::path::PathBuf::from("/img/data"));
        let Payload::Kernel(k) = &c.payload else {
            panic!()
        };
        assert_eq!(k.cmdline, format!("{DEFAULT_BOOT_ARGS} root=/dev/vda rw"));
        assert_eq!((c.cpus, c.memory), (1, 128 << 20));
        // A second root is refused; the same id replaces.
        assert!(p.put_drive("other", drive("other", true)).is_err());
        p.put_drive("rootfs", drive("rootfs", true)).unwrap();
        assert_eq!(p.drives.len(), 2);
    }

    #[test]
    fn bad_configuration_is_refused_by_name() {
        let mut p = PreBoot::default();
        let m = |vcpu_count, smt| MachineConfiguration {
            vcpu_count,
            smt,
            ..MachineConfiguration::default()
        };
        assert!(p
            .set_machine(m(0, false))
            .unwrap_err()
            .to_string()
            .contains("vcpu_count 0"));
        assert!(p
            .set_machine(m(2, true))
            .unwrap_err()
            .to_string()
            .contains("smt"));
        let e = p.put_drive("a", drive("b", false)).unwrap_err();
        assert_eq!(
            e,
            FcError::IdMismatch {
                path: "a".into(),
                body: "b".into()
            }
        );
        let e = p.vm_config(brisk_vmm::seccomp::Seccomp::Off).unwrap_err();
        assert!(e.to_string().contains("PUT /boot-source"));
        let net = NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some("01:00:00:00:00:00".into()),
            ..NetworkInterface::default()
        };
        assert!(p
            .put_net("eth0", net)
            .unwrap_err()
            .to_string()
            .contains("multicast"));
        let file: FullVmConfiguration =
            serde_json::from_str(r#"{"balloon": {"amount_mib": 1}}"#).unwrap();
        assert!(PreBoot::from_file(file)
            .unwrap_err()
            .to_string()
            .contains("balloon"));
        assert!(serde_json::from_str::<FullVmConfiguration>(r#"{"boot_source": {}}"#).is_err());
    }

    #[test]
    fn rate_limiters_map_to_token_buckets() {
        let r = Some(RateLimiter {
            bandwidth: Some(TokenBucket {
                size: 1000,
                refill_time: 100,
                one_time_burst: 5,
            }),
            ops: Some(TokenBucket::default()),
        });
        let (bw, ops) = limits(&r);
        assert_eq!(bw.unwrap().rate(), 10_000);
        assert_eq!(bw.unwrap().one_time_burst, 5);
        assert_eq!(ops, None, "a zero bucket is no limit");
    }
}
