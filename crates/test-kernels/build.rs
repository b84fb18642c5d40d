//! Builds the test kernels with `src/c/build.sh` (gcc -m32, ld) into OUT_DIR.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let script = PathBuf::from("src/c/build.sh");
    println!("cargo:rerun-if-changed=src/c");
    let status = Command::new("sh").arg(&script).arg(&out).status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("src/c/build.sh failed ({s}): the test kernels need gcc with -m32 support and binutils (apt-get install gcc binutils)"),
        Err(e) => panic!("cannot run sh src/c/build.sh: {e}"),
    }
}
