//! virtio-blk over virtio-mmio, driven by the `virtioblk` test kernel
//! (C, polling the virtqueue): what it writes lands in the image file,
//! reads come back from it, a read-only disk refuses writes, and a bad
//! disk file is refused before the VM starts.

use std::path::PathBuf;
use std::time::Duration;

use brisk_test_kernels as k;
use brisk_vmm::{
    require_kvm, Capture, DiskConfig, Irqchip, KernelConfig, Output, StartError, Vm, VmConfig,
    VmEnd,
};

fn image(name: &str, bytes: usize) -> PathBuf {
    let p = std::env::temp_dir().join(format!("brisk-disk-{name}-{}", std::process::id()));
    std::fs::write(&p, vec![0xeeu8; bytes]).unwrap();
    p
}

fn config(disk: &std::path::Path, readonly: bool) -> VmConfig {
    VmConfig {
        cpus: 1,
        irqchip: Irqchip::Kernel,
        payload: brisk_vmm::Payload::Kernel(KernelConfig {
            path: k::VIRTIOBLK.into(),
            ..KernelConfig::default()
        }),
        disks: vec![DiskConfig {
            path: disk.into(),
            readonly,
            ..Default::default()
        }],
        ..VmConfig::default()
    }
}

fn boot(config: &VmConfig) -> (VmEnd, String) {
    let capture = Capture::default();
    let vm = Vm::start(config, Output::Capture(capture.clone())).expect("kernel boots");
    let end = vm.wait(Some(Duration::from_secs(60)), None);
    vm.shutdown().unwrap();
    (end, capture.text())
}

#[test]
fn a_pattern_written_through_virtio_blk_is_in_the_image_file() {
    require_kvm!();
    let disk = image("rw", 1 << 20);
    let (end, out) = boot(&config(&disk, false));
    assert_eq!(end, VmEnd::DebugExit(k::PASS as u32), "{out}");
    assert!(out.contains("capacity 2048 sectors"), "{out}");
    assert!(
        out.contains("wrote, flushed and read back 32768 bytes"),
        "{out}"
    );
    assert!(out.contains("a read past the end answers 1"), "{out}");
    assert!(out.contains("id 'brisk-disk0'"), "{out}");
    let bytes = std::fs::read(&disk).unwrap();
    for s in 0..k::VIRTIOBLK_SECTORS {
        for i in 0..512 {
            let at = (s * 512 + i) as usize;
            assert_eq!(bytes[at], k::virtioblk_pattern(s, i), "sector {s} byte {i}");
        }
    }
    // Past the pattern, the file is untouched.
    let rest = (k::VIRTIOBLK_SECTORS * 512) as usize;
    assert!(bytes[rest..].iter().all(|&b| b == 0xee));
    std::fs::remove_file(disk).unwrap();
}

#[test]
fn a_readonly_disk_refuses_writes_and_keeps_its_bytes() {
    require_kvm!();
    let disk = image("ro", 1 << 20);
    let (end, out) = boot(&config(&disk, true));
    assert_eq!(end, VmEnd::DebugExit(4), "{out}");
    assert!(out.contains("a write failed"), "{out}");
    assert!(std::fs::read(&disk).unwrap().iter().all(|&b| b == 0xee));
    std::fs::remove_file(disk).unwrap();
}

