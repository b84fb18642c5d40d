//! The destination side: wait for a source, fill RAM from its pages, and
//! start the VM from its state once it commits.
//!
//! Nothing the source sends is trusted for where it comes from: every
//! message passes [`Intake`]'s checks before it touches RAM, a Zero never
//! faults a page in (fresh RAM is zero already; a page written before is
//! given back to the host), the RAM a source may make this process commit
//! is bounded ([`RestoreOptions::max_memory`]), and disk paths it names
//! are opened only with [`RestoreOptions::trust_disk_paths`].

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::wire::{
    never, printable, Bound, Kind, MigrationUrl, Stream, WireError, PARTING_BOUND, PROTOCOL_VERSION,
};
use super::Hello;
use crate::snapshot::{cannot_build_here, check_state, check_trusted, file, SavedVm};
use crate::vm::{Boot, Machine};
use crate::{Interruption, Output, ReceiveError, RestoreOptions, StartError, Vm, VmConfig};

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

impl Listener {
    fn bind(url: &MigrationUrl) -> Result<Listener, StartError> {
        let io = |source: std::io::Error| ReceiveError::Listen {
            url: url.to_string(),
            source,
        };
        Ok(match url {
            MigrationUrl::Unix(p) => {
                if p.symlink_metadata().is_ok() {
                    return Err(ReceiveError::SocketExists {
                        url: url.to_string(),
                        path: p.clone(),
                    }
                    .into());
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
                return Err(Interruption::WaitingForSource.into());
            }
            let got = match self {
                Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
                Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            };
            match got {
                Ok(s) => return s.prepare().map_err(|e| ReceiveError::Stream(e).into()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReceiveError::Accept(e).into()),
            }
        }
    }
}

/// Why the receiver refused what the source sent.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("the source sent {0:?} before Hello")]
    NoHello(Kind),
    #[error("the source's Hello does not parse: {0}")]
    Hello(#[source] serde_json::Error),
    #[error(
        "the source speaks migration protocol version {0}; this brisk speaks {PROTOCOL_VERSION}"
    )]
    Version(u32),
    #[error("a local upgrade must come with the guest's memory fd (and only then)")]
    LocalFd,
    #[error("the source's configuration is not valid: {0}")]
    Config(#[source] crate::ConfigError),
    #[error("{0}")]
    Untrusted(#[source] Box<StartError>),
    #[error("a local upgrade hands guest memory over: the source may not write pages into it")]
    PagesIntoLocal,
    #[error("a {0:?} message too short for its guest address")]
    Short(Kind),
    #[error(
        "a {kind:?} message for {len:#x} bytes at {at:#x}: not whole pages inside one RAM region"
    )]
    Range { kind: Kind, at: u64, len: u64 },
    #[error("the source's state: {0}")]
    State(#[source] Box<StartError>),
    #[error("the source's state does not parse: {0}")]
    StateFormat(#[source] crate::snapshot::file::FormatError),
    #[error("the state's configuration differs from the Hello's")]
    StateConfig,
    #[error("the source's state names diff snapshot layers; a migration sends all of RAM")]
    Layers,
    #[error("the source gave up: {0}")]
    GaveUp(String),
    #[error("unexpected {0:?} from the source")]
    Unexpected(Kind),
}

/// What to do with one message after Hello.
pub enum Step<'a> {
    /// Copy these bytes into RAM at this guest address.
    Write { at: u64, data: &'a [u8] },
    /// These pages are zero: give them back (never write zeros).
    Discard { at: u64, len: u64 },
    /// The VM's state: restore it.
    State(Box<SavedVm>),
}

/// The checks a source's messages pass before they touch anything
/// (pure: no KVM, no files; the `migration` fuzz target drives it).
pub struct Intake {
    config: VmConfig,
    regions: Vec<(u64, u64)>,
    local: bool,
}

impl Intake {
    /// Check the Hello (`with_fd`: a descriptor came with it) against
    /// what this receiver accepts.
    pub fn hello(body: &[u8], with_fd: bool, opts: &RestoreOptions) -> Result<Intake, IntakeError> {
        let hello: Hello = serde_json::from_slice(body).map_err(IntakeError::Hello)?;
        if hello.version != PROTOCOL_VERSION {
            return Err(IntakeError::Version(hello.version));
        }
        if hello.local != with_fd {
            return Err(IntakeError::LocalFd);
        }
        let mut config = hello.config;
        config.seccomp = opts.seccomp;
        // What the source may not ask of this host comes first: it says
        // more than whether the configuration would make sense.
        check_trusted(&config, opts).map_err(|e| IntakeError::Untrusted(Box::new(e)))?;
        config.validate().map_err(IntakeError::Config)?;
        Ok(Intake {
            regions: brisk_boot::layout::ram_regions(config.memory),
            config,
            local: hello.local,
        })
    }

    /// The configuration the Hello brought.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Check one message after Hello.
    pub fn step<'a>(&self, kind: Kind, body: &'a [u8]) -> Result<Step<'a>, IntakeError> {
        match kind {
            Kind::Pages | Kind::Zero if self.local => Err(IntakeError::PagesIntoLocal),
            Kind::Pages => {
                let (at, data) = split_addr(kind, body)?;
                self.check_range(kind, at, data.len() as u64)?;
                Ok(Step::Write { at, data })
            }
            Kind::Zero => {
                let (at, rest) = split_addr(kind, body)?;
                let len = rest
                    .try_into()
                    .map(u64::from_le_bytes)
                    .map_err(|_| IntakeError::Short(kind))?;
                self.check_range(kind, at, len)?;
                Ok(Step::Discard { at, len })
            }
            Kind::State => {
                let mut state: SavedVm = file::parse(body).map_err(IntakeError::StateFormat)?;
                state.config.seccomp = self.config.seccomp;
                if serde_json::to_value(&state.config).ok()
                    != serde_json::to_value(&self.config).ok()
                {
                    return Err(IntakeError::StateConfig);
                }
                check_state(&state).map_err(|e| IntakeError::State(Box::new(e)))?;
                // A migration carries all of RAM in its pages: layers of
                // files the destination does not have cannot be a state.
                if !state.layers.is_empty() {
                    return Err(IntakeError::Layers);
                }
                Ok(Step::State(Box::new(state)))
            }
            Kind::Abort => Err(IntakeError::GaveUp(printable(body))),
            other => Err(IntakeError::Unexpected(other)),
        }
    }

