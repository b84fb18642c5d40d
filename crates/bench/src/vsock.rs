//! vsock: a host client through brisk's hybrid vsock to the `vsockecho`
//! guest and back, against the floor: the same bytes through a Unix
//! socket pair echoed by a host thread. Round trips of 64 bytes, and
//! throughput (1 MiB sent while the echo is read).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use brisk_test_kernels as k;

use crate::{Opts, Row, Table};

const WAIT: Duration = Duration::from_secs(60);

/// ns per round trip of `size` bytes, `n` times.
fn round_trips(s: &mut UnixStream, size: usize, n: usize) -> Vec<u64> {
    let msg = vec![0x42u8; size];
    let mut back = vec![0u8; size];
    (0..n)
        .map(|_| {
            let t = Instant::now();
            s.write_all(&msg).expect("write");
            s.read_exact(&mut back).expect("read the echo");
            t.elapsed().as_nanos() as u64
        })
        .collect()
}

/// ns per MiB for `mib` MiB sent and its echo read back at once.
fn throughput(s: &mut UnixStream, mib: usize) -> u64 {
    let data = vec![0x5au8; 1 << 20];
    let mut w = s.try_clone().expect("clone");
    let t = Instant::now();
    let writer = std::thread::spawn(move || {
        for _ in 0..mib {
            w.write_all(&data).expect("write");
        }
    });
    let mut buf = vec![0u8; 64 << 10];
    let mut left = mib << 20;
    while left > 0 {
        let n = s.read(&mut buf).expect("read the echo");
        assert!(n > 0, "the echo ended early");
        left -= n.min(left);
    }
    writer.join().expect("writer");
    t.elapsed().as_nanos() as u64 / mib as u64
}

/// A host thread echoing on one end of a socket pair: the floor.
fn floor_pair() -> UnixStream {
    let (a, mut b) = UnixStream::pair().expect("socketpair");
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = b.read(&mut buf) {
            if n == 0 || b.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    a
}

pub fn run(opts: &Opts) -> Vec<Table> {
    let (n, mib) = if opts.quick { (200, 1) } else { (2_000, 4) };
    let uds = std::env::temp_dir().join(format!("brisk-bench-vsock-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&uds);
    let config = brisk_vmm::VmConfig {
        cpus: 1,
        irqchip: brisk_vmm::Irqchip::Kernel,
        payload: brisk_vmm::Payload::Kernel(brisk_vmm::KernelConfig {
            path: k::VSOCKECHO.into(),
            ..Default::default()
        }),
        vsock: Some(brisk_vmm::VsockConfig {
            cid: 3,
            uds_path: uds.clone(),
        }),
        ..brisk_vmm::VmConfig::default()
    };
    let vm = brisk_vmm::Vm::start(&config, brisk_vmm::Output::Null).expect("the vsockecho kernel");
    let mut s = UnixStream::connect(&uds).expect("the vsock socket");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s.write_all(b"CONNECT 1234\n").expect("CONNECT");
    let mut line = [0u8; 1];
    while s.read(&mut line).expect("the OK line") == 1 && line[0] != b'\n' {}
    let mut floor = floor_pair();
    let (floor_rt, brisk_rt) = (round_trips(&mut floor, 64, n), round_trips(&mut s, 64, n));
    let (floor_tp, brisk_tp) = (throughput(&mut floor, mib), throughput(&mut s, mib));
    drop(s);
    let _ = vm.shutdown();
    let mib_s = |ns: u64| 1e9 / ns.max(1) as f64;
    vec![
        Table::new(
            "vsock: round trip of 64 bytes, host → guest → host",
            &format!("{n} round trips on one connection (CONNECT 1234 on the Unix socket; the vsockecho kernel echoes from the buffer the bytes arrived in, polling); floor: a Unix socket pair echoed by a host thread"),
            vec![
                Row::new("floor: socket pair, host thread echoes", floor_rt),
                Row::new("brisk: hybrid vsock, guest echoes", brisk_rt),
            ],
        ),
        Table::new(
            "vsock: throughput, MiB sent and echoed back at once",
            &format!("{mib} MiB written while the echo is read; ns per MiB (one sample)"),
            vec![
                Row::new("floor: socket pair, host thread echoes", vec![floor_tp]).with("MiB/s", mib_s(floor_tp)),
                Row::new("brisk: hybrid vsock, guest echoes", vec![brisk_tp]).with("MiB/s", mib_s(brisk_tp)),
            ],
        ),
    ]
}
