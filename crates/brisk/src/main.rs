//! The `brisk` command: a thin layer over `brisk-vmm`.

/// `eprintln!` that never panics: a closed stderr (a log pipe whose
/// reader died, `brisk ... 2>&1 | head`) must not turn a message into a
/// panic, a wrong exit status, or a half-done shutdown.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// `println!` that never panics on a closed stdout (`brisk guests | head -1`).
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

mod cli;
mod console;
mod ctl;
mod firecracker;
mod signals;
mod status;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // glibc reads /proc/sys/vm/overcommit_memory the first time it gives
    // back the top of a thread's heap, and a thread under its seccomp
    // filter may not open files (the I/O thread was stopped for it after
    // closing a vsock connection): thread heaps keep their memory for
    // reuse instead (guest RAM is mapped apart, and is not affected).
    // SAFETY: mallopt only sets an allocator parameter, before any thread.
    unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) };
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help and --version are "errors" that print and exit 0.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                status::USAGE as u8
            } else {
                0
            });
        }
    };
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("BRISK_LOG", cli.log_level()))
        .format_timestamp_micros()
        .init();
    ExitCode::from(cli.execute() as u8)
}
