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
