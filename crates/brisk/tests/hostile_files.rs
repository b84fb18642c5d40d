//! `--kernel` and `--initrd` given files that are not kernels brisk can
//! boot, from the hostile-input review (D4, D5, D9, D14): each is refused
//! at once, with one sentence naming the file and status 6, and nothing is
//! read that need not be. Every run is bounded: a brisk still running
//! after [`BOUND`] is killed and the test fails.

mod common;

use common::require_kvm;

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Far more than any refusal takes (milliseconds): only a hang reaches it.
const BOUND: Duration = Duration::from_secs(30);

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("brisk-hostile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Run {
    status: Option<i32>,
    stderr: String,
}

/// Run brisk with `args`, stdout and stderr to files (so that nothing it
/// writes can block it), killing it if it has not ended within [`BOUND`].
fn brisk(scratch: &Scratch, args: &[&str]) -> Run {
    let out = scratch.path("stdout");
    let err = scratch.path("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_brisk"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .expect("brisk runs");
    let began = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if began.elapsed() > BOUND {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!(
                "brisk {args:?} still running after {BOUND:?}; stderr: {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        status: status.code(),
        stderr: std::fs::read_to_string(&err).unwrap(),
    }
}

/// Refused with status 6 and one line on stderr: "brisk: " and a sentence
/// naming `path` and containing `says`.
fn assert_refused(run: &Run, path: &Path, says: &str) {
    let err = &run.stderr;
    assert_eq!(run.status, Some(6), "{path:?}: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("brisk: "), "{err}");
    assert!(
        err.contains(path.to_str().unwrap()),
        "names the file: {err}"
    );
    assert!(err.contains(says), "{path:?}: expected '{says}' in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn words(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// An ELF32 header for i386 with `phnum` program headers of `phentsize`
/// bytes at offset 52 and entry 0x10_0010, padded to `len` bytes, with a
/// multiboot header (flags 3) at 0x1000.
fn elf(len: usize, phentsize: u16, phnum: u16, phdr: [u32; 8]) -> Vec<u8> {
    let mut b = vec![0u8; len];
    b[..4].copy_from_slice(b"\x7fELF");
    (b[4], b[5], b[6]) = (1, 1, 1);
    b[16..18].copy_from_slice(&2u16.to_le_bytes());
    b[18..20].copy_from_slice(&3u16.to_le_bytes());
    b[24..28].copy_from_slice(&0x10_0010u32.to_le_bytes());
    b[28..32].copy_from_slice(&52u32.to_le_bytes());
    b[42..44].copy_from_slice(&phentsize.to_le_bytes());
    b[44..46].copy_from_slice(&phnum.to_le_bytes());
    b[52..84].copy_from_slice(&words(&phdr));
    let sum = 0u32.wrapping_sub(0x1bad_b002).wrapping_sub(3);
    b[0x1000..0x100c].copy_from_slice(&words(&[0x1bad_b002, 3, sum]));
    b
}

/// A real (tiny) multiboot kernel: one segment at 1 MiB whose code writes
/// 0x21 to the debug-exit port (brisk status 0x43) and halts.
fn tiny_kernel(scratch: &Scratch) -> PathBuf {
    let mut b = elf(
        0x1020,
        32,
        1,
        [1, 0x1000, 0x10_0000, 0x10_0000, 0x20, 0x20, 5, 0x1000],
    );
    // mov al, 0x21; out 0xf4, al; hlt; jmp $-1
    b[0x1010..0x1017].copy_from_slice(&[0xb0, 0x21, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd]);
    let path = scratch.path("tiny.elf");
    std::fs::write(&path, b).unwrap();
    path
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo(3) with a NUL-terminated path.
    let r = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(r, 0, "mkfifo {path:?}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The control: the tiny kernel and a regular initrd boot, so that the
/// refusals below are about the files, not the kernel.
#[test]
fn a_regular_kernel_and_initrd_still_boot() {
    require_kvm!();
    let dir = Scratch::new("control");
    let kernel = tiny_kernel(&dir);
    let initrd = dir.path("initrd");
    std::fs::write(&initrd, vec![7u8; (3 << 20) + 5]).unwrap();
    let run = brisk(
        &dir,
        &[
            "run",
            "--kernel",
            s(&kernel),
            "--initrd",
            s(&initrd),
            "--memory",
            "16M",
            "--cpus",
            "1",
        ],
    );
    assert_eq!(run.status, Some((0x21 << 1) | 1), "{}", run.stderr);
}

/// D5: open(2) of a FIFO used to block for good; no signal but SIGKILL
/// ended it.
#[test]
fn a_fifo_as_kernel_is_refused_at_once() {
    require_kvm!();
    let dir = Scratch::new("fifo-kernel");
    let fifo = dir.path("fifo");
    mkfifo(&fifo);
    let run = brisk(&dir, &["run", "--kernel", s(&fifo), "--timeout", "2s"]);
    assert_refused(&run, &fifo, "is a FIFO, not a regular file");
}

#[test]
fn a_fifo_as_initrd_is_refused_at_once() {
    require_kvm!();
    let dir = Scratch::new("fifo-initrd");
    let kernel = tiny_kernel(&dir);
    let fifo = dir.path("fifo");
    mkfifo(&fifo);
    let run = brisk(&dir, &["run", "--kernel", s(&kernel), "--initrd", s(&fifo)]);
    assert_refused(&run, &fifo, "initrd");
    assert_refused(&run, &fifo, "is a FIFO, not a regular file");
}

/// D4: /dev/zero and /dev/urandom used to be read until the OOM killer
/// struck (24 GB). Now refused by type, without being opened.
#[test]
fn character_devices_as_kernel_or_initrd_are_refused_by_type() {
    require_kvm!();
    let dir = Scratch::new("devices");
    let kernel = tiny_kernel(&dir);
    for dev in ["/dev/zero", "/dev/urandom", "/dev/null"] {
        let dev = Path::new(dev);
        if !dev.exists() {
            eprintln!("no {dev:?} here: skipped");
            continue;
        }
        let run = brisk(&dir, &["run", "--kernel", s(dev)]);
        assert_refused(&run, dev, "is a character device, not a regular file");
        let run = brisk(&dir, &["run", "--kernel", s(&kernel), "--initrd", s(dev)]);
        assert_refused(&run, dev, "initrd");
        assert_refused(&run, dev, "is a character device, not a regular file");
    }
}

#[test]
fn directories_and_sockets_are_refused_by_type() {
    require_kvm!();
    let dir = Scratch::new("dirs");
    let kernel = tiny_kernel(&dir);
    let sub = dir.path("sub");
    std::fs::create_dir(&sub).unwrap();
    let sock = dir.path("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    for (path, kind) in [(&sub, "a directory"), (&sock, "a socket")] {
        let says = format!("is {kind}, not a regular file");
        let run = brisk(&dir, &["run", "--kernel", s(path)]);
        assert_refused(&run, path, &says);
        let run = brisk(&dir, &["run", "--kernel", s(&kernel), "--initrd", s(path)]);
        assert_refused(&run, path, "initrd");
        assert_refused(&run, path, &says);
    }
}

/// D9: a 7 KB ELF with e_phentsize 0, e_phnum 65535 and one 60 MiB
/// PT_LOAD pinned the loader for about 26 minutes.
#[test]
fn the_d9_crafted_elf_is_refused_at_once() {
    require_kvm!();
    let dir = Scratch::new("d9");
    let d9 = dir.path("loader-hang.elf");
    let phdr = [1, 0x1000, 0x10_0000, 0x10_0000, 0x100, 60 << 20, 7, 0x1000];
    std::fs::write(&d9, elf(7 * 1024, 0, 65535, phdr)).unwrap();
    let run = brisk(&dir, &["run", "--kernel", s(&d9), "--timeout", "5s"]);
    assert_refused(
        &run,
        &d9,
        "program headers are 0 bytes each, not 32 (the ELF32 size)",
    );
    // The same with the right entry size: too many program headers.
    std::fs::write(&d9, elf(7 * 1024, 32, 65535, phdr)).unwrap();
    let run = brisk(&dir, &["run", "--kernel", s(&d9), "--timeout", "5s"]);
    assert_refused(&run, &d9, "65535 program headers; brisk reads at most 64");
}

/// Files larger than guest RAM are refused by their size, before any read
/// (sparse files: nothing is written to disk).
#[test]
fn a_kernel_or_initrd_larger_than_memory_is_refused_by_size() {
    require_kvm!();
    let dir = Scratch::new("big");
    let kernel = tiny_kernel(&dir);
    let big = dir.path("big");
    File::create(&big).unwrap().set_len(32 << 20).unwrap();
    let too_big = "is 33554432 bytes, larger than the guest's 16 MiB of RAM";
    let run = brisk(&dir, &["run", "--kernel", s(&big), "--memory", "16M"]);
    assert_refused(&run, &big, &format!("kernel {} {too_big}", s(&big)));
    let run = brisk(
        &dir,
        &[
            "run",
            "--kernel",
            s(&kernel),
            "--initrd",
            s(&big),
            "--memory",
            "16M",
        ],
    );
    assert_refused(&run, &big, &format!("initrd {} {too_big}", s(&big)));
}

/// D14: an initrd that fits in RAM but not after the kernel is refused
/// naming the initrd (it used to be "the kernel's segment ... (the initrd").
#[test]
fn an_initrd_that_does_not_fit_after_the_kernel_is_refused_naming_the_initrd() {
    require_kvm!();
    let dir = Scratch::new("initrd-fit");
    let kernel = tiny_kernel(&dir);
    let initrd = dir.path("initrd");
    File::create(&initrd)
        .unwrap()
        .set_len((16 << 20) - 4096)
        .unwrap();
    let run = brisk(
        &dir,
        &[
            "run",
            "--kernel",
            s(&kernel),
            "--initrd",
            s(&initrd),
            "--memory",
            "16M",
        ],
    );
    assert_refused(
        &run,
        &initrd,
        &format!(
            "brisk: initrd {}: the initrd (16773120 bytes, placed at 0x101000 after the kernel) does not fit in the guest's 16 MiB of RAM",
            s(&initrd)
        ),
    );
    assert!(!run.stderr.contains("kernel's segment"), "{}", run.stderr);
}
