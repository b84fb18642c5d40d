//! What to build: payload, vCPUs, memory, irqchip.

use brisk_boot::layout::{
    MAX_BUILTIN_VCPUS, MAX_MEMORY, MAX_VCPUS, MIN_MEMORY, MIN_MEMORY_HIGH_VCPUS,
};
use brisk_kvm::{Irqchip, Mwait};

use crate::Payload;
pub use brisk_devices::Limit;

/// A VM's configuration (saved in snapshots).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// What the VM boots.
    pub payload: Payload,
    /// Number of vCPUs.
    pub cpus: usize,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Where HLT and interrupts are handled.
    pub irqchip: Irqchip,
    /// What the guest gets for MONITOR/MWAIT.
    pub mwait: Mwait,
    /// The seccomp filters brisk's threads install (none by default in
    /// the library; `brisk run` traps by default).
    pub seccomp: crate::seccomp::Seccomp,
    /// virtio-blk disks, `/dev/vda`, `/dev/vdb`, ... in this order.
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs on TAP devices, `eth0`, `eth1`, ... in this order.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// A virtio-vsock device with Firecracker's hybrid host side (a Unix
    /// socket), in the slot after the NICs.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Who serves the disks' queues: the I/O engine (default) or the
    /// notifying vCPU inline (the benchmarks' baseline). NICs are always
    /// on the engine: their TAP needs a thread that waits on it.
    #[serde(default)]
    pub disk_io: brisk_devices::virtio::Notify,
    /// Offer KVM's PV send-IPI hypercall in CPUID (default true; false is
    /// QEMU's `kvm-pv-ipi=off`, needed where the host cannot complete it).
    pub pv_ipi: bool,
    /// Guest RAM in a memfd mapped shared (default false: anonymous),
    /// so a local upgrade can hand it to a new brisk without a copy.
    #[serde(default)]
    pub shared_memory: bool,
    /// Keep KVM's dirty log on from the start, so a diff snapshot can
    /// hold only what was written since the last snapshot (Firecracker's
    /// `track_dirty_pages`; each write to a clean page then costs a fault).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Learn which pages the guest writes (for migrations, live and diff
    /// snapshots) from KVM's per-vCPU dirty rings instead of its per-slot
    /// bitmaps: the cost of each look then grows with the pages written,
    /// not with RAM (`brisk bench snapshot` compares both).
    #[serde(default)]
    pub dirty_ring: bool,
    /// M:N: run every vCPU on a pool of this many host threads (a halted
    /// or parked vCPU holds none); `None`: a thread per vCPU.
    #[serde(default)]
    pub vcpu_threads: Option<usize>,
}

/// A raw disk image served as virtio-blk over virtio-mmio.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    pub path: std::path::PathBuf,
    /// Offered read-only (VIRTIO_BLK_F_RO); the file is opened read-only.
    pub readonly: bool,
    /// Bytes per second (`bw=`), requests per second (`ops=`).
    #[serde(default)]
    pub bw: Option<Limit>,
    #[serde(default)]
    pub ops: Option<Limit>,
}

