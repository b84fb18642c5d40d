//! Multiboot (v1) test kernels written for brisk, in C and assembly, built
//! with the machine's gcc and ld by `src/c/build.sh` (run by this crate's
//! build script; by hand: `sh crates/test-kernels/src/c/build.sh DIR`).
//!
//! Every kernel prints on COM1 and ends by writing its result to the
//! debug-exit port 0xf4: 0 means success, so brisk exits with status 1.
//!
//! ```
//! assert!(std::path::Path::new(brisk_test_kernels::HELLO).exists());
//! ```

pub mod host_net;

/// Prints the multiboot magic, memory, command line and initrd; exits with
/// the status given as `status=N` on its command line.
pub const HELLO: &str = concat!(env!("OUT_DIR"), "/hello.elf");
/// Reads fw_cfg and the ACPI MADT, starts every AP with INIT/SIPI; each AP
/// prints its APIC id.
pub const SMP: &str = concat!(env!("OUT_DIR"), "/smp.elf");
/// Finds the PM timer through the FADT and checks its rate against PIT
/// channel 2 (within 5%).
pub const PMTIMER: &str = concat!(env!("OUT_DIR"), "/pmtimer.elf");
/// Times `inl` from an unassigned port and from the PM timer with rdtsc.
pub const INL: &str = concat!(env!("OUT_DIR"), "/inl.elf");
/// Takes the UART's IRQ 4 through KVM's IOAPIC (transmit-empty, then
/// received data: it waits for the host to type "ping"), and echoes it.
pub const UARTIRQ: &str = concat!(env!("OUT_DIR"), "/uartirq.elf");

/// Drives the first virtio-blk disk by polling its queue: writes a known
/// pattern (byte i of sector s is `(s * 31 + i * 7 + 1) & 0xff`) to the
/// first 64 sectors, flushes, reads it back; `bench=N` times N random and
/// N sequential 4 KiB reads instead.
pub const VIRTIOBLK: &str = concat!(env!("OUT_DIR"), "/virtioblk.elf");
/// Drives the first virtio device as virtio-net (polled): `echo=N`,
/// `burst=N` or `flood`, `offload` to accept the checksum/TSO offloads.
pub const VIRTIONET: &str = concat!(env!("OUT_DIR"), "/virtionet.elf");
/// Drives the first virtio device as virtio-vsock (polled): listens on
/// guest port 1234 and echoes; connects once to host port 1235 at start
/// and sends "vsockecho: hello\n" there.
pub const VSOCKECHO: &str = concat!(env!("OUT_DIR"), "/vsockecho.elf");
/// Every vCPU plays IPI ping-pong with every other through the x2APIC
/// (2000 round trips each way per pair); a lost IPI hangs it. Prints its
/// progress with CPU 1 every 400 round trips (with `hold` in its command
/// line that pair then waits for a byte of console input), then the time
/// per round trip; exits 0 when every count is right. With `timer` it
/// instead times 200 one-shot LAPIC timer interrupts on the BSP and
/// prints how late their handlers ran (median, p99).
pub const IPISTORM: &str = concat!(env!("OUT_DIR"), "/ipistorm.elf");
/// The ethertype of the frames `VIRTIONET` sends (IEEE local
/// experimental).
pub const VIRTIONET_ETHERTYPE: u16 = 0x88b5;
/// Sectors the `VIRTIOBLK` kernel writes its pattern to.
pub const VIRTIOBLK_SECTORS: u64 = 64;

/// Byte `i` of sector `s` of the `VIRTIOBLK` pattern.
pub fn virtioblk_pattern(s: u64, i: u64) -> u8 {
    (s * 31 + i * 7 + 1) as u8
}

/// The debug-exit value every kernel writes on success (brisk status 1).
pub const PASS: u8 = 0;

/// The guest Linux `scripts/guest-kernel.sh` builds (Debian's
/// linux-source-6.1, cached outside the tree), and the images it boots.
#[derive(Clone, Debug)]
pub struct GuestLinux {
    pub bzimage: std::path::PathBuf,
    pub vmlinux: std::path::PathBuf,
    /// An uncompressed cpio with the marker `/init`.
    pub initramfs: std::path::PathBuf,
    /// An ext4 image with the marker `/sbin/init` (copy it before booting
    /// it read-write).
    pub rootfs: std::path::PathBuf,
}

/// What the marker init prints once user space runs.
pub const LINUX_USERSPACE_MARKER: &str = "brisk-init: userspace reached";

/// Why the guest kernel is not there.
#[derive(Clone, Debug, thiserror::Error)]
pub enum GuestKernelError {
    #[error("cannot run {script}: {source}")]
    Run {
        script: &'static str,
        #[source]
        source: std::sync::Arc<std::io::Error>,
    },
    #[error("{script} failed ({status})")]
    Failed {
        script: &'static str,
        status: std::process::ExitStatus,
    },
    #[error("{script} printed no {key}= line: {printed}")]
    NoPath {
        script: &'static str,
        key: &'static str,
        printed: String,
    },
}

/// Run `scripts/guest-kernel.sh` (a cache hit takes a second; a miss
/// builds the kernel, about 8 minutes on 2 cores) and take the paths from
/// its last lines.
pub fn guest_linux() -> Result<GuestLinux, GuestKernelError> {
    static ONCE: std::sync::OnceLock<Result<GuestLinux, GuestKernelError>> =
        std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/guest-kernel.sh");
        let out = std::process::Command::new("bash")
            .arg(script)
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| GuestKernelError::Run {
                script,
                source: std::sync::Arc::new(e),
            })?;
        if !out.status.success() {
            return Err(GuestKernelError::Failed {
                script,
                status: out.status,
            });
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let get = |key: &'static str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .map(std::path::PathBuf::from)
                .ok_or_else(|| GuestKernelError::NoPath {
                    script,
                    key,
                    printed: text.clone(),
                })
        };
        Ok(GuestLinux {
            bzimage: get("bzImage")?,
            vmlinux: get("vmlinux")?,
            initramfs: get("initramfs")?,
            rootfs: get("rootfs")?,
        })
    })
    .clone()
}

/// Whether this host's KVM is PVM (module kvm_pvm): guest kernel code
/// runs largely in KVM's instruction emulator, a few instructions are not
/// emulated (XRSTOR, POPCNT and CLAC alternatives) and guest user mode
/// cannot make system calls.
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Whether the Linux tests offer KVM's PV send-IPI hypercall: not under
/// PVM, which advertises it but never completes it.
pub fn linux_pv_ipi() -> bool {
    !host_is_pvm()
}

/// The command line the Linux tests boot with: brisk's default, plus,
/// under PVM, the options that keep the kernel off what PVM cannot
/// emulate.
pub fn linux_cmdline(extra: &str) -> String {
    let pvm = if host_is_pvm() {
        " noxsave clearcpuid=popcnt,smap"
    } else {
        ""
    };
    format!("console=ttyS0 reboot=k panic=-1{pvm} {extra}")
        .trim()
        .to_string()
}
