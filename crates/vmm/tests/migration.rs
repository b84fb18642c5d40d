//! Live migration on real KVM, source and destination in one process
//! (the stream is a real Unix or TCP socket): guests that notice say
//! whether anything was lost, a guest that dirties memory as fast as it
//! can checks the dirty log, and failures leave the source running.

mod common;

use brisk_vmm::require_kvm;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use brisk_guests::PINGPONG_ROUNDS;
use brisk_vmm::migration::Phase;
use brisk_vmm::{
    Irqchip, MigrationOptions, MigrationUrl, Output, Payload, RestoreOptions, StartError, Vm,
    VmConfig, VmEnd,
};
use common::{check_dirty_pages, soon, wait_progress};

fn url(name: &str) -> MigrationUrl {
    let p = std::env::temp_dir().join(format!("brisk-mig-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    MigrationUrl::Unix(p)
}

/// A destination waiting on `url`, on a thread.
fn destination(url: &MigrationUrl, paused: bool) -> JoinHandle<Result<Vm, StartError>> {
    let opts = RestoreOptions {
        paused,
        ..RestoreOptions::default()
    };
    destination_with(url, opts)
}

/// A destination waiting on `url` with `opts`, on a thread.
fn destination_with(
    url: &MigrationUrl,
    opts: RestoreOptions,
) -> JoinHandle<Result<Vm, StartError>> {
    let url = url.clone();
    let listening = url.clone();
    let t = std::thread::spawn(move || Vm::receive_migration(&url, Output::Null, opts, &|| false));
    // Bounded wait for the socket (TCP: for the port) to be there.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let up = match &listening {
            MigrationUrl::Unix(p) => p.exists(),
            MigrationUrl::Tcp(a) => tcp_listening(a),
        };
        if up || t.is_finished() {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "the destination never listened"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    t
}

/// Whether something listens on `addr`'s port (from /proc/net/tcp, so
/// the probe is not taken for the source).
fn tcp_listening(addr: &std::net::SocketAddr) -> bool {
    let port = addr.port();
    let want = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
        })
}

fn source(guest: &str, cpus: usize, memory: u64, shared: bool) -> Arc<Vm> {
    let config = VmConfig {
        payload: Payload::builtin(guest),
        cpus,
        memory,
        irqchip: Irqchip::User,
        shared_memory: shared,
        ..VmConfig::default()
    };
    Arc::new(Vm::start(&config, Output::Null).unwrap())
}

/// Migrate `src` with `opts`; the destination VM, running (or paused,
/// as it arrived).
fn migrate(src: &Arc<Vm>, opts: MigrationOptions) -> Vm {
    migrate_to(src, opts, false)
}

fn migrate_to(src: &Arc<Vm>, opts: MigrationOptions, paused: bool) -> Vm {
    let dst = destination(&opts.url, paused);
    src.send_migration(opts.clone()).unwrap();
    let status = src.wait_migration().unwrap();
    assert_eq!(status.phase, Phase::Completed, "{status:?}");
    assert!(status.downtime_ms.is_some());
    assert_eq!(
        src.ended(),
        Some(VmEnd::Migrated {
            to: opts.url.to_string()
        })
    );
    let vm = dst.join().unwrap().unwrap();
    assert_eq!(vm.is_paused(), paused);
    eprintln!("{status:?}");
    vm
}

/// The tick guest moves mid-run over a Unix socket and ends at the
/// destination after its ticks: every tick it handled was injected once,
/// on one side or the other.
#[test]
fn tick_guest_migrates_over_unix_and_loses_no_tick() {
    require_kvm!();
    let src = source("tick=1500", 2, 64 << 20, false);
    wait_progress(&src, 0, 200);
    let vm = migrate(&src, MigrationOptions::new(url("tick")));
    // It runs there now: here it can be neither resumed nor paused.
    assert_eq!(src.resume(), Err(brisk_vmm::PauseError::Ended));
    assert_eq!(src.pause(soon()), Err(brisk_vmm::PauseError::Ended));
    ends_with_every_tick_once(src, vm, 2);
}

/// The moved `tick=1500` guest ends at the destination, and every tick
/// its vCPUs handled was injected once, at the source or there.
fn ends_with_every_tick_once(src: Arc<Vm>, vm: Vm, cpus: usize) {
    let before: Vec<u64> = (0..cpus)
        .map(|id| src.interrupt_stats(id).unwrap().injected)
        .collect();
    assert_eq!(
        vm.wait(Some(Duration::from_secs(60)), None),
        VmEnd::PowerOff
    );
    for (id, b) in before.iter().enumerate() {
        let handled = vm.progress(id);
        assert!((1500..=1501).contains(&handled), "vCPU {id}: {handled}");
        assert_eq!(b + vm.interrupt_stats(id).unwrap().injected, handled);
    }
    vm.shutdown().unwrap();
    Arc::try_unwrap(src).ok().unwrap().shutdown().unwrap();
}

