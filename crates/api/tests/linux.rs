//! Linux booting from an initramfs (a PVH vmlinux, 1 vCPU) while a client
//! pauses and resumes it through the API as fast as the API answers: the
//! kernel still reaches its init, and every pause and resume is answered
//! 204 until the VM ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use brisk_api::client::request;
use brisk_api::ApiServer;
use brisk_test_kernels::{guest_linux, host_is_pvm, linux_cmdline, LINUX_USERSPACE_MARKER};
use brisk_vmm::{require_kvm, Capture, Irqchip, KernelConfig, Output, Vm, VmConfig, VmEnd};

#[test]
fn linux_boots_to_init_through_a_pause_resume_storm() {
    require_kvm!();
    let linux = guest_linux().expect("scripts/guest-kernel.sh builds the guest kernel");
    let config = VmConfig {
        cpus: 1,
        memory: 256 << 20,
        irqchip: Irqchip::Kernel,
        payload: brisk_vmm::Payload::Kernel(KernelConfig {
            path: linux.vmlinux.clone(),
            cmdline: linux_cmdline(""),
            initrd: Some(linux.initramfs.clone()),
        }),
        pv_ipi: brisk_test_kernels::linux_pv_ipi(),
        ..VmConfig::default()
    };
    let capture = Capture::default();
    let vm = Arc::new(Vm::start(&config, Output::Capture(capture.clone())).unwrap());
    let path = std::env::temp_dir().join(format!("brisk-api-linux-{}.sock", std::process::id()));
    let server = ApiServer::start(&path, vm.clone()).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let storm = {
        let (done, path) = (done.clone(), path.clone());
        std::thread::spawn(move || {
            let mut cycles = 0u64;
            while !done.load(Ordering::Acquire) {
                let p = request(&path, "PUT", "/api/v1/vm.pause", None, None).unwrap();
                let r = request(&path, "PUT", "/api/v1/vm.resume", None, None).unwrap();
                // The guest may end (its panic, its power-off) before the
                // main thread's wait returns and sets `done`: a VM that has
                // shut down ends the storm; a live one must answer 204.
                let ended = |b: &str| b.contains("the VM has shut down");
                if done.load(Ordering::Acquire) || ended(&p.body) || ended(&r.body) {
                    break;
                }
                assert_eq!((p.status, r.status), (204, 204), "{} {}", p.body, r.body);
                cycles += 1;
                // Let the guest run between storms a little, so that the
                // boot advances; the pauses land all through it.
                std::thread::sleep(Duration::from_millis(5));
            }
            cycles
        })
    };
    let end = vm.wait(Some(Duration::from_secs(900)), None);
    done.store(true, Ordering::Release);
    let cycles = storm.join().unwrap();
    drop(server);
    Arc::try_unwrap(vm)
        .ok()
        .expect("the API released the VM")
        .shutdown()
        .unwrap();
    let out = capture.text();
    assert!(cycles > 100, "only {cycles} pause/resume cycles ran");
    assert!(out.contains("Run /init as init process"), "{out}");
    if host_is_pvm() {
        let faulted = end == VmEnd::Panicked && out.contains("Attempted to kill init");
        let ran = end == VmEnd::PowerOff && out.contains(LINUX_USERSPACE_MARKER);
        assert!(faulted || ran, "{end:?}:\n{out}");
    } else {
        assert_eq!(end, VmEnd::PowerOff, "{out}");
        assert!(out.contains(LINUX_USERSPACE_MARKER), "{out}");
    }
    assert!(!path.exists());
}
