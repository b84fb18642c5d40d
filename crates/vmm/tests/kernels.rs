//! Multiboot test kernels (crates/test-kernels, C built with gcc) booted
//! on 1, 2 and 4 vCPUs with KVM's irqchip and with brisk's own (the LAPIC,
//! IOAPIC and PIT models of `brisk_devices::apic`): their serial output
//! and debug-exit status say what they checked.

mod common;

use brisk_vmm::require_kvm;

use std::path::PathBuf;
use std::time::Duration;

use brisk_test_kernels as k;
use brisk_vmm::{Capture, Irqchip, KernelConfig, Output, StartError, Vm, VmConfig, VmEnd};
use common::{save_and_restore, type_in, wait_for_line};

fn config(kernel: &str, cpus: usize, cmdline: &str, initrd: Option<PathBuf>) -> VmConfig {
    VmConfig {
        cpus,
        irqchip: Irqchip::Kernel,
        payload: brisk_vmm::Payload::Kernel(KernelConfig {
            path: kernel.into(),
            cmdline: cmdline.into(),
            initrd,
        }),
        ..VmConfig::default()
    }
}

fn boot(config: &VmConfig) -> (VmEnd, String) {
    let (end, out, _) = boot_counting_halts(config);
    (end, out)
}

/// As [`boot`], with each vCPU's HLT exits (halts in user space).
fn boot_counting_halts(config: &VmConfig) -> (VmEnd, String, Vec<u64>) {
    let capture = Capture::default();
    let vm = Vm::start(config, Output::Capture(capture.clone())).expect("kernel boots");
    let end = vm.wait(Some(Duration::from_secs(60)), None);
    let halts = vm
        .vcpus()
        .iter()
        .map(|v| {
            v.counters()
                .snapshot()
                .exits_of(brisk_control::ExitKind::Halt)
        })
        .collect();
    vm.shutdown().unwrap();
    (end, capture.text(), halts)
}

const IRQCHIPS: [Irqchip; 2] = [Irqchip::Kernel, Irqchip::User];

fn on(irqchip: Irqchip, c: VmConfig) -> VmConfig {
    VmConfig { irqchip, ..c }
}

const PASS: VmEnd = VmEnd::DebugExit(k::PASS as u32);

#[test]
fn hello_sees_the_multiboot_handover_and_exits_with_the_chosen_status() {
    require_kvm!();
    let initrd = std::env::temp_dir().join(format!("brisk-initrd-{}", std::process::id()));
    std::fs::write(&initrd, "BRISK-INITRD\nrest").unwrap();
    for cpus in [1, 2, 4] {
        let c = config(k::HELLO, cpus, "status=42 quiet", Some(initrd.clone()));
        let (end, out) = boot(&c);
        assert_eq!(end, VmEnd::DebugExit(42), "{out}");
        assert!(out.contains("multiboot magic 0x2badb002 ok"), "{out}");
        assert!(out.contains("639 KiB low, 64512 KiB high"), "{out}");
        // argv[0] first, as GRUB and QEMU hand it over.
        let expect = format!("cmdline '{} status=42 quiet'", k::HELLO);
        assert!(out.contains(&expect), "{out}");
        assert!(out.contains("initrd 17 bytes at 0x"), "{out}");
        assert!(out.contains(": BRISK-INITRD\n"), "{out}");
    }
    std::fs::remove_file(initrd).unwrap();
}

/// Under brisk's irqchip the INIT and SIPIs are brisk's: each AP starts
/// in real mode at the vector on its own thread, and its final `cli; hlt`
/// is a halt in user space.
#[test]
fn smp_finds_every_cpu_in_fw_cfg_and_the_madt_and_starts_the_aps() {
    require_kvm!();
    for (irqchip, cpus) in IRQCHIPS.into_iter().flat_map(|i| [1, 2, 4].map(|c| (i, c))) {
        let (end, out, halts) = boot_counting_halts(&on(irqchip, config(k::SMP, cpus, "", None)));
        assert_eq!(end, PASS, "{irqchip:?}, {cpus} vCPUs: {out}");
        if irqchip == Irqchip::User {
            assert!(halts[1..].iter().all(|&h| h >= 1), "{halts:?}");
        }
        assert!(
            out.contains(&format!("signature 'QEMU', {cpus} CPUs")),
            "{out}"
        );
        let ids: Vec<String> = (0..cpus).map(|i| i.to_string()).collect();
        assert!(
            out.contains(&format!("LAPIC ids: {},", ids.join(" "))),
            "{out}"
        );
        for ap in 1..cpus {
            assert!(
                out.contains(&format!("AP with APIC id {ap} is up")),
                "{out}"
            );
        }
        assert!(
            out.contains(&format!("{} of {} APs started", cpus - 1, cpus - 1)),
            "{out}"
        );
    }
}

