//! A whole `brisk run` process of this very binary, for the benchmarks
//! that time one from spawn to exit (boot, mn).

use std::process::{Child, Command, Stdio};

/// Why `brisk run` could not be started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpawnError {
    #[error("cannot find brisk's own executable: {0}")]
    Exe(#[source] std::io::Error),
    #[error("cannot spawn brisk run: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Start `brisk run ARGS`, its stdout to `stdout`, its stderr dropped.
pub(crate) fn brisk_run(args: &[String], stdout: Stdio) -> Result<Child, SpawnError> {
    let exe = std::env::current_exe().map_err(SpawnError::Exe)?;
    Command::new(exe)
        .arg("run")
        .args(args)
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .map_err(SpawnError::Spawn)
}