#[test]
fn a_disk_that_is_not_a_regular_image_is_refused_in_one_sentence() {
    require_kvm!();
    let tiny = image("tiny", 100);
    let cases = [
        (
            PathBuf::from("/nonexistent/disk.img"),
            "cannot open disk /nonexistent/disk.img",
        ),
        (std::env::temp_dir(), "is a directory"),
        (PathBuf::from("/dev/null"), "is a device"),
        (tiny.clone(), "less than one 512-byte sector"),
    ];
    for (path, says) in cases {
        let err = Vm::start(&config(&path, false), Output::Null)
            .err()
            .expect("refused");
        assert!(matches!(err, StartError::Disk(_)), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(says), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }
    std::fs::remove_file(tiny).unwrap();
}

#[test]
fn disks_are_for_kernels_only() {
    let c = VmConfig {
        disks: vec!["x.img".parse().unwrap()],
        ..VmConfig::default()
    };
    assert_eq!(c.validate(), Err(brisk_vmm::ConfigError::DiskNeedsKernel));
    assert_eq!(
        "a.img,readonly".parse::<DiskConfig>().unwrap(),
        DiskConfig {
            path: "a.img".into(),
            readonly: true,
            ..Default::default()
        }
    );
    assert!("a.img,fast"
        .parse::<DiskConfig>()
        .unwrap_err()
        .contains("readonly"));
    // A comma in a file name is written twice (as QEMU's options).
    assert_eq!(
        "a,,b.img,readonly".parse::<DiskConfig>().unwrap(),
        DiskConfig {
            path: "a,b.img".into(),
            readonly: true,
            ..Default::default()
        }
    );
    assert_eq!(
        "/x,,y/a,,b.img".parse::<DiskConfig>().unwrap().path,
        std::path::PathBuf::from("/x,y/a,b.img")
    );
}

/// L4 (round 3): disk images are locked as QEMU locks them: one writer
/// and no readers beside it, or any number of read-only users. The same
/// image twice read-write, in one VM or in two, is refused in one
/// sentence; read-only beside read-only is fine.
#[test]
fn a_disk_image_has_one_writer() {
    require_kvm!();
    let disk = image("locked", 4096);
    let twice = |a: bool, b: bool| VmConfig {
        disks: vec![
            DiskConfig {
                path: disk.clone(),
                readonly: a,
                ..Default::default()
            },
            DiskConfig {
                path: disk.clone(),
                readonly: b,
                ..Default::default()
            },
        ],
        ..config(&disk, false)
    };
    for (a, b) in [(false, false), (false, true), (true, false)] {
        let err = Vm::start(&twice(a, b), Output::Null)
            .err()
            .expect("refused");
        let text = err.to_string();
        assert!(text.contains("is in use"), "{a} {b}: {text}");
        assert!(!text.contains('\n'), "{text}");
    }
    // A second VM while the first holds it read-write.
    let first = Vm::start(&config(&disk, false), Output::Null).expect("starts");
    let err = Vm::start(&config(&disk, false), Output::Null)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("is in use"), "{err}");
    first.shutdown().unwrap();
    // Readers share.
    let readers = Vm::start(&twice(true, true), Output::Null).expect("two readers");
    readers.shutdown().unwrap();
    std::fs::remove_file(disk).unwrap();
}

/// Firecracker's `PATCH /drives`: a running VM's disk served from another
/// file. The new image is locked before the old one is let go; one in use
/// elsewhere, or not an image, is refused with nothing changed; the
/// configuration a snapshot would save names the new file.
#[test]
fn a_running_vms_disk_is_swapped_and_its_lock_follows() {
    require_kvm!();
    let (a, b) = (image("swap-a", 4096), image("swap-b", 8192));
    // The UART kernel waits for input for ever: a VM that stays up.
    let c = VmConfig {
        payload: brisk_vmm::Payload::Kernel(KernelConfig {
            path: k::UARTIRQ.into(),
            ..KernelConfig::default()
        }),
        ..config(&a, false)
    };
    let vm = Vm::start(&c, Output::Null).expect("starts");
    // b held by another VM: refused, a still served.
    let other = Vm::start(&config(&b, false), Output::Null).expect("holds b");
    let e = vm.replace_disk(0, &b).unwrap_err();
    assert!(e.to_string().contains("is in use"), "{e}");
    assert_eq!(vm.config().disks[0].path, a);
    other.shutdown().unwrap();
    let dir = std::env::temp_dir();
    let e = vm.replace_disk(0, &dir).unwrap_err();
    assert!(e.to_string().contains("is a directory"), "{e}");
    assert!(vm.replace_disk(1, &b).is_err(), "no disk 1");
    vm.replace_disk(0, &b).expect("swapped");
    assert_eq!(vm.config().disks[0].path, b);
    // a is free now, b is taken.
    let on_a = Vm::start(&config(&a, false), Output::Null).expect("a was let go");
    on_a.shutdown().unwrap();
    let e = Vm::start(&config(&b, false), Output::Null)
        .err()
        .expect("b is held");
    assert!(e.to_string().contains("is in use"), "{e}");
    vm.limit_disk(0, Some(brisk_vmm::Limit::per_second(1 << 20)), None)
        .unwrap();
    let bw = brisk_vmm::Limit::per_second(1 << 20);
    assert_eq!(vm.config().disks[0].bw, Some(bw));
    vm.shutdown().unwrap();
    std::fs::remove_file(a).unwrap();
    std::fs::remove_file(b).unwrap();
}
