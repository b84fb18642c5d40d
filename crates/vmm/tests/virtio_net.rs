//! virtio-net on a TAP device, driven by the `virtionet` test kernel (C,
//! polling its queues) against a TAP this test makes: the guest's frames
//! reach the host, the host's frames reach the guest and come back, the
//! MAC and the link are in configuration space, the offloads the guest
//! accepts are set on the TAP, and a guest flooding its transmit queue
//! with good and bad chains holds no vCPU: the VM pauses and resumes on
//! time while the flood goes on, and the engine is what serves it.
//! Each test skips, loudly, without KVM or without a TAP.

use std::time::Duration;

use brisk_test_kernels::host_net::{frame, HostTap, PacketSocket};
use brisk_test_kernels::{self as k, require_tap};
use brisk_vmm::control::Deadline;
use brisk_vmm::{
    require_kvm, Capture, Irqchip, KernelConfig, Mac, NetConfig, Output, StartError, Vm, VmConfig,
    VmEnd,
};

const GUEST_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// Hang protection only: every wait ends as soon as what it waits for
/// happens.
const BOUND: Duration = Duration::from_secs(120);

fn config(tap: &str, cmdline: &str) -> VmConfig {
    VmConfig {
        cpus: 1,
        irqchip: Irqchip::Kernel,
        payload: brisk_vmm::Payload::Kernel(KernelConfig {
            path: k::VIRTIONET.into(),
            cmdline: cmdline.into(),
            ..KernelConfig::default()
        }),
        nets: vec![NetConfig {
            tap: tap.into(),
            mac: Some(Mac(GUEST_MAC)),
            ..Default::default()
        }],
        ..VmConfig::default()
    }
}

fn finish(vm: Vm, capture: &Capture) -> (VmEnd, String) {
    let end = vm.wait(Some(BOUND), None);
    vm.shutdown().unwrap();
    (end, capture.text())
}

#[test]
fn a_burst_from_the_guest_arrives_whole_and_in_order_on_the_tap() {
    require_kvm!();
    require_tap!();
    let tap = HostTap::create("bur", None).unwrap();
    let sock = PacketSocket::bind(tap.ifindex()).unwrap();
    let capture = Capture::default();
    let vm = Vm::start(
        &config(&tap.name, "burst=300"),
        Output::Capture(capture.clone()),
    )
    .unwrap();
    let (end, out) = finish(vm, &capture);
    assert_eq!(end, VmEnd::DebugExit(k::PASS as u32), "{out}");
    assert!(out.contains("mac 06:00:ac:10:00:02 link up"), "{out}");
    assert!(out.contains("sent 300 frames"), "{out}");
    let mut buf = vec![0u8; 2048];
    let mut seq = 0u32;
    while seq < 300 {
        let n = sock
            .recv_from_guest(&mut buf, BOUND)
            .unwrap()
            .unwrap_or_else(|| panic!("only {seq} of 300 frames arrived"));
        let f = &buf[..n];
        if u16::from_be_bytes([f[12], f[13]]) != k::VIRTIONET_ETHERTYPE {
            continue;
        }
        assert_eq!(
            n, 60,
            "frame {seq}: the virtio-net header is not on the wire"
        );
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &GUEST_MAC, "the sender is the configured MAC");
        assert_eq!(u32::from_be_bytes(f[14..18].try_into().unwrap()), seq);
        assert!((18..60).all(|i| f[i] == i as u8), "frame {seq} payload");
        seq += 1;
    }
}