/// `N`, `NK`, `NM` or `NG` (1024-based).
fn amount(key: &str, v: &str) -> Result<u64, String> {
    let (digits, unit) = match v.char_indices().last() {
        Some((i, 'K' | 'k')) => (&v[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&v[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&v[..i], 1 << 30),
        _ => (v, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            format!(
                "{key}={}: not a positive number (K, M or G may follow)",
                v.escape_debug()
            )
        })
}

/// Set the rate (`KEY=N` per second) or one-time burst (`KEY-burst=N`)
/// of `limit` if `key` is `name` or `name-burst`; false if it is neither.
fn limit_option(limit: &mut Option<Limit>, name: &str, key: &str, v: &str) -> Result<bool, String> {
    if key == name {
        let burst = limit.map_or(0, |l| l.one_time_burst);
        *limit = Some(Limit {
            one_time_burst: burst,
            ..Limit::per_second(amount(key, v)?)
        });
    } else if key.strip_suffix("-burst") == Some(name) {
        limit.get_or_insert_with(Limit::default).one_time_burst = amount(key, v)?;
    } else {
        return Ok(false);
    }
    Ok(true)
}

/// A burst given without its rate has nothing to refill at.
fn check_limit(limit: &Option<Limit>, name: &str) -> Result<(), String> {
    match limit {
        Some(l) if l.size == 0 => Err(format!("{name}-burst= needs {name}= too")),
        _ => Ok(()),
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = String;

    /// `FILE` or `FILE,readonly` (also `,ro`); a comma in the file's name
    /// is written twice, as QEMU's options have it (`a,,b.img`).
    fn from_str(s: &str) -> Result<Self, String> {
        // The options start at the first comma that is not doubled.
        let mut split = None;
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b',' {
                if b.get(i + 1) == Some(&b',') {
                    i += 2;
                    continue;
                }
                split = Some(i);
                break;
            }
            i += 1;
        }
        let (path, options) = match split {
            Some(at) => (&s[..at], &s[at + 1..]),
            None => (s, ""),
        };
        let mut disk = DiskConfig {
            path: path.replace(",,", ",").into(),
            ..DiskConfig::default()
        };
        if disk.path.as_os_str().is_empty() {
            return Err("a disk needs a file name".into());
        }
        for opt in options.split(',').filter(|o| !o.is_empty()) {
            let (key, v) = opt.split_once('=').unwrap_or((opt, ""));
            let known = match key {
                "readonly" | "ro" if v.is_empty() => {
                    disk.readonly = true;
                    true
                }
                _ => {
                    limit_option(&mut disk.bw, "bw", key, v)?
                        || limit_option(&mut disk.ops, "ops", key, v)?
                }
            };
            if !known {
                return Err(format!(
                    "unknown disk option '{}' (readonly, bw=BYTES/s, ops=N/s, bw-burst=, ops-burst=; write a comma in a file name twice)",
                    opt.escape_debug()
                ));
            }
        }
        check_limit(&disk.bw, "bw")?;
        check_limit(&disk.ops, "ops")?;
        Ok(disk)
    }
}

/// virtio-vsock: the guest's CID and the Unix socket host processes
/// connect to (`CONNECT <port>\n`); guest connections to host port P go
/// to `<uds_path>_P`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    pub cid: u64,
    pub uds_path: std::path::PathBuf,
}

impl std::str::FromStr for VsockConfig {
    type Err = String;

    /// `cid=N,uds=PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut cid, mut uds) = (None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("cid", v)) => {
                    cid = Some(
                        v.parse::<u64>()
                            .map_err(|_| format!("cid={}: not a number", v.escape_debug()))?,
                    )
                }
                Some(("uds", v)) if !v.is_empty() => uds = Some(v.into()),
                _ => {
                    return Err(format!(
                        "'{}' is not a vsock option (cid=N, uds=PATH)",
                        part.escape_debug()
                    ))
                }
            }
        }
        let cid = cid.ok_or("a vsock needs cid=N (3 or more)")?;
        if cid < 3 || cid > u64::from(u32::MAX) {
            return Err(format!(
                "cid {cid} is reserved or too large (3 to 4294967295)"
            ));
        }
        let uds_path = uds.ok_or("a vsock needs uds=PATH (the Unix socket brisk listens on)")?;
        Ok(VsockConfig { cid, uds_path })
    }
}

/// A virtio-net NIC on an existing TAP device.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// The host interface (`ip tuntap add NAME mode tap`).
    pub tap: String,
    /// The guest's MAC; brisk's fixed default for the NIC's index if none.
    pub mac: Option<brisk_devices::virtio::Mac>,
    /// Rate limits on what the guest receives and transmits: frame bytes
    /// per second, frames per second.
    #[serde(default)]
    pub rx_bw: Option<Limit>,
    #[serde(default)]
    pub rx_ops: Option<Limit>,
    #[serde(default)]
    pub tx_bw: Option<Limit>,
    #[serde(default)]
    pub tx_ops: Option<Limit>,
}

impl std::str::FromStr for NetConfig {
    type Err = String;

