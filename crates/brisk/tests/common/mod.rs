//! Shared by the CLI's test binaries.
#![allow(dead_code)]

pub mod harness;

use std::process::{Command, Output, Stdio};

pub use brisk_vmm::require_kvm;

/// Run `brisk ARGS` to its end, stdin empty.
pub fn brisk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_brisk"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("brisk runs")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