#[test]
fn frames_from_the_host_reach_the_guest_and_come_back() {
    require_kvm!();
    require_tap!();
    let tap = HostTap::create("ech", None).unwrap();
    let sock = PacketSocket::bind(tap.ifindex()).unwrap();
    let capture = Capture::default();
    let vm = Vm::start(
        &config(&tap.name, "echo=20"),
        Output::Capture(capture.clone()),
    )
    .unwrap();
    // Sent as soon as the VM runs: the TAP holds them until the guest has
    // receive buffers.
    let sizes: Vec<usize> = (0..20).map(|i| 46 + i * 71).collect();
    for (i, &len) in sizes.iter().enumerate() {
        let payload: Vec<u8> = (0..len).map(|b| (b + i) as u8).collect();
        sock.send(&frame(
            GUEST_MAC,
            HOST_MAC,
            k::VIRTIONET_ETHERTYPE,
            &payload,
        ))
        .unwrap();
    }
    let mut buf = vec![0u8; 4096];
    let mut back = 0;
    while back < sizes.len() {
        let n = sock
            .recv_from_guest(&mut buf, BOUND)
            .unwrap()
            .unwrap_or_else(|| panic!("only {back} of 20 frames came back: {}", capture.text()));
        let f = &buf[..n];
        if u16::from_be_bytes([f[12], f[13]]) != k::VIRTIONET_ETHERTYPE {
            continue;
        }
        assert_eq!(&f[0..6], &HOST_MAC, "sent back to its sender");
        assert_eq!(&f[6..12], &GUEST_MAC);
        let want: Vec<u8> = (0..sizes[back]).map(|b| (b + back) as u8).collect();
        assert_eq!(&f[14..], &want[..], "frame {back} came back changed");
        back += 1;
    }
    let (end, out) = finish(vm, &capture);
    assert_eq!(end, VmEnd::DebugExit(k::PASS as u32), "{out}");
    assert!(out.contains("echoed 20 frames"), "{out}");
    // The first frame came through the TAP's header untouched: no
    // offload, one buffer.
    assert!(
        out.contains("first frame: hdr flags 0 gso 0 buffers 1"),
        "{out}"
    );
}

