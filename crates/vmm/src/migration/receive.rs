//! The destination side: wait for a source, fill RAM from its pages, and
//! start the VM from its state once it commits.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::wire::{Kind, MigrationUrl, Stream, PROTOCOL_VERSION};
use super::Hello;
use crate::snapshot::{check_state, file, VmState};
use crate::vm::{Boot, Machine};
use crate::{Output, RestoreOptions, StartError, Vm};

/// How often a wait for the source asks the caller's abort.
const POLL: Duration = Duration::from_millis(100);

/// A listening socket; a Unix one is removed when dropped.
enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn refused(why: impl Into<String>) -> StartError {
    StartError::Snapshot(why.into())
}

impl Listener {
    fn bind(url: &MigrationUrl) -> Result<Listener, StartError> {
        let io = |e: std::io::Error| refused(format!("cannot listen on {url}: {e}"));
        Ok(match url {
            MigrationUrl::Unix(p) => {
                if p.symlink_metadata().is_ok() {
                    return Err(refused(format!(
                        "cannot listen on {url}: {} exists (brisk removes only sockets it made)",
                        p.display()
                    )));
                }
                let l = UnixListener::bind(p).map_err(io)?;
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600));
                l.set_nonblocking(true).map_err(io)?;
                Listener::Unix(l, p.clone())
            }
            MigrationUrl::Tcp(a) => {
                let l = TcpListener::bind(a).map_err(io)?;
                l.set_nonblocking(true).map_err(io)?;
                Listener::Tcp(l)
            }
        })
    }

    /// The first connection, asking `abort` every POLL.
    fn accept(&self, abort: &dyn Fn() -> bool) -> Result<Stream, StartError> {
        loop {
            if abort() {
                return Err(StartError::Interrupted(
                    "stopped while waiting for the migration's source".into(),
                ));
            }
            let got = match self {
                Listener::Unix(l, _) => l.accept().map(|(s, _)| {
                    let _ = s.set_nonblocking(false);
                    Stream::Unix(s)
                }),
                Listener::Tcp(l) => l.accept().map(|(s, _)| {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                }),
            };
            match got {
                Ok(s) => {
                    s.set_timeouts()
                        .map_err(|e| refused(format!("migration stream: {e}")))?;
                    return Ok(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(refused(format!("accepting the migration: {e}"))),
            }
        }
    }
}

impl Vm {
    /// Listen on `url`, take one migration, and return the VM running
    /// here (`brisk run --receive-migration`). Anything wrong with the
    /// stream (another protocol version, a bad page, a state KVM refuses,
    /// the source giving up or going away) is refused in one sentence and
    /// leaves nothing behind: no VM, no socket.
    pub fn receive_migration(
        url: &MigrationUrl,
        output: Output,
        opts: RestoreOptions,
        abort: &dyn Fn() -> bool,
    ) -> Result<Vm, StartError> {
        let listener = Listener::bind(url)?;
        log::info!("listening for a migration on {url}");
        let mut s = listener.accept(abort)?;
        drop(listener);
        let r = receive(&mut s, output, opts, abort);
        if let Err(e) = &r {
            let _ = s.send(Kind::Abort, &[e.to_string().as_bytes()]);
        }
        r
    }
}

fn receive(
    s: &mut Stream,
    output: Output,
    opts: RestoreOptions,
    abort: &dyn Fn() -> bool,
) -> Result<Vm, StartError> {
    let (kind, body, fd) = s.recv().map_err(refused)?;
    if kind != Kind::Hello {
        return Err(refused(format!("the source sent {kind:?} before Hello")));
    }
    let hello: Hello = serde_json::from_slice(&body)
        .map_err(|e| refused(format!("the source's Hello does not parse: {e}")))?;
    if hello.version != PROTOCOL_VERSION {
        return Err(refused(format!(
            "the source speaks migration protocol version {}; this brisk speaks {PROTOCOL_VERSION}",
            hello.version
        )));
    }
    if hello.local != fd.is_some() {
        return Err(refused(
            "a local upgrade must come with the guest's memory fd (and only then)",
        ));
    }
    if let Some(f) = &fd {
        brisk_kvm::check_memfd_sealed(f).map_err(refused)?;
    }
    let mut config = hello.config;
    config.seccomp = opts.seccomp;
    config
        .validate()
        .map_err(|e| refused(format!("the source's configuration is not valid: {e}")))?;
    let m = Machine::assemble(&config, output, Boot::Receive(fd.as_ref()))?;
    // Built (KVM's VM, vCPUs, devices): the source may start, and its
    // downtime does not pay for this.
    s.send(Kind::Ready, &[])
        .map_err(|e| refused(format!("migration stream: {e}")))?;
    let zeros = vec![0u8; 1 << 20];
    let (mut pages, mut zeroed) = (0u64, 0u64);
    loop {
        if abort() {
            return Err(StartError::Interrupted(
                "stopped while receiving the migration".into(),
            ));
        }
        let (kind, body, _) = s.recv().map_err(refused)?;
        match kind {
            Kind::Pages => {
                let (at, data) = split_addr(&body)?;
                if data.is_empty() || data.len() % 4096 != 0 {
                    return Err(refused("a Pages message that is not whole pages"));
                }
                write(&m, at, data)?;
                pages += data.len() as u64 / 4096;
            }
            Kind::Zero => {
                let (at, len) = split_addr(&body)?;
                let len =
                    u64::from_le_bytes(len.try_into().map_err(|_| refused("a bad Zero message"))?);
                let mut done = 0u64;
                zeroed += len / 4096;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64) as usize;
                    write(&m, at.saturating_add(done), &zeros[..n])?;
                    done += n as u64;
                }
            }
            Kind::State => {
                log::debug!("migration: {pages} pages received, {zeroed} zeroed; the state came");
                let mut state: VmState =
                    file::parse(&body).map_err(|e| refused(format!("the source's state: {e}")))?;
                state.config.seccomp = opts.seccomp;
                if serde_json::to_value(&state.config).ok() != serde_json::to_value(&config).ok() {
                    return Err(refused(
                        "the state's configuration differs from the Hello's",
                    ));
                }
                check_state(&state)?;
                let paused = RestoreOptions {
                    paused: true,
                    ..opts
                };
                let vm = Vm::restore_into(m, state, paused)?;
                return commit(s, vm, opts.paused);
            }
            Kind::Abort => {
                return Err(refused(format!(
                    "the source gave up: {}",
                    String::from_utf8_lossy(&body)
                )))
            }
            other => return Err(refused(format!("unexpected {other:?} from the source"))),
        }
    }
}