/// Boot `kernel` on 1, 2 and 4 vCPUs under each irqchip: it passes and
/// prints every line of `says`.
fn passes_on_1_2_4(kernel: &str, says: &[&str]) {
    for (irqchip, cpus) in IRQCHIPS.into_iter().flat_map(|i| [1, 2, 4].map(|c| (i, c))) {
        let (end, out) = boot(&on(irqchip, config(kernel, cpus, "", None)));
        assert_eq!(end, PASS, "{irqchip:?}, {cpus} vCPUs: {out}");
        for s in says {
            assert!(out.contains(s), "{cpus} vCPUs, no '{s}' in: {out}");
        }
    }
}

#[test]
fn the_pm_timer_runs_at_3_579545_mhz_against_the_pit() {
    require_kvm!();
    passes_on_1_2_4(
        k::PMTIMER,
        &["PM timer block at 0x00000608", "within 5% of 3579545 Hz"],
    );
}

#[test]
fn inl_from_an_unassigned_port_reads_all_ones_and_is_timed() {
    require_kvm!();
    passes_on_1_2_4(k::INL, &["reads 0xffffffff", " cycles per inl ("]);
}

#[test]
fn files_that_are_not_multiboot_kernels_are_refused_by_name() {
    require_kvm!();
    let dir = std::env::temp_dir();
    let text = dir.join(format!("brisk-not-a-kernel-{}", std::process::id()));
    std::fs::write(&text, "just some text\n").unwrap();
    let mut bad_sum = std::fs::read(k::HELLO).unwrap();
    let at = (0..8192)
        .step_by(4)
        .find(|&i| bad_sum[i..i + 4] == 0x1bad_b002u32.to_le_bytes())
        .unwrap();
    bad_sum[at + 8] ^= 1;
    let corrupt = dir.join(format!("brisk-bad-checksum-{}", std::process::id()));
    std::fs::write(&corrupt, &bad_sum).unwrap();
    let truncated = dir.join(format!("brisk-truncated-{}", std::process::id()));
    std::fs::write(&truncated, &std::fs::read(k::HELLO).unwrap()[..0x1100]).unwrap();
    let missing = dir.join("brisk-no-such-kernel");
    for (path, says) in [
        (
            &text,
            "is not a Linux bzImage, a 64-bit ELF vmlinux or a multiboot kernel",
        ),
        (&corrupt, "bad checksum"),
        (&truncated, "truncated"),
        (&missing, "cannot read kernel"),
    ] {
        let c = config(path.to_str().unwrap(), 1, "", None);
        match Vm::start(&c, Output::Null) {
            Err(StartError::Kernel(e)) => {
                let e = e.to_string();
                assert!(e.contains(says), "{path:?}: {e}");
                assert!(e.contains(path.to_str().unwrap()), "names the file: {e}");
                assert_eq!(e.lines().count(), 1, "{e}");
            }
            Err(e) => panic!("{path:?}: wrong error {e}"),
            Ok(_) => panic!("{path:?} was booted"),
        }
    }
    for f in [text, corrupt, truncated] {
        std::fs::remove_file(f).unwrap();
    }
}

