//! net: virtio-net on a TAP, through brisk, against the floor: the same
//! frames written to and read from a TAP directly by a host thread.
//!
//! - guest → host throughput: the `virtionet` kernel sends a burst (64-
//!   and 1514-byte frames), a packet socket on the TAP counts them; the
//!   floor is a host thread writing the same burst to a TAP's fd.
//! - round trip host → guest → host: a packet socket sends one frame, the
//!   `virtionet` kernel echoes it, the socket receives it; the floor is a
//!   host thread echoing frames on a TAP's fd.
//!
//! Needs root (it makes its TAPs); without them it says so and measures
//! nothing.

use std::time::{Duration, Instant};

use brisk_devices::virtio::Tap;
use brisk_test_kernels::host_net::{frame, tap_unavailable, HostTap, PacketSocket};
use brisk_test_kernels::{self as k};

use crate::{Opts, Row, Table};

const GUEST_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const WAIT: Duration = Duration::from_secs(60);
/// The frame sizes measured (on the wire, no FCS).
const SIZES: [usize; 2] = [60, 1514];

fn vm(tap: &str, cmdline: String) -> brisk_vmm::Vm {
    vm_limited(tap, cmdline, None)
}

fn vm_limited(tap: &str, cmdline: String, tx_bw: Option<brisk_vmm::Limit>) -> brisk_vmm::Vm {
    let config = brisk_vmm::VmConfig {
        cpus: 1,
        irqchip: brisk_vmm::Irqchip::Kernel,
        payload: brisk_vmm::Payload::Kernel(brisk_vmm::KernelConfig {
            path: k::VIRTIONET.into(),
            cmdline,
            initrd: None,
        }),
        nets: vec![brisk_vmm::NetConfig {
            tap: tap.into(),
            mac: Some(brisk_vmm::Mac(GUEST_MAC)),
            tx_bw,
            ..Default::default()
        }],
        ..brisk_vmm::VmConfig::default()
    };
    brisk_vmm::Vm::start(&config, brisk_vmm::Output::Null).expect("the virtionet kernel starts")
}

/// Receive `n` frames of our ethertype; ns from the first to the last,
/// per frame (`None` if they did not all come).
fn count(sock: &PacketSocket, n: usize) -> Option<u64> {
    let at = arrivals(sock, n);
    let (first, last) = (at.first()?, at.last()?);
    (at.len() == n).then(|| last.duration_since(*first).as_nanos() as u64 / (n as u64 - 1).max(1))
}

/// When each of `n` frames of our ethertype arrived.
fn arrivals(sock: &PacketSocket, n: usize) -> Vec<Instant> {
    let mut buf = vec![0u8; 2048];
    let mut at = Vec::with_capacity(n);
    while at.len() < n {
        let Ok(Some(len)) = sock.recv_from_guest(&mut buf, WAIT) else {
            break;
        };
        if len >= 14 && u16::from_be_bytes([buf[12], buf[13]]) == k::VIRTIONET_ETHERTYPE {
            at.push(Instant::now());
        }
    }
    at
}

/// The transmit rate limiter: a burst of 1514-byte frames against a
/// limit, the rate measured once the first bucket is spent.
fn limited(tap: &HostTap, sock: &PacketSocket, opts: &Opts) -> Table {
    const LIMIT: u64 = 5 << 20;
    const SIZE: usize = 1514;
    let n = if opts.quick { 1_000 } else { 4_000 };
    // The bucket holds 100 ms of the rate (346 frames): skip 500.
    let skip = 500;
    let times = std::thread::scope(|s| {
        let h = s.spawn(|| arrivals(sock, n));
        let limit = brisk_vmm::Limit::per_second(LIMIT);
        let vm = vm_limited(&tap.name, format!("burst={n} size={SIZE}"), Some(limit));
        vm.wait(Some(WAIT), None);
        let _ = vm.shutdown();
        h.join().unwrap()
    });
    let (rate, per_frame) = match (times.get(skip), times.last()) {
        (Some(a), Some(b)) if times.len() == n => {
            let secs = b.duration_since(*a).as_secs_f64();
            let frames = (n - 1 - skip) as f64;
            (frames * SIZE as f64 / secs, (secs * 1e9 / frames) as u64)
        }
        _ => (0.0, 0),
    };
    let want = LIMIT as f64 / SIZE as f64;
    Table::new(
        "net: guest → host through a 5 MiB/s transmit limit, 1514-byte frames",
        &format!("a burst of {n} frames with --net ...,tx-bw=5M; the rate measured from frame {skip} (past the first bucket, 100 ms of the rate) to the last. The limit: {:.0} ns per frame; measured: {:.2} MiB/s, {:.1}% of the limit", 1e9 / want, rate / (1 << 20) as f64, rate * 100.0 / LIMIT as f64),
        vec![
            Row::new("the limit", vec![(1e9 / want) as u64]).with("MiB/s", LIMIT as f64 / (1 << 20) as f64),
            Row::new("brisk: measured", vec![per_frame]).with("MiB/s", rate / (1 << 20) as f64),
        ],
    )
}

/// One frame of `size` bytes on the wire, our ethertype, `seq` inside.
fn test_frame(dst: [u8; 6], src: [u8; 6], size: usize, seq: u32) -> Vec<u8> {
    let mut payload = vec![0u8; size - 14];
    payload[..4].copy_from_slice(&seq.to_be_bytes());
    frame(dst, src, k::VIRTIONET_ETHERTYPE, &payload)
}