    /// Whole pages, non-empty, inside one RAM region.
    fn check_range(&self, kind: Kind, at: u64, len: u64) -> Result<(), IntakeError> {
        let page = brisk_kvm::PAGE_SIZE as u64;
        let inside = self.regions.iter().any(|&(start, size)| {
            at >= start && at.checked_add(len).is_some_and(|end| end <= start + size)
        });
        if len == 0 || at % page != 0 || len % page != 0 || !inside {
            return Err(IntakeError::Range { kind, at, len });
        }
        Ok(())
    }
}

fn split_addr(kind: Kind, body: &[u8]) -> Result<(u64, &[u8]), IntakeError> {
    let (a, rest) = body
        .split_first_chunk::<8>()
        .ok_or(IntakeError::Short(kind))?;
    Ok((u64::from_le_bytes(*a), rest))
}

impl Vm {
    /// Listen on `url`, take one migration, and return the VM running
    /// here (`brisk run --receive-migration`). Anything wrong with the
    /// stream (another protocol version, a bad page, a state KVM refuses,
    /// the source giving up, going away or stalling past a message's
    /// bound) is refused in one sentence and leaves nothing behind: no
    /// VM, no socket. `abort` (a signal, --timeout) ends any wait at once.
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
            let bound = Bound::within(PARTING_BOUND, &never);
            let _ = s.send(Kind::Abort, &[e.to_string().as_bytes()], &bound);
        }
        r
    }
}

/// A stream failure as the receiver reports it: a cancel is the caller's
/// abort (its signal or timeout), anything else a refusal.
fn stream_err(e: WireError) -> StartError {
    match e {
        WireError::Cancelled => Interruption::Receiving.into(),
        e => ReceiveError::Stream(e).into(),
    }
}

fn receive(
    s: &mut Stream,
    output: Output,
    opts: RestoreOptions,
    abort: &dyn Fn() -> bool,
) -> Result<Vm, StartError> {
    let intake_err = |e: IntakeError| match e {
        IntakeError::Untrusted(e) => *e,
        e => ReceiveError::Intake(e).into(),
    };
    let hello = s.recv(&Bound::message(abort, None)).map_err(stream_err)?;
    if hello.kind != Kind::Hello {
        return Err(intake_err(IntakeError::NoHello(hello.kind)));
    }
    let intake = Intake::hello(&hello.body, hello.fd.is_some(), &opts).map_err(intake_err)?;
    if let Some(f) = &hello.fd {
        brisk_kvm::check_memfd_sealed(f).map_err(ReceiveError::Memfd)?;
    }
    let m = Machine::assemble(intake.config(), output, Boot::Receive(hello.fd.as_ref()))
        .map_err(|e| cannot_build_here(e, "the source's VM"))?;
    // Built (KVM's VM, vCPUs, devices): the source may start, and its
    // downtime does not pay for this.
    s.send(Kind::Ready, &[], &Bound::message(abort, None))
        .map_err(stream_err)?;
    let (mut pages, mut zeroed) = (0u64, 0u64);
    loop {
        let msg = s.recv(&Bound::message(abort, None)).map_err(stream_err)?;
        match intake.step(msg.kind, &msg.body).map_err(intake_err)? {
            // Zeros are never written: a source sending pages of zeros
            // (rather than Zero) must not make this process commit RAM.
            Step::Write { at, data } if crate::snapshot::memory::is_zero(data) => {
                m.kvm
                    .discard(at, data.len() as u64)
                    .map_err(|e| ReceiveError::Pages {
                        at,
                        source: Box::new(e),
                    })?;
                zeroed += data.len() as u64 / 4096;
            }
            Step::Write { at, data } => {
                m.kvm
                    .memory()
                    .write_slice(data, GuestAddress(at))
                    .map_err(|e| ReceiveError::Pages {
                        at,
                        source: Box::new(e),
                    })?;
                pages += data.len() as u64 / 4096;
            }
            Step::Discard { at, len } => {
                m.kvm.discard(at, len).map_err(|e| ReceiveError::Pages {
                    at,
                    source: Box::new(e),
                })?;
                zeroed += len / 4096;
            }
            Step::State(state) => {
                log::debug!("migration: {pages} pages received, {zeroed} zeroed; the state came");
                let paused = RestoreOptions {
                    paused: true,
                    ..opts
                };
                let vm = Vm::restore_into(m, *state, paused)?;
                return commit(s, vm, opts.paused, abort);
            }
        }
    }
}