/// The offloads the driver accepts are set on the TAP: with GUEST_CSUM, a
/// UDP datagram the host sends reaches the guest with its checksum left
/// to finish (VIRTIO_NET_HDR_F_NEEDS_CSUM); without, complete.
#[test]
fn the_checksum_offload_the_guest_accepts_is_set_on_the_tap() {
    require_kvm!();
    require_tap!();
    for (offload, flags) in [(true, 1), (false, 0)] {
        let tap = HostTap::create("off", Some("10.213.7.1/24")).unwrap();
        tap.neighbour("10.213.7.2", "06:00:ac:10:00:02").unwrap();
        let cmdline = if offload { "offload echo=1" } else { "echo=1" };
        let capture = Capture::default();
        let vm = Vm::start(
            &config(&tap.name, cmdline),
            Output::Capture(capture.clone()),
        )
        .unwrap();
        // The offloads are set when the driver sets DRIVER_OK: send once
        // the guest says it has.
        let ready = Deadline::after(BOUND);
        while !capture.text().contains("accepted") && !ready.passed() {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Sent again until the guest has it: the host's stack queues it
        // through the TAP's queueing discipline, which drops frames until
        // the kernel's link watcher has seen brisk's attach (later under
        // load).
        let udp = std::net::UdpSocket::bind("10.213.7.1:0").unwrap();
        let got = Deadline::after(BOUND);
        while !capture.text().contains("first frame") && !got.passed() && vm.ended().is_none() {
            udp.send_to(&[0x5a; 200], "10.213.7.2:7777").unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        let (end, out) = finish(vm, &capture);
        assert_eq!(end, VmEnd::DebugExit(k::PASS as u32), "{out}");
        assert!(
            out.contains(&format!("first frame: hdr flags {flags} ")),
            "offload {offload}: {out}"
        );
    }
}

#[test]
fn a_missing_tap_is_one_sentence_naming_it() {
    require_kvm!();
    let e = Vm::start(&config("bk-absent0", ""), Output::Null)
        .err()
        .unwrap();
    assert!(matches!(e, StartError::Tap(_)), "{e}");
    let text = e.to_string();
    assert!(text.contains("no network interface bk-absent0"), "{text}");
    assert!(!text.contains('\n'));
}

/// A guest that floods its transmit queue without end, three chains in
/// four bad (outside its memory, 2 GiB long, a descriptor that is its own
/// next): the vCPU never serves the queue (it goes straight back to the
/// guest), so pausing the VM completes on time, again and again, while
/// the engine keeps serving; good frames still reach the TAP, bad ones
/// never do (a loop is cut at the queue's size: what it names is sent,
/// bounded).
#[test]
fn a_guest_flooding_its_queue_holds_no_vcpu() {
    require_kvm!();
    require_tap!();
    let tap = HostTap::create("fld", None).unwrap();
    let sock = PacketSocket::bind(tap.ifindex()).unwrap();
    let capture = Capture::default();
    let vm = Vm::start(
        &config(&tap.name, "flood"),
        Output::Capture(capture.clone()),
    )
    .unwrap();
    let mut buf = vec![0u8; 2048];
    let mut seen = 0;
    while seen < 50 {
        let n = sock
            .recv_from_guest(&mut buf, BOUND)
            .unwrap()
            .unwrap_or_else(|| panic!("the flood's good frames stopped: {}", capture.text()));
        if u16::from_be_bytes([buf[12], buf[13]]) == k::VIRTIONET_ETHERTYPE {
            let seq = u32::from_be_bytes(buf[14..18].try_into().unwrap());
            match seq % 4 {
                0 => {
                    assert_eq!(n, 60);
                    seen += 1;
                }
                3 => assert!(n <= 16 * 72, "a looping chain sent {n} bytes"),
                _ => panic!("frame {seq} (a chain outside guest memory) reached the TAP"),
            }
        }
    }
    for _ in 0..5 {
        let served = vm.io_serves().unwrap();
        vm.pause(Deadline::after(Duration::from_secs(10)))
            .expect("a flooded queue does not hold the vCPU");
        vm.resume().unwrap();
        let more = Deadline::after(BOUND);
        while vm.io_serves().unwrap() == served && !more.passed() {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            vm.io_serves().unwrap() > served,
            "the engine serves the queue again"
        );
    }
    assert_eq!(vm.ended(), None, "{}", capture.text());
    vm.shutdown().unwrap();
}

/// A transmit queue throttled to 20 frames a second (a bucket of 2): a
/// burst of 12 still arrives whole, the queue served again by the
/// engine's timer when tokens are there, not by spinning on it (a spin
/// would call the device thousands of times).
#[test]
fn a_throttled_queue_is_served_again_by_a_timer_not_a_spin() {
    require_kvm!();
    require_tap!();
    let tap = HostTap::create("thr", None).unwrap();
    let sock = PacketSocket::bind(tap.ifindex()).unwrap();
    let mut c = config(&tap.name, "burst=12");
    c.nets[0].tx_ops = Some(brisk_vmm::Limit::per_second(20));
    let capture = Capture::default();
    let vm = Vm::start(&c, Output::Capture(capture.clone())).unwrap();
    let mut buf = vec![0u8; 2048];
    let mut seen = 0;
    while seen < 12 {
        let n = sock.recv_from_guest(&mut buf, BOUND).unwrap();
        assert!(n.is_some(), "only {seen} of 12 frames: {}", capture.text());
        if u16::from_be_bytes([buf[12], buf[13]]) == k::VIRTIONET_ETHERTYPE {
            seen += 1;
        }
    }
    let serves = vm.io_serves().unwrap();
    let (end, out) = finish(vm, &capture);
    assert_eq!(end, VmEnd::DebugExit(k::PASS as u32), "{out}");
    assert!(serves < 500, "{serves} calls for 12 throttled frames");
}

/// A VM restored paused serves no queue and no TAP until it is resumed
/// (nor does a migration's destination before its Commit): its I/O engine
/// starts parked.
#[test]
fn a_vm_restored_paused_does_no_io_until_resumed() {
    require_kvm!();
    require_tap!();
    let tap = HostTap::create("rsp", None).unwrap();
    let vm = Vm::start(&config(&tap.name, "flood"), Output::Null).unwrap();
    let more = Deadline::after(BOUND);
    while vm.io_serves().unwrap() < 10 && !more.passed() {
        std::thread::sleep(Duration::from_millis(5));
    }
    vm.pause(Deadline::after(Duration::from_secs(10))).unwrap();
    let dir = std::env::temp_dir().join(format!("brisk-net-paused-{}", std::process::id()));
    vm.snapshot(&dir).unwrap();
    vm.shutdown().unwrap();
    let opts = brisk_vmm::RestoreOptions {
        paused: true,
        ..Default::default()
    };
    let vm = Vm::restore(&dir, Output::Null, opts).expect("restores paused");
    assert_eq!(vm.io_serves(), Some(0), "a paused VM's engine served");
    vm.resume().unwrap();
    let more = Deadline::after(BOUND);
    while vm.io_serves().unwrap() == 0 && !more.passed() {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(vm.io_serves().unwrap() > 0, "resumed, it serves");
    vm.shutdown().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
