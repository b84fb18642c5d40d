//! What to build: payload, vCPUs, memory, irqchip.

use brisk_boot::layout::{MAX_MEMORY, MAX_VCPUS, MIN_MEMORY};
use brisk_kvm::{Irqchip, Mwait};

use crate::Payload;

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
}

/// A raw disk image served as virtio-blk over virtio-mmio.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    pub path: std::path::PathBuf,
    /// Offered read-only (VIRTIO_BLK_F_RO); the file is opened read-only.
    pub readonly: bool,
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
        let (path, readonly) = match split.map(|at| (&s[..at], &s[at + 1..])) {
            Some((p, "readonly" | "ro")) => (p, true),
            Some((_, opt)) => {
                return Err(format!(
                    "unknown disk option '{}' (the only one is 'readonly'; write a comma in a file name twice)",
                    opt.escape_debug()
                ))
            }
            None => (s, false),
        };
        let path = path.replace(",,", ",");
        if path.is_empty() {
            return Err("a disk needs a file name".into());
        }
        Ok(DiskConfig {
            path: path.into(),
            readonly,
        })
    }
}

/// A virtio-net NIC on an existing TAP device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// The host interface (`ip tuntap add NAME mode tap`).
    pub tap: String,
    /// The guest's MAC; brisk's fixed default for the NIC's index if none.
    pub mac: Option<brisk_devices::virtio::Mac>,
}

impl std::str::FromStr for NetConfig {
    type Err = String;

    /// `tap=NAME[,mac=MAC]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut tap, mut mac) = (None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", name)) if !name.is_empty() => tap = Some(name.to_string()),
                Some(("mac", m)) => mac = Some(m.parse()?),
                _ => {
                    return Err(format!(
                        "'{}' is not a NIC option (tap=NAME or mac=MAC)",
                        part.escape_debug()
                    ))
                }
            }
        }
        let tap = tap.ok_or("a NIC needs tap=NAME (an existing TAP interface)")?;
        Ok(NetConfig { tap, mac })
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
            disk_io: Default::default(),
            pv_ipi: true,
            shared_memory: false,
        }
    }
}

/// A configuration brisk cannot build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Guest(#[from] brisk_guests::ChoiceError),
    #[error("{0} vCPUs requested; brisk supports 1 to {MAX_VCPUS}")]
    Cpus(usize),
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
    #[error("--net needs --kernel: built-in guests have no virtio devices")]
    NetNeedsKernel,
    #[error("TAP device {0} is given to two NICs")]
    SameTapTwice(String),
    /// Kernels bring up APs through the in-kernel LAPIC.
    #[error("--kernel needs --irqchip kernel (the LAPICs, IOAPIC and PIT a kernel expects, and INIT/SIPI for its APs)")]
    KernelNeedsKernelIrqchip,
}

impl VmConfig {
    /// Check the configuration without touching KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_VCPUS {
            return Err(ConfigError::Cpus(self.cpus));
        }
        if self.memory < MIN_MEMORY || self.memory > MAX_MEMORY || self.memory % 4096 != 0 {
            return Err(ConfigError::Memory(self.memory));
        }
        if !self.disks.is_empty() && self.payload.platform() != crate::Platform::Pc {
            return Err(ConfigError::DiskNeedsKernel);
        }
        if !self.nets.is_empty() && self.payload.platform() != crate::Platform::Pc {
            return Err(ConfigError::NetNeedsKernel);
        }
        let devices = self.disks.len() + self.nets.len();
        if devices > brisk_boot::layout::MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        for (i, n) in self.nets.iter().enumerate() {
            if self.nets[..i].iter().any(|m| m.tap == n.tap) {
                return Err(ConfigError::SameTapTwice(n.tap.clone()));
            }
        }
        self.payload.validate(self.irqchip)
    }
}