/// Send one frame at a time and wait for it to come back: ns per round
/// trip.
fn round_trips(sock: &PacketSocket, size: usize, n: usize) -> Vec<u64> {
    let mut buf = vec![0u8; 2048];
    let mut samples = Vec::with_capacity(n);
    for seq in 0..n as u32 {
        let f = test_frame(GUEST_MAC, HOST_MAC, size, seq);
        let t = Instant::now();
        sock.send(&f).expect("send to the TAP");
        loop {
            let Ok(Some(len)) = sock.recv_from_guest(&mut buf, WAIT) else {
                return samples;
            };
            if len == size && buf[14..18] == seq.to_be_bytes() {
                break;
            }
        }
        samples.push(t.elapsed().as_nanos() as u64);
    }
    samples
}

/// A host thread on `tap`'s fd: write `n` frames (the floor of a guest's
/// burst), or echo frames back until `stop` (the floor of the echo).
fn floor_burst(tap: &Tap, size: usize, n: usize) {
    let mut f = vec![0u8; 12];
    for seq in 0..n as u32 {
        f.truncate(12);
        f.extend_from_slice(&test_frame([0xff; 6], GUEST_MAC, size, seq));
        while let Err(e) = tap.write_frame(&f) {
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "TAP write: {e}");
            std::thread::yield_now();
        }
    }
}

fn floor_echo(tap: &Tap, stop: &std::sync::atomic::AtomicBool) {
    let mut buf = vec![0u8; 2048];
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: tap.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        while let Ok(n) = tap.read_frame(&mut buf) {
            if n > 26 && u16::from_be_bytes([buf[24], buf[25]]) == k::VIRTIONET_ETHERTYPE {
                let mut out = buf[..n].to_vec();
                out[12..18].copy_from_slice(&buf[18..24]);
                out[18..24].copy_from_slice(&GUEST_MAC);
                let _ = tap.write_frame(&out);
            }
        }
    }
}

pub fn run(opts: &Opts) -> Vec<Table> {
    if let Some(why) = tap_unavailable() {
        eprintln!("bench net: skipped: {why}");
        return Vec::new();
    }
    let (burst, trips, rounds) = if opts.quick {
        (2_000, 200, 1)
    } else {
        (20_000, 2_000, 3)
    };
    let tap = HostTap::create("bn", None).expect("a TAP for the benchmark");
    let sock = PacketSocket::bind(tap.ifindex()).expect("a packet socket on the TAP");
    let mut tables = Vec::new();
    for size in SIZES {
        let (mut brisk_tx, mut floor_tx) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            // The floor: a host thread writes the burst into the TAP.
            let direct = Tap::open(&tap.name).expect("the TAP, directly");
            let writer = std::thread::scope(|s| {
                let h = s.spawn(|| count(&sock, burst));
                floor_burst(&direct, size, burst);
                h.join().unwrap()
            });
            drop(direct);
            floor_tx.extend(writer);
            // brisk: the guest sends it.
            let counted = std::thread::scope(|s| {
                let h = s.spawn(|| count(&sock, burst));
                let vm = vm(&tap.name, format!("burst={burst} size={size}"));
                vm.wait(Some(WAIT), None);
                let _ = vm.shutdown();
                h.join().unwrap()
            });
            brisk_tx.extend(counted);
        }
        let per_s = |v: &[u64]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            1e9 / v.get(v.len() / 2).copied().unwrap_or(1).max(1) as f64
        };
        let (fp, bp) = (per_s(&floor_tx), per_s(&brisk_tx));
        tables.push(Table::new(
            &format!("net: guest → host, {size}-byte frames, ns per frame"),
            &format!("a burst of {burst} frames counted by a packet socket on the TAP, first to last arrival; median of {rounds} rounds. floor: a host thread writing the frames to a TAP fd; brisk: the virtionet kernel sending them (polled, one notify per frame) through virtio-net and the I/O engine"),
            vec![
                Row::new("floor: host thread writes the TAP", floor_tx).with("frames/s", fp),
                Row::new("brisk: guest virtio-net TX", brisk_tx).with("frames/s", bp),
            ],
        ));

        // Round trips.
        let direct = Tap::open(&tap.name).expect("the TAP, directly");
        let stop = std::sync::atomic::AtomicBool::new(false);
        let floor_rt = std::thread::scope(|s| {
            s.spawn(|| floor_echo(&direct, &stop));
            let v = round_trips(&sock, size, trips * rounds);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            v
        });
        drop(direct);
        let vm = vm(&tap.name, format!("echo={}", trips * rounds));
        let brisk_rt = round_trips(&sock, size, trips * rounds);
        vm.wait(Some(WAIT), None);
        let _ = vm.shutdown();
        tables.push(Table::new(
            &format!("net: round trip host → guest → host, {size}-byte frames"),
            "one frame at a time from a packet socket on the TAP, back to it. floor: a host thread echoing on a TAP fd; brisk: the virtionet kernel echoing (polling its receive queue) through virtio-net and the I/O engine",
            vec![
                Row::new("floor: host thread echoes on the TAP", floor_rt),
                Row::new("brisk: guest echo over virtio-net", brisk_rt),
            ],
        ));
    }
    tables.push(limited(&tap, &sock, opts));
    tables
}
