//! `brisk firecracker`: Firecracker's command line. With `--config-file`
//! the microVM boots at once from Firecracker's JSON; otherwise brisk
//! serves Firecracker's API (and its own) on `--api-sock` and boots on
//! `InstanceStart`. The flags Firecracker's jailer and SDKs pass and
//! brisk can honour are taken; the rest are refused by name.

use std::path::{Path, PathBuf};

use brisk_api::firecracker::{model::FullVmConfiguration, Firecracker, PreBoot};
use brisk_vmm::seccomp::Seccomp;
use brisk_vmm::{Output, Vm, VmConfig};

use crate::{signals, status};

#[derive(clap::Args, Debug)]
pub struct FirecrackerArgs {
    /// The API socket (Firecracker's default path).
    #[arg(long, value_name = "PATH", default_value = "/run/firecracker.socket")]
    api_sock: PathBuf,
    /// Firecracker's JSON configuration (`boot-source`, `drives`,
    /// `machine-config`, `network-interfaces`, `logger`, `metrics`): the
    /// microVM boots from it at once.
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Serve no API (needs --config-file).
    #[arg(long, requires = "config_file")]
    no_api: bool,
    /// The microVM's id (`GET /`).
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Accepted and ignored: brisk has no boot-timer device.
    #[arg(long)]
    boot_timer: bool,
    /// Log level: Error, Warning, Info, Debug, Trace or Off.
    #[arg(long, value_name = "LEVEL")]
    level: Option<String>,
    /// Write the log (brisk's stderr) to this file or named pipe.
    #[arg(long, value_name = "PATH")]
    log_path: Option<PathBuf>,
    /// Where `FlushMetrics` would write (recorded; brisk serves its
    /// counters live at /api/v1/vm.counters).
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<PathBuf>,
    /// Accepted (brisk's log lines always carry their level).
    #[arg(long)]
    show_level: bool,
    /// Accepted and ignored (brisk's log lines name their module).
    #[arg(long)]
    show_log_origin: bool,
    /// Install no seccomp filters.
    #[arg(long)]
    no_seccomp: bool,
    /// Refused: brisk's filters are built in (docs/seccomp.md).
    #[arg(long, value_name = "FILE")]
    seccomp_filter: Option<PathBuf>,
    /// Passed by Firecracker's jailer; accepted.
    #[arg(long, value_name = "US")]
    start_time_us: Option<u64>,
    #[arg(long, value_name = "US")]
    start_time_cpu_us: Option<u64>,
    #[arg(long, value_name = "US")]
    parent_cpu_time_us: Option<u64>,
    /// Accepted; brisk's API takes bodies up to 64 KiB.
    #[arg(long, value_name = "BYTES")]
    http_api_max_payload_size: Option<usize>,
    /// Refused: brisk has no MMDS.
    #[arg(long, value_name = "BYTES")]
    mmds_size_limit: Option<usize>,
    /// Refused: brisk's snapshots are described by `brisk ctl`.
    #[arg(long, value_name = "PATH")]
    describe_snapshot: Option<PathBuf>,
}

/// Why a Firecracker config file cannot be used: one sentence naming it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} is over {max} bytes: not a Firecracker configuration", max = MAX_CONFIG)]
    TooBig { path: PathBuf },
    #[error("{path} is not a Firecracker configuration: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: brisk_api::firecracker::FcError,
    },
}

/// The largest config file read (Firecracker's are a few KiB).
const MAX_CONFIG: u64 = 1 << 20;

/// Read Firecracker's JSON config file into what its calls would have
/// configured. Only a regular file (checked before and after the open,
/// which never waits: a FIFO is refused, not waited on), and at most
/// [`MAX_CONFIG`] bytes.
pub fn read_config(path: &Path) -> Result<PreBoot, ConfigFileError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let path_buf = || path.to_path_buf();
    let read = |source| ConfigFileError::Read {
        path: path_buf(),
        source,
    };
    // Checked before the open too: opening a device can have effects.
    let regular = |m: std::fs::Metadata| match m.file_type() {
        t if t.is_file() => Ok(()),
        t => Err(ConfigFileError::NotRegular {
            path: path_buf(),
            kind: if t.is_dir() {
                "a directory"
            } else {
                "a device, FIFO or socket"
            },
        }),
    };
    regular(std::fs::metadata(path).map_err(read)?)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(read)?;
    regular(file.metadata().map_err(read)?)?;
    let mut text = Vec::new();
    file.take(MAX_CONFIG + 1)
        .read_to_end(&mut text)
        .map_err(read)?;
    if text.len() as u64 > MAX_CONFIG {
        return Err(ConfigFileError::TooBig { path: path_buf() });
    }
    let file: FullVmConfiguration =
        serde_json::from_slice(&text).map_err(|source| ConfigFileError::Parse {
            path: path_buf(),
            source,
        })?;
    PreBoot::from_file(file).map_err(|source| ConfigFileError::Invalid {
        path: path_buf(),
        source,
    })
}