/// Restored and paused: say Ready, run once the source commits.
fn commit(s: &mut Stream, vm: Vm, paused: bool) -> Result<Vm, StartError> {
    let io = |e: std::io::Error| refused(format!("migration stream: {e}"));
    s.send(Kind::Ready, &[]).map_err(io)?;
    match s.recv().map_err(refused)? {
        (Kind::Commit, body, _) => {
            let source_paused = body.first().is_some_and(|&b| b != 0);
            if !(paused || source_paused) {
                vm.resume().map_err(|e| refused(format!("resuming: {e}")))?;
            }
            let _ = s.send(Kind::Running, &[]);
            Ok(vm)
        }
        (Kind::Abort, why, _) => Err(refused(format!(
            "the source gave up: {}",
            String::from_utf8_lossy(&why)
        ))),
        (k, _, _) => Err(refused(format!("the source sent {k:?} instead of Commit"))),
    }
}

fn split_addr(body: &[u8]) -> Result<(u64, &[u8]), StartError> {
    if body.len() < 8 {
        return Err(refused("a message too short for its guest address"));
    }
    let (a, rest) = body.split_at(8);
    Ok((u64::from_le_bytes(a.try_into().expect("8 bytes")), rest))
}

fn write(m: &Machine, at: u64, data: &[u8]) -> Result<(), StartError> {
    m.kvm
        .memory()
        .write_slice(data, GuestAddress(at))
        .map_err(|e| {
            refused(format!(
                "the source sent pages outside guest RAM ({at:#x}): {e}"
            ))
        })
}
