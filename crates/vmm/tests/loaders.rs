//! The bounded kernel and initrd loaders through [`Vm::start`]: a real C
//! kernel (crates/test-kernels) gets an initrd of several copy chunks, and
//! files that are not regular are refused without blocking.

use brisk_vmm::require_kvm;

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use brisk_test_kernels as k;
use brisk_vmm::{Capture, Irqchip, KernelConfig, Output, StartError, Vm, VmConfig, VmEnd};

fn config(kernel: PathBuf, initrd: Option<PathBuf>) -> VmConfig {
    VmConfig {
        cpus: 1,
        irqchip: Irqchip::Kernel,
        payload: brisk_vmm::Payload::Kernel(KernelConfig {
            path: kernel,
            cmdline: "status=5".into(),
            initrd,
        }),
        ..VmConfig::default()
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("brisk-loaders-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn an_initrd_of_several_chunks_reaches_the_kernel_whole() {
    require_kvm!();
    let dir = scratch("chunks");
    let initrd = dir.join("initrd");
    let mut bytes = b"BRISK-INITRD\n".to_vec();
    bytes.resize((3 << 20) + 17, b'x');
    std::fs::write(&initrd, &bytes).unwrap();
    let capture = Capture::default();
    let vm = Vm::start(
        &config(k::HELLO.into(), Some(initrd)),
        Output::Capture(capture.clone()),
    )
    .expect("kernel boots");
    let end = vm.wait(Some(Duration::from_secs(30)), None);
    vm.shutdown().unwrap();
    let out = capture.text();
    assert_eq!(end, VmEnd::DebugExit(5), "{out}");
    assert!(
        out.contains(&format!("initrd {} bytes at 0x", bytes.len())),
        "{out}"
    );
    assert!(out.contains(": BRISK-INITRD\n"), "{out}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `Vm::start` on another thread, bounded: a FIFO used to block open(2).
fn start_bounded(config: VmConfig) -> Result<Vm, StartError> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(Vm::start(&config, Output::Null));
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("Vm::start ended within 30 s")
}

#[test]
fn fifos_are_refused_by_vm_start_without_blocking() {
    require_kvm!();
    let dir = scratch("fifo");
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (kernel, initrd, what) in [
        (fifo.clone(), None, "kernel"),
        (k::HELLO.into(), Some(fifo.clone()), "initrd"),
    ] {
        match start_bounded(config(kernel, initrd)) {
            Err(StartError::Kernel(e)) => assert_eq!(
                e.to_string(),
                format!("{what} {} is a FIFO, not a regular file", fifo.display())
            ),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a FIFO was booted"),
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}