/// Restored and paused: say Ready, run once the source commits.
fn commit(
    s: &mut Stream,
    vm: Vm,
    paused: bool,
    abort: &dyn Fn() -> bool,
) -> Result<Vm, StartError> {
    s.send(Kind::Ready, &[], &Bound::message(abort, None))
        .map_err(stream_err)?;
    let m = s.recv(&Bound::message(abort, None)).map_err(stream_err)?;
    match m.kind {
        Kind::Commit => {
            // The source has let its disk locks go: take them. Another
            // process that took one in between is reported; the guest,
            // ended at the source, still runs here rather than nowhere.
            if let Err(e) = vm.disk_locks.acquire(&vm.config().disks) {
                log::error!("the migrated VM runs without its disk locks: {e}");
            }
            let source_paused = m.body.first().is_some_and(|&b| b != 0);
            if !(paused || source_paused) {
                vm.resume().map_err(ReceiveError::Resume)?;
            }
            let _ = s.send(Kind::Running, &[], &Bound::within(PARTING_BOUND, &never));
            Ok(vm)
        }
        Kind::Abort => Err(ReceiveError::SourceGaveUp(printable(&m.body)).into()),
        k => Err(ReceiveError::NoCommit(k).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(local: bool, memory: u64) -> Vec<u8> {
        let config = VmConfig {
            payload: crate::Payload::builtin("spin"),
            cpus: 1,
            memory,
            ..VmConfig::default()
        };
        serde_json::to_vec(&Hello {
            version: PROTOCOL_VERSION,
            config,
            local,
        })
        .unwrap()
    }

    fn at(addr: u64, rest: &[u8]) -> Vec<u8> {
        let mut b = addr.to_le_bytes().to_vec();
        b.extend_from_slice(rest);
        b
    }

    #[test]
    fn every_message_is_checked_before_it_touches_ram() {
        let opts = RestoreOptions::default();
        let intake = Intake::hello(&hello(false, 64 << 20), false, &opts).unwrap();
        let page = [7u8; 4096];
        assert!(matches!(
            intake.step(Kind::Pages, &at(0x1000, &page)),
            Ok(Step::Write { at: 0x1000, .. })
        ));
        for (kind, body) in [
            (Kind::Pages, at(64 << 20, &page)),
            (Kind::Pages, at((64 << 20) - 4096, &[page, page].concat())),
            (Kind::Pages, at(0x1001, &page)),
            (Kind::Pages, at(0, &page[..100])),
            (Kind::Zero, at(u64::MAX - 4095, &4096u64.to_le_bytes())),
            (Kind::Zero, at(0, &0u64.to_le_bytes())),
            (Kind::Zero, at(0, &100u64.to_le_bytes())),
        ] {
            assert!(
                matches!(intake.step(kind, &body), Err(IntakeError::Range { .. })),
                "{kind:?} at {:#x}",
                u64::from_le_bytes(body[..8].try_into().unwrap())
            );
        }
        assert!(matches!(
            intake.step(Kind::Zero, &[0; 4]),
            Err(IntakeError::Short(_))
        ));
        assert!(matches!(
            intake.step(Kind::Commit, &[0]),
            Err(IntakeError::Unexpected(_))
        ));
        let e = intake.step(Kind::Abort, b"\x1b[2Jno").err().unwrap();
        assert!(!e.to_string().contains('\x1b'), "{e}");
    }

    #[test]
    fn a_local_upgrade_takes_no_pages_and_claims_are_bounded() {
        let opts = RestoreOptions::default();
        let local = Intake::hello(&hello(true, 64 << 20), true, &opts).unwrap();
        for kind in [Kind::Pages, Kind::Zero] {
            let body = at(0, &[0; 4096]);
            assert!(matches!(
                local.step(kind, &body),
                Err(IntakeError::PagesIntoLocal)
            ));
        }
        assert!(matches!(
            Intake::hello(&hello(true, 64 << 20), false, &opts),
            Err(IntakeError::LocalFd)
        ));
        let small = RestoreOptions {
            max_memory: Some(32 << 20),
            ..opts
        };
        assert!(matches!(
            Intake::hello(&hello(false, 64 << 20), false, &small),
            Err(IntakeError::Untrusted(_))
        ));
    }
}