/// M:N: a tick guest on 4 vCPUs over 2 pool threads moves mid-run; the
/// destination runs it on a pool too (the configuration travels), and no
/// tick is lost or doubled.
#[test]
fn a_pooled_vm_migrates_and_runs_pooled_there() {
    require_kvm!();
    let config = VmConfig {
        payload: Payload::builtin("tick=1500"),
        cpus: 4,
        irqchip: Irqchip::User,
        vcpu_threads: Some(2),
        ..VmConfig::default()
    };
    let src = Arc::new(Vm::start(&config, Output::Null).unwrap());
    wait_progress(&src, 0, 200);
    let vm = migrate(&src, MigrationOptions::new(url("pooled")));
    assert_eq!(vm.vcpu_thread_count(), 3, "2 pool threads and the slicer");
    ends_with_every_tick_once(src, vm, 4);
}

/// Pingpong moves over TCP on loopback (paused) and finishes its rounds
/// there.
#[test]
fn pingpong_migrates_over_tcp() {
    require_kvm!();
    let src = source("pingpong", 2, 64 << 20, false);
    wait_progress(&src, 0, 50);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // Paused first: its 1000 rounds take ~0.1 s, and a guest that ends
    // before the switch would make the test race the machine's load. It
    // arrives paused (as it left) and finishes its rounds there.
    src.pause(soon()).unwrap();
    let vm = migrate_to(
        &src,
        MigrationOptions::new(MigrationUrl::Tcp(([127, 0, 0, 1], port).into())),
        true,
    );
    vm.resume().unwrap();
    assert_eq!(
        vm.wait(Some(Duration::from_secs(60)), None),
        VmEnd::PowerOff
    );
    for id in 0..2 {
        assert_eq!(vm.progress(id), PINGPONG_ROUNDS);
    }
    vm.shutdown().unwrap();
}

/// A guest writing every page of 2 x 24 MiB as fast as it can: pre-copy
/// iterates on the dirty log (with a budget it cannot meet, for a second)
/// and the forced stop-and-copy catches the rest. Every page at the
/// destination holds what the guest last wrote there.
#[test]
fn memory_dirtying_guest_migrates_with_every_page() {
    dirtying_guest_migrates_with_every_page(false);
}

/// The same, the dirty log from KVM's per-vCPU rings (each vCPU dirties
/// more than its ring holds between two looks).
#[test]
fn memory_dirtying_guest_tracked_by_dirty_rings_migrates_with_every_page() {
    dirtying_guest_migrates_with_every_page(true);
}

fn dirtying_guest_migrates_with_every_page(dirty_ring: bool) {
    require_kvm!();
    let (cpus, mib) = (2, 24);
    let config = VmConfig {
        payload: Payload::builtin(&format!("dirty={mib}")),
        cpus,
        memory: 128 << 20,
        irqchip: Irqchip::User,
        dirty_ring,
        ..VmConfig::default()
    };
    let src = Arc::new(Vm::start(&config, Output::Null).unwrap());
    for id in 0..cpus {
        wait_progress(&src, id, 2);
    }
    let mut opts = MigrationOptions::new(url(if dirty_ring { "dirty-ring" } else { "dirty" }));
    opts.downtime = Duration::from_micros(1);
    opts.timeout = Duration::from_secs(1);
    opts.force_on_timeout = true;
    // Arrived paused: the pages are as the source left them (the guest's
    // next sweep would cover up a page the copy missed).
    let vm = migrate_to(&src, opts, true);
    check_dirty_pages(&vm, cpus, mib, 3);
    vm.resume().unwrap();
    wait_progress(&vm, 0, vm.progress(0) + 2);
    vm.pause(soon()).unwrap();
    check_dirty_pages(&vm, cpus, mib, 3);
    vm.shutdown().unwrap();
}

/// A local upgrade hands the memfd over: nothing is copied, and the
/// guest goes on with its memory.
#[test]
fn local_upgrade_hands_over_shared_memory() {
    require_kvm!();
    let (cpus, mib) = (2, 8);
    let src = source(&format!("dirty={mib}"), cpus, 64 << 20, true);
    for id in 0..cpus {
        wait_progress(&src, id, 1);
    }
    let mut opts = MigrationOptions::new(url("local"));
    opts.local = true;
    let vm = migrate_to(&src, opts, true);
    let status = src.migration_status().unwrap();
    assert!(status.bytes_sent == 0, "{status:?}");
    check_dirty_pages(&vm, cpus, mib, 2);
    vm.resume().unwrap();
    wait_progress(&vm, 1, vm.progress(1) + 2);
    vm.pause(soon()).unwrap();
    check_dirty_pages(&vm, cpus, mib, 2);
    vm.shutdown().unwrap();
}