    /// `tap=NAME[,mac=MAC][,rx-bw=N][,tx-bw=N][,rx-ops=N][,tx-ops=N]`
    /// (each limit also `...-burst=N`).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut n = NetConfig::default();
        for part in s.split(',') {
            let (key, v) = part.split_once('=').unwrap_or((part, ""));
            let known = match key {
                "tap" if !v.is_empty() => {
                    n.tap = v.to_string();
                    true
                }
                "mac" => {
                    n.mac = Some(v.parse()?);
                    true
                }
                _ => {
                    limit_option(&mut n.rx_bw, "rx-bw", key, v)?
                        || limit_option(&mut n.tx_bw, "tx-bw", key, v)?
                        || limit_option(&mut n.rx_ops, "rx-ops", key, v)?
                        || limit_option(&mut n.tx_ops, "tx-ops", key, v)?
                }
            };
            if !known {
                return Err(format!(
                    "'{}' is not a NIC option (tap=NAME, mac=MAC, rx-bw=, tx-bw=, rx-ops=, tx-ops=, each limit also -burst=)",
                    part.escape_debug()
                ));
            }
        }
        if n.tap.is_empty() {
            return Err("a NIC needs tap=NAME (an existing TAP interface)".into());
        }
        check_limit(&n.rx_bw, "rx-bw")?;
        check_limit(&n.tx_bw, "tx-bw")?;
        check_limit(&n.rx_ops, "rx-ops")?;
        check_limit(&n.tx_ops, "tx-ops")?;
        Ok(n)
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            payload: Payload::default(),
            cpus: 2,
            memory: 64 << 20,
            irqchip: Irqchip::User,
            mwait: Mwait::Hide,
            seccomp: crate::seccomp::Seccomp::Off,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            disk_io: Default::default(),
            pv_ipi: true,
            shared_memory: false,
            track_dirty_pages: false,
            dirty_ring: false,
            vcpu_threads: None,
        }
    }
}

/// A configuration brisk cannot build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Guest(#[from] brisk_guests::ChoiceError),
    #[error("{cpus} vCPUs requested; brisk supports 1 to {max} for {what}")]
    Cpus {
        cpus: usize,
        max: usize,
        what: &'static str,
    },
    /// The high per-vCPU areas of a big built-in guest need the RAM.
    #[error("{cpus} vCPUs need at least {} MiB of memory (their stacks and data lie up to 6 MiB)", MIN_MEMORY_HIGH_VCPUS >> 20)]
    MemoryForVcpus { cpus: usize },
    #[error("{0} bytes of memory requested; need a multiple of 4 KiB from {min} MiB to {max} GiB", min = MIN_MEMORY >> 20, max = MAX_MEMORY >> 30)]
    Memory(u64),
    /// The guest's interrupts come from user-space devices.
    #[error("guest '{0}' takes interrupts from brisk's user-space timer and doorbell, which need --irqchip user")]
    NeedsUserIrqchip(&'static str),
    /// Disks are devices of the PC platform.
    #[error("--disk needs --kernel: built-in guests have no virtio devices")]
    DiskNeedsKernel,
    #[error("{0} disks and NICs requested; brisk has room for {max} virtio devices", max = brisk_boot::layout::MAX_VIRTIO_DEVICES)]
    TooManyDevices(usize),
    /// NICs are devices of the PC platform.
    #[error("--net and --vsock need --kernel: built-in guests have no virtio devices")]
    NetNeedsKernel,
    #[error("TAP device {0} is given to two NICs")]
    SameTapTwice(String),
    /// A throttled inline queue would have nobody to serve it later.
    #[error("disk rate limits (bw=, ops=) need --disk-io engine")]
    LimitNeedsEngine,
    #[error("--vcpu-threads {threads} for {cpus} vCPUs: give 1 to {cpus} threads")]
    VcpuThreads { threads: usize, cpus: usize },
    /// Under KVM's irqchip a halt never leaves KVM_RUN.
    #[error("--vcpu-threads needs --irqchip user: with KVM's in-kernel irqchip a halted vCPU stays inside KVM_RUN and keeps its thread")]
    PoolNeedsUserIrqchip,
}

