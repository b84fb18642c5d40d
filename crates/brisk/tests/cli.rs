//! The `brisk` command as a user runs it.

mod common;

use common::{brisk, require_kvm, text};

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Output, Stdio};

/// One line on stderr, starting with "brisk:" or clap's "error:", no backtrace.
fn assert_one_sentence(out: &Output) {
    let err = text(&out.stderr);
    let first = err.lines().next().unwrap_or("");
    assert!(
        first.starts_with("brisk: ") || first.starts_with("error: "),
        "stderr: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "stderr: {err}"
    );
}

#[test]
fn run_with_no_options_boots_hello_on_two_vcpus_and_exits_0() {
    require_kvm!();
    let out = brisk(&["run"]);
    assert_eq!(text(&out.stdout), "Hello from vCPU 0\nHello from vCPU 1\n");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

#[test]
fn run_takes_guest_cpus_and_memory() {
    require_kvm!();
    let out = brisk(&["run", "--guest", "hello", "--cpus", "3", "--memory", "16M"]);
    assert_eq!(text(&out.stdout).lines().count(), 3);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn the_debug_exit_value_becomes_the_exit_status() {
    require_kvm!();
    let out = brisk(&["run", "--guest", "debug-exit"]);
    assert_eq!(out.status.code(), Some((0x21 << 1) | 1));
}

#[test]
fn timeout_stops_an_endless_guest_with_status_10() {
    require_kvm!();
    let out = brisk(&["run", "--guest", "spin", "--timeout", "200ms"]);
    assert_eq!(out.status.code(), Some(10));
    assert_one_sentence(&out);
}

#[test]
fn bad_input_is_one_sentence_and_a_distinct_status() {
    // None of these needs KVM: they fail before it is opened.
    for (args, status, needle) in [
        (&["run", "--guest", "nope"][..], 6, "unknown guest 'nope'"),
        (&["run", "--cpus", "0"][..], 6, "0 vCPUs"),
        (&["run", "--cpus", "1025"][..], 6, "1025 vCPUs"),
        (&["run", "--memory", "1K"][..], 6, "memory"),
        (&["run", "--memory", "lots"][..], 2, "not a size"),
        (&["run", "--timeout", "soon"][..], 2, "--timeout"),
        (&["run", "--irqchip", "magic"][..], 2, "magic"),
        (&["fly"][..], 2, "fly"),
    ] {
        let out = brisk(args);
        assert_eq!(
            out.status.code(),
            Some(status),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains(needle),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert_one_sentence(&out);
    }
}

#[test]
fn guests_lists_every_builtin_guest_once() {
    let out = brisk(&["guests"]);
    assert_eq!(out.status.code(), Some(0));
    let listing = text(&out.stdout);
    for g in brisk_guests::ALL {
        assert_eq!(
            listing
                .lines()
                .filter(|l| l.split_whitespace().next() == Some(g.name))
                .count(),
            1,
            "{}",
            g.name
        );
    }
}

#[test]
fn help_documents_the_exit_statuses() {
    let out = brisk(&["run", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for needle in ["Exit status", "debug-exit", "--timeout", "130"] {
        assert!(help.contains(needle), "missing {needle}");
    }
}

#[test]
fn sigterm_and_sigint_stop_the_vm_cleanly() {
    require_kvm!();
    for (sig, status) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_brisk"))
            .args(["-v", "run", "--guest", "spin", "--timeout", "60s"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // brisk logs "running" after its handlers are installed and the
        // vCPUs started: signal only then (earlier, the default action
        // would kill it).
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while !line.contains("running on") {
            line.clear();
            assert_ne!(stderr.read_line(&mut line).unwrap(), 0, "brisk ended early");
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, sig) };
        let mut rest = String::new();
        stderr.read_to_string(&mut rest).unwrap();
        let status_code = child.wait().unwrap().code();
        assert_eq!(status_code, Some(status), "{rest}");
        assert!(rest.contains("stopped by signal"), "{rest}");
        assert!(!rest.contains("panicked"), "{rest}");
    }
}

#[test]
fn kvm_missing_or_forbidden_is_status_4_with_one_sentence() {
    require_kvm!();
    let exe = env!("CARGO_BIN_EXE_brisk");
    // No /dev/kvm: an empty /dev in a private mount namespace (needs root).
    let missing = Command::new("unshare")
        .args([
            "--mount",
            "sh",
            "-c",
            &format!("mount -t tmpfs none /dev && exec {exe} run"),
        ])
        .output();
    match missing {
        Ok(out)
            if !text(&out.stderr).contains("unshare:") && !text(&out.stderr).contains("mount:") =>
        {
            assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
            assert!(text(&out.stderr).contains("/dev/kvm does not exist"));
            assert_one_sentence(&out);
        }
        _ => eprintln!(
            "*** SKIPPED the missing-/dev/kvm case: cannot unshare a mount namespace here ***"
        ),
    }
    // No permission: run as nobody (needs root to switch, and /dev/kvm not
    // world-accessible).
    let forbidden = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            exe,
            "run",
        ])
        .output();
    match forbidden {
        Ok(out) if !text(&out.stderr).contains("setpriv:") && out.status.code() != Some(0) => {
            assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
            assert!(text(&out.stderr).contains("no permission to open /dev/kvm"));
            assert_one_sentence(&out);
        }
        _ => eprintln!("*** SKIPPED the no-permission case: cannot drop privileges, or /dev/kvm is open to all ***"),
    }
}

#[test]
fn a_crashing_guest_is_status_8_with_vcpu_and_rip() {
    require_kvm!();
    let out = brisk(&["run", "--guest", "triple-fault", "--cpus", "1"]);
    assert_eq!(out.status.code(), Some(8));
    let err = text(&out.stderr);
    assert!(err.contains("vCPU 0") && err.contains("RIP 0x"), "{err}");
    assert_one_sentence(&out);
}

#[test]
fn ctl_drives_a_vm_through_its_api_socket_and_the_socket_goes_away() {
    require_kvm!();
    let sock = std::env::temp_dir().join(format!("brisk-cli-{}.sock", std::process::id()));
    let sock_s = sock.to_str().unwrap();
    let mut vm = Command::new(env!("CARGO_BIN_EXE_brisk"))
        .args([
            "-v",
            "run",
            "--guest",
            "spin",
            "--api-socket",
            sock_s,
            "--timeout",
            "60s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(vm.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("running on") {
        line.clear();
        assert_ne!(stderr.read_line(&mut line).unwrap(), 0, "brisk ended early");
    }
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--api-socket", sock_s];
        all.extend_from_slice(args);
        brisk(&all)
    };
    let ping = ctl(&["ping"]);
    assert_eq!(
        text(&ping.stdout).trim(),
        concat!("brisk ", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(text(&ctl(&["pause"]).stdout).trim(), "paused");
    assert!(text(&ctl(&["info"]).stdout).contains("state:   paused"));
    let again = ctl(&["pause"]);
    assert_eq!(again.status.code(), Some(16));
    assert!(text(&again.stderr).contains("API error 409"));
    assert_eq!(text(&ctl(&["resume"]).stdout).trim(), "resumed");
    let json = ctl(&["--json", "counters"]);
    let counters: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(counters["vcpus"].as_array().unwrap().len(), 2);
    assert_eq!(text(&ctl(&["kick", "1"]).stdout).trim(), "kicked");
    assert_eq!(ctl(&["kick", "7"]).status.code(), Some(16));
    assert_eq!(text(&ctl(&["shutdown"]).stdout).trim(), "shutting down");
    assert_eq!(vm.wait().unwrap().code(), Some(0));
    assert!(!sock.exists(), "the socket is removed on exit");
    let gone = ctl(&["ping"]);
    assert_eq!(gone.status.code(), Some(18));
    assert_one_sentence(&gone);
}

#[test]
fn interrupt_guests_and_mwait_policies_from_the_command_line() {
    require_kvm!();
    for guest in ["tick", "pingpong"] {
        let out = brisk(&["run", "--guest", guest, "--cpus", "3"]);
        assert_eq!(out.status.code(), Some(0), "{guest}: {}", text(&out.stderr));
        let out = brisk(&["run", "--guest", guest, "--irqchip", "kernel"]);
        assert_eq!(out.status.code(), Some(6), "{guest} needs the user irqchip");
        assert!(text(&out.stderr).contains("--irqchip user"));
        assert_one_sentence(&out);
    }
    let out = brisk(&["run", "--guest", "mwait", "--mwait", "hide"]);
    assert_eq!(
        out.status.code(),
        Some((0x12 << 1) | 1),
        "hidden: not tried"
    );
    let out = brisk(&["run", "--guest", "mwait", "--mwait", "passthrough"]);
    match out.status.code() {
        Some(4) => {
            assert!(text(&out.stderr).contains("--mwait passthrough is not available"));
            assert_one_sentence(&out);
        }
        other => assert_eq!(other, Some((0x11 << 1) | 1), "{}", text(&out.stderr)),
    }
}

#[test]
fn kernel_files_that_cannot_be_booted_are_refused_with_one_sentence() {
    require_kvm!();
    let junk = std::env::temp_dir().join(format!("brisk-cli-junk-{}", std::process::id()));
    std::fs::write(&junk, "#!/bin/sh\necho not a kernel\n").unwrap();
    let path = junk.to_str().unwrap();
    let out = brisk(&["run", "--kernel", path]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(path), "names the file");
    assert!(text(&out.stderr)
        .contains("is not a Linux bzImage, a 64-bit ELF vmlinux or a multiboot kernel"));
    assert_one_sentence(&out);
    // brisk's own irqchip takes kernels too: the file is what is refused.
    let out = brisk(&["run", "--kernel", path, "--irqchip", "user"]);
    assert_eq!(out.status.code(), Some(6));
    assert!(text(&out.stderr).contains("is not a Linux bzImage"));
    assert_one_sentence(&out);
    let out = brisk(&["run", "--kernel", path, "--guest", "spin"]);
    assert_eq!(out.status.code(), Some(2), "--kernel and --guest conflict");
    std::fs::remove_file(junk).unwrap();
}

/// Finding 9 of the control-plane review: a vCPU blocked writing guest
/// output to a full stdout pipe (nobody reads it) does not keep brisk from
/// ending: SIGTERM ends it with status 143, and the stuck vCPU is named.
#[test]
fn a_full_stdout_pipe_does_not_keep_brisk_running() {
    require_kvm!();
    use std::os::fd::AsRawFd;
    let mut child = Command::new(env!("CARGO_BIN_EXE_brisk"))
        .args(["run", "--guest", "flood", "--cpus", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped()) // never read
        .stderr(Stdio::piped())
        .spawn()
        .expect("brisk runs");
    let out = child.stdout.take().unwrap();
    // SAFETY: fcntl and ioctl on our own pipe's read end.
    let size = unsafe { libc::fcntl(out.as_raw_fd(), libc::F_GETPIPE_SZ) };
    assert!(size > 0);
    let full = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        unsafe { libc::ioctl(out.as_raw_fd(), libc::FIONREAD, &mut queued) };
        if queued >= size {
            break; // the guest's next byte blocks its vCPU thread
        }
        assert!(std::time::Instant::now() < full, "the pipe never filled");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "stderr: {err}");
    assert!(err.contains("vCPU 0 did not stop"), "stderr: {err}");
    drop(out);
}

/// The counting guests take their length on the command line.
#[test]
fn counting_guests_take_their_length() {
    require_kvm!();
    let out = brisk(&[
        "run",
        "--guest",
        "tick=3",
        "--cpus",
        "2",
        "--timeout",
        "60s",
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    for bad in ["tick=0", "tick=x", "hello=2", "pingpong=-1"] {
        let out = brisk(&["run", "--guest", bad]);
        assert_eq!(out.status.code(), Some(6), "{bad}");
        assert_one_sentence(&out);
    }
}

/// brisk's stdin is the guest's console: the uartirq test kernel takes the
/// UART's receive interrupt (IRQ 4 through the IOAPIC) for what is typed.
#[test]
fn stdin_reaches_the_guest_through_the_uart_interrupt() {
    require_kvm!();
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_brisk"))
        .args([
            "run",
            "--kernel",
            brisk_test_kernels::UARTIRQ,
            "--timeout",
            "120s",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("brisk runs");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("ready for input") {
        line.clear();
        assert_ne!(out.read_line(&mut line).unwrap(), 0, "brisk ended early");
    }
    child.stdin.as_mut().unwrap().write_all(b"ping").unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{rest}"); // debug-exit 0: pass
    assert!(rest.contains("got 'ping'"), "{rest}");
}

/// M:N as the user runs it: 64 `tick` vCPUs on two pool threads
/// run to the end, and while they run the process holds the pool, its
/// slicer and a handful of others, not a thread per vCPU.
#[test]
fn sixty_four_vcpus_on_two_threads_run_with_a_handful_of_threads() {
    require_kvm!();
    let mut child = Command::new(env!("CARGO_BIN_EXE_brisk"))
        .args([
            "run",
            "--guest",
            "tick=2000",
            "--cpus",
            "64",
            "--vcpu-threads",
            "2",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let tasks = format!("/proc/{}/task", child.id());
    let names = || -> Vec<String> {
        std::fs::read_dir(&tasks)
            .map(|d| {
                d.flatten()
                    .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                    .map(|n| n.trim().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    // Once the pool runs (its threads exist until the guest ends).
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut seen = names();
    while !seen.iter().any(|n| n == "vcpu-pool1") {
        assert!(
            child.try_wait().unwrap().is_none(),
            "ended before its pool ran"
        );
        assert!(
            std::time::Instant::now() < until,
            "no pool threads: {seen:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
        seen = names();
    }
    assert!(seen.len() <= 8, "{} threads: {seen:?}", seen.len());
    assert!(!seen
        .iter()
        .any(|n| n.starts_with("vcpu") && n[4..].starts_with(|c: char| c.is_ascii_digit())));
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

#[test]
fn vcpu_threads_is_refused_in_one_sentence_where_it_cannot_work() {
    for (args, needle) in [
        (
            &[
                "run",
                "--guest",
                "halt",
                "--cpus",
                "2",
                "--vcpu-threads",
                "3",
            ][..],
            "--vcpu-threads 3 for 2 vCPUs",
        ),
        (
            &[
                "run",
                "--guest",
                "halt",
                "--irqchip",
                "kernel",
                "--vcpu-threads",
                "1",
            ][..],
            "needs --irqchip user",
        ),
    ] {
        let out = brisk(args);
        assert_eq!(out.status.code(), Some(6), "{args:?}");
        assert_one_sentence(&out);
        assert!(text(&out.stderr).contains(needle), "{}", text(&out.stderr));
    }
}

/// `brisk stress --vcpu-threads 2` passes (the detector included).
#[test]
fn stress_on_a_pool_passes() {
    require_kvm!();
    let out = brisk(&[
        "stress",
        "--vcpu-threads",
        "2",
        "--cpus",
        "6",
        "--ops",
        "5000",
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("lost-wake-up detector: PASS"));
}