/// A migration that cannot finish leaves the source running: no
/// destination, a destination that refuses, a cancel mid-copy.
#[test]
fn failed_or_cancelled_migrations_leave_the_source_running() {
    require_kvm!();
    let src = source("spin", 1, 64 << 20, false);
    // Nobody listening.
    src.send_migration(MigrationOptions::new(url("nobody")))
        .unwrap();
    let s = src.wait_migration().unwrap();
    assert_eq!(s.phase, Phase::Failed);
    assert!(s.error.unwrap().contains("cannot connect"));
    assert!(src.ended().is_none() && !src.is_paused());
    let p = src.progress(0);
    wait_progress(&src, 0, p);
    // A local upgrade of a VM without shared memory is refused at once.
    let mut local = MigrationOptions::new(url("local-refused"));
    local.local = true;
    assert!(src.send_migration(local).is_err());
    // Cancelled while the destination sits on its Ready (it never gets
    // a Commit): the destination gives up, the source goes on.
    let dirty = source("dirty=32", 1, 128 << 20, false);
    let u = url("cancel");
    let dst = destination(&u, false);
    let mut opts = MigrationOptions::new(u);
    opts.downtime = Duration::from_micros(1); // never converges
    dirty.send_migration(opts).unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while dirty.migration_status().unwrap().iteration < 2 {
        assert!(std::time::Instant::now() < until, "no dirty passes");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(dirty.cancel_migration());
    let s = dirty.wait_migration().unwrap();
    assert_eq!(s.phase, Phase::Cancelled, "{s:?}");
    assert!(dirty.ended().is_none() && !dirty.is_paused());
    wait_progress(&dirty, 0, dirty.progress(0) + 1);
    match dst.join().unwrap() {
        Err(e @ StartError::Receive(_)) => assert!(e.to_string().contains("gave up"), "{e}"),
        Err(e) => panic!("the destination failed otherwise: {e}"),
        Ok(_) => panic!("the destination runs a VM the source kept"),
    }
    for vm in [src, dirty] {
        Arc::try_unwrap(vm).ok().unwrap().shutdown().unwrap();
    }
}

/// A destination fed garbage, or a stream from a source that goes away,
/// refuses in one sentence and leaves no socket behind.
#[test]
fn destination_refuses_hostile_streams() {
    require_kvm!();
    use std::io::Write;
    for (name, bytes) in [
        ("junk", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ("hello-then-eof", {
            let body = br#"{"version": 1, "config": 7, "local": false}"#;
            let mut m = vec![1, 0, 0, 0, 0, 0, 0, 0];
            m.extend_from_slice(&(body.len() as u64).to_le_bytes());
            m.extend_from_slice(body);
            m
        }),
        ("huge", {
            let mut m = vec![4, 0, 0, 0, 0, 0, 0, 0];
            m.extend_from_slice(&u64::MAX.to_le_bytes());
            m
        }),
    ] {
        let u = url(name);
        let MigrationUrl::Unix(path) = &u else {
            unreachable!()
        };
        let dst = destination(&u, false);
        let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
        s.write_all(&bytes).unwrap();
        drop(s);
        match dst.join().unwrap() {
            Err(e @ (StartError::Snapshot(_) | StartError::Receive(_))) => {
                let msg = e.to_string();
                assert!(!msg.contains('\n'), "{name}: {msg}")
            }
            Err(e) => panic!("{name}: {e}"),
            Ok(_) => panic!("{name}: a VM from garbage"),
        }
        assert!(!path.exists(), "{name}: the socket was left behind");
    }
}

/// A VM with a disk moves on one host (the same image): the source lets
/// its disk lock go as its VM ends, the destination, told to trust the
/// source's disk paths, takes it on Commit and holds it after.
#[test]
fn a_vm_with_a_disk_migrates_on_one_host() {
    require_kvm!();
    let disk = std::env::temp_dir().join(format!("brisk-mig-disk-{}", std::process::id()));
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    let config = VmConfig {
        cpus: 1,
        irqchip: Irqchip::Kernel,
        // Waits for console input for ever: it is still there to move.
        payload: Payload::Kernel(brisk_vmm::KernelConfig {
            path: brisk_test_kernels::UARTIRQ.into(),
            ..Default::default()
        }),
        disks: vec![brisk_vmm::DiskConfig {
            path: disk.clone(),
            readonly: false,
            ..Default::default()
        }],
        ..VmConfig::default()
    };
    let src = Arc::new(Vm::start(&config, Output::Null).unwrap());
    let url = url("disk");
    let dst = destination_with(
        &url,
        RestoreOptions {
            trust_disk_paths: true,
            ..RestoreOptions::default()
        },
    );
    src.send_migration(MigrationOptions::new(url)).unwrap();
    let status = src.wait_migration().unwrap();
    assert_eq!(status.phase, Phase::Completed, "{status:?}");
    let vm = dst.join().unwrap().unwrap();
    let third = Vm::start(&config, Output::Null).err().expect("refused");
    assert!(third.to_string().contains("is in use"), "{third}");
    vm.shutdown().unwrap();
    Arc::try_unwrap(src).ok().unwrap().shutdown().unwrap();
    std::fs::remove_file(&disk).unwrap();
}