impl VmConfig {
    /// Check the configuration without touching KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // A kernel's MADT lists xAPIC entries; a built-in guest has room
        // for KVM's usual maximum (its vCPUs from 64 on in the high areas).
        let (max, what) = match self.payload {
            Payload::Builtin(_) => (MAX_BUILTIN_VCPUS, "a built-in guest"),
            Payload::Kernel(_) => (MAX_VCPUS, "a kernel"),
        };
        if self.cpus == 0 || self.cpus > max {
            return Err(ConfigError::Cpus {
                cpus: self.cpus,
                max,
                what,
            });
        }
        if self.cpus > MAX_VCPUS && self.memory < MIN_MEMORY_HIGH_VCPUS {
            return Err(ConfigError::MemoryForVcpus { cpus: self.cpus });
        }
        if let Some(threads) = self.vcpu_threads {
            if threads == 0 || threads > self.cpus {
                return Err(ConfigError::VcpuThreads {
                    threads,
                    cpus: self.cpus,
                });
            }
            if self.irqchip == Irqchip::Kernel {
                return Err(ConfigError::PoolNeedsUserIrqchip);
            }
        }
        if self.memory < MIN_MEMORY || self.memory > MAX_MEMORY || self.memory % 4096 != 0 {
            return Err(ConfigError::Memory(self.memory));
        }
        if !self.disks.is_empty() && self.payload.platform() != crate::Platform::Pc {
            return Err(ConfigError::DiskNeedsKernel);
        }
        let has_virtio = !self.nets.is_empty() || self.vsock.is_some();
        if has_virtio && self.payload.platform() != crate::Platform::Pc {
            return Err(ConfigError::NetNeedsKernel);
        }
        let devices = self.disks.len() + self.nets.len() + usize::from(self.vsock.is_some());
        if devices > brisk_boot::layout::MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        let limited = self.disks.iter().any(|d| d.bw.is_some() || d.ops.is_some());
        if limited && self.disk_io == brisk_devices::virtio::Notify::Inline {
            return Err(ConfigError::LimitNeedsEngine);
        }
        for (i, n) in self.nets.iter().enumerate() {
            if self.nets[..i].iter().any(|m| m.tap == n.tap) {
                return Err(ConfigError::SameTapTwice(n.tap.clone()));
            }
        }
        self.payload.validate(self.irqchip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_and_nic_limits_parse_and_bad_ones_are_named() {
        let d: DiskConfig = "a,,b.img,ro,bw=10M,ops-burst=100,ops=500".parse().unwrap();
        assert_eq!(d.path, std::path::PathBuf::from("a,b.img"));
        assert!(d.readonly);
        assert_eq!(d.bw, Some(Limit::per_second(10 << 20)));
        assert_eq!(
            d.ops,
            Some(Limit {
                one_time_burst: 100,
                ..Limit::per_second(500)
            })
        );
        let n: NetConfig = "tap=t0,tx-bw=1G,rx-ops=1000,rx-ops-burst=5K"
            .parse()
            .unwrap();
        assert_eq!(n.tap, "t0");
        assert_eq!(n.tx_bw, Some(Limit::per_second(1 << 30)));
        assert_eq!(
            n.rx_ops,
            Some(Limit {
                one_time_burst: 5 << 10,
                ..Limit::per_second(1000)
            })
        );
        assert_eq!((n.rx_bw, n.tx_ops), (None, None));
        for (bad, says) in [
            ("a.img,bw=0", "not a positive number"),
            ("a.img,bw=ten", "not a positive number"),
            ("a.img,bw-burst=1M", "needs bw="),
            ("a.img,fast", "unknown disk option 'fast'"),
        ] {
            let e = bad.parse::<DiskConfig>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        for (bad, says) in [
            ("tap=t0,tx-bw=99999999999999999999", "not a positive number"),
            ("tap=t0,rx-ops-burst=5", "needs rx-ops="),
            ("tap=t0,mtu=9000", "not a NIC option"),
        ] {
            let e = bad.parse::<NetConfig>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let inline = VmConfig {
            payload: Payload::Kernel(crate::KernelConfig::default()),
            irqchip: Irqchip::Kernel,
            disks: vec![d],
            disk_io: brisk_devices::virtio::Notify::Inline,
            ..VmConfig::default()
        };
        assert_eq!(inline.validate(), Err(ConfigError::LimitNeedsEngine));
    }
}