/// The VM a Firecracker config file describes (`brisk run --config-file`).
pub fn config_from_file(path: &Path, seccomp: Seccomp) -> Result<VmConfig, ConfigFileError> {
    read_config(path)?
        .vm_config(seccomp)
        .map_err(|source| ConfigFileError::Invalid {
            path: path.to_path_buf(),
            source,
        })
}

/// Send brisk's stderr (its log) to `path`, a file (appended) or a named
/// pipe with a reader.
fn log_to(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    // SAFETY: both fds are open; dup2 replaces fd 2 atomically.
    if unsafe { libc::dup2(f.as_raw_fd(), 2) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn run(args: FirecrackerArgs) -> i32 {
    let refused = [
        (
            "--seccomp-filter",
            args.seccomp_filter.is_some(),
            "brisk's seccomp filters are built in (docs/seccomp.md); --no-seccomp turns them off",
        ),
        (
            "--mmds-size-limit",
            args.mmds_size_limit.is_some(),
            "brisk has no MMDS",
        ),
        (
            "--describe-snapshot",
            args.describe_snapshot.is_some(),
            "brisk does not describe snapshot files",
        ),
    ];
    if let Some((flag, _, why)) = refused.iter().find(|r| r.1) {
        say!("brisk firecracker: {flag} is not supported: {why}");
        return status::USAGE;
    }
    if let Some(path) = &args.log_path {
        if let Err(e) = log_to(path) {
            say!("brisk firecracker: --log-path {}: {e}", path.display());
            return status::CONFIG;
        }
    }
    let seccomp = if args.no_seccomp {
        Seccomp::Off
    } else {
        Seccomp::Trap
    };
    let mut pre = match &args.config_file {
        Some(path) => match read_config(path) {
            Ok(p) => p,
            Err(e) => {
                say!("brisk firecracker: --config-file {e}");
                return status::CONFIG;
            }
        },
        None => PreBoot::default(),
    };
    if let Some(level) = &args.level {
        let logger = brisk_api::firecracker::model::Logger {
            level: Some(level.clone()),
            ..Default::default()
        };
        if let Err(e) = pre.set_logger(logger) {
            say!("brisk firecracker: --level: {e}");
            return status::USAGE;
        }
    }
    if let Some(path) = &args.metrics_path {
        pre.metrics = Some(brisk_api::firecracker::model::Metrics {
            metrics_path: path.display().to_string(),
        });
    }
    let interrupt = match signals::install() {
        Ok(fd) => fd,
        Err(e) => {
            say!("brisk: cannot install signal handlers: {e}");
            return status::INTERNAL;
        }
    };
    let abort = || signals::last() != 0;
    let fc = Firecracker::new(&args.id, pre.clone(), seccomp);
    let (vm, api) = if args.config_file.is_some() {
        let config = match pre.vm_config(seccomp) {
            Ok(c) => c,
            Err(e) => {
                say!("brisk firecracker: {e}");
                return status::CONFIG;
            }
        };
        let vm = match Vm::start_with_abort(&config, Output::Stdout, &abort) {
            Ok(vm) => std::sync::Arc::new(vm),
            Err(e) => {
                say!("brisk: {e}");
                return status::for_start_error(&e, signals::last());
            }
        };
        let api = if args.no_api {
            None
        } else {
            let api = brisk_api::Api::new(vm.clone()).with_firecracker(fc);
            match brisk_api::ApiServer::serve(&args.api_sock, api, seccomp) {
                Ok(server) => Some(server),
                Err(e) => {
                    say!("brisk: {e}");
                    vm.request_shutdown();
                    return crate::cli::finish(vm, None, status::CONFIG);
                }
            }
        };
        (vm, api)
    } else {
        let opts = brisk_vmm::RestoreOptions {
            paused: false,
            seccomp,
            max_memory: None,
            trust_disk_paths: false,
        };
        let api = |slot| brisk_api::Api::with_slot(slot).with_firecracker(fc);
        let what = "InstanceStart (or /snapshot/load)";
        match crate::cli::wait_for_vm(&args.api_sock, opts, &abort, api, what) {
            Ok(both) => both,
            Err(code) => return code,
        }
    };
    crate::cli::supervise(vm, api, seccomp, None, interrupt, "running")
}