/// The UART's IRQ 4 reaches a kernel through the IOAPIC (KVM's, by an
/// irqfd on GSI 4; or brisk's): first its transmit-empty interrupt, then
/// received data typed at the console once the kernel says it is ready.
#[test]
fn the_uart_interrupt_reaches_the_kernel_through_the_ioapic() {
    require_kvm!();
    for (irqchip, cpus) in IRQCHIPS.into_iter().flat_map(|i| [1, 2].map(|c| (i, c))) {
        let capture = Capture::default();
        let vm = Vm::start(
            &on(irqchip, config(k::UARTIRQ, cpus, "", None)),
            Output::Capture(capture.clone()),
        )
        .expect("kernel boots");
        let ready = std::time::Instant::now() + Duration::from_secs(60);
        while !capture.text().contains("ready for input") {
            assert!(vm.ended().is_none(), "{:?}: {}", vm.ended(), capture.text());
            assert!(std::time::Instant::now() < ready, "{}", capture.text());
            std::thread::sleep(Duration::from_millis(5));
        }
        type_in(&vm, b"ping");
        let end = vm.wait(Some(Duration::from_secs(60)), None);
        vm.shutdown().unwrap();
        let out = capture.text();
        assert_eq!(end, PASS, "{out}");
        assert!(
            out.contains("transmit-empty interrupt as vector 0x24 via IOAPIC pin 4"),
            "{out}"
        );
        assert!(out.contains("got 'ping'"), "{out}");
    }
}

/// RAM beyond 3 GiB is split around the 32-bit hole: a multiboot kernel
/// is told 3 GiB - 1 MiB of upper memory (the rest is above 4 GiB, in its
/// memory map).
#[test]
fn sixteen_gib_split_around_the_32_bit_hole() {
    require_kvm!();
    let mut c = config(k::HELLO, 1, "status=0", None);
    c.memory = 16 << 30;
    let (end, out) = boot(&c);
    assert_eq!(end, VmEnd::DebugExit(0), "{out}");
    assert!(out.contains("639 KiB low, 3144704 KiB high"), "{out}");
}

/// An IPI storm on 4 vCPUs through the x2APIC (KVM's, or brisk's by MSR
/// exits), saved and restored four times while it runs and paused and
/// resumed in between (at each, the kernel holds one pair until the host
/// types a byte, so the storm cannot end first): no IPI is lost (a lost one stops its ping-pong
/// pair, and the kernel would never finish), none is doubled (the kernel
/// checks every count), and the restored LAPICs go on where they were.
/// Under brisk's irqchip also M:N, the 4 vCPUs on 2 pool threads: each
/// IPI wakes a vCPU that holds no thread, and the restored VM is pooled.
#[test]
fn an_ipi_storm_loses_nothing_across_pauses_and_snapshots() {
    require_kvm!();
    let runs = [
        (Irqchip::Kernel, None),
        (Irqchip::User, None),
        (Irqchip::User, Some(2)),
    ];
    for (irqchip, vcpu_threads) in runs {
        let c = VmConfig {
            vcpu_threads,
            ..on(irqchip, config(k::IPISTORM, 4, "hold", None))
        };
        let dir = std::env::temp_dir().join(format!(
            "brisk-ipistorm-{irqchip:?}-{vcpu_threads:?}-{}",
            std::process::id()
        ));
        let mut capture = Capture::default();
        let mut vm = Vm::start(&c, Output::Capture(capture.clone())).expect("kernel boots");
        let mut out = String::new();
        for trips in [400, 800, 1200, 1600] {
            let line = format!("ipistorm: {trips} round trips with CPU 1");
            wait_for_line(&vm, &capture, &line, Duration::from_secs(120), &out);
            let bound = brisk_vmm::control::Deadline::after(Duration::from_secs(10));
            vm.pause(bound).unwrap();
            vm.resume().unwrap();
            (vm, capture) = save_and_restore(vm, &capture, &dir, &mut out);
            type_in(&vm, b"g");
        }
        assert_eq!(vm.vcpu_thread_count(), vcpu_threads.map_or(4, |n| n + 1));
        let end = vm.wait(Some(Duration::from_secs(120)), None);
        vm.shutdown().unwrap();
        out.push_str(&capture.text());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(end, PASS, "{irqchip:?} {vcpu_threads:?}: {out}");
        assert!(out.contains("24000 round trips on 4 CPUs"), "{out}");
    }
}
