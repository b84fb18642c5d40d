//! The VM behind the API: there from the start (`brisk run`), or brought
//! by `vm.restore` or `vm.receive-migration` to a brisk started with no VM
//! (`brisk run --api-socket PATH --wait-for-vm`, as cloud-hypervisor
//! started with only its API socket).
//!
//! The API thread does not build the VM itself: its seccomp filter does
//! not allow opening `/dev/kvm` or creating threads for vCPUs. It hands
//! the request to the thread that waits for a VM (brisk's main thread,
//! not yet filtered), which builds it and answers.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use brisk_vmm::{MigrationUrl, Vm};

/// How a VM is to be brought.
#[derive(Clone, Debug)]
pub enum Bring {
    /// `vm.restore`: from a snapshot directory.
    Restore { dir: PathBuf, paused: bool },
    /// `vm.receive-migration`: wait on the URL for a migration.
    Receive { url: MigrationUrl, paused: bool },
    /// Firecracker's `InstanceStart`: boot what its pre-boot calls
    /// configured.
    Start(Box<brisk_vmm::VmConfig>),
}

/// Why a VM was not brought.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BringError {
    #[error("a VM is already running in this brisk")]
    AlreadyRunning,
    #[error("this brisk takes no VM from the API (start it with --wait-for-vm)")]
    NotWaiting,
    #[error("a vm.restore or vm.receive-migration is already in progress")]
    InProgress,
    #[error("this brisk is shutting down")]
    ShuttingDown,
    /// The builder tried and failed.
    #[error(transparent)]
    Failed(Arc<brisk_vmm::StartError>),
}

/// A request to bring a VM, and where its builder answers.
pub type BringRequest = (Bring, Sender<Result<(), BringError>>);

/// The API's VM, once there is one.
pub struct VmSlot {
    vm: Mutex<Option<Arc<Vm>>>,
    /// Where requests to bring a VM go, while none is there.
    builder: Mutex<Option<Sender<BringRequest>>>,
    /// `vm.shutdown` came while there was no VM: whoever waits for one
    /// (and any migration it waits on) gives up.
    shutdown: AtomicBool,
    /// A request to bring a VM is being served: one at a time, so such
    /// requests (each holding a connection until answered, a receive for
    /// as long as no source comes) can never fill the API's slots.
    bringing: AtomicBool,
}

impl VmSlot {
    /// A slot holding `vm`.
    pub fn with(vm: Arc<Vm>) -> Arc<VmSlot> {
        Arc::new(VmSlot {
            vm: Mutex::new(Some(vm)),
            builder: Mutex::new(None),
            shutdown: AtomicBool::new(false),
            bringing: AtomicBool::new(false),
        })
    }

    /// An empty slot, and the requests to fill it (for the thread that
    /// builds the VM and then [`VmSlot::set`]s it).
    pub fn empty() -> (Arc<VmSlot>, Receiver<BringRequest>) {
        let (tx, rx) = mpsc::channel();
        let slot = VmSlot {
            vm: Mutex::new(None),
            builder: Mutex::new(Some(tx)),
            shutdown: AtomicBool::new(false),
            bringing: AtomicBool::new(false),
        };
        (Arc::new(slot), rx)
    }

    /// The VM, if there is one.
    pub fn get(&self) -> Option<Arc<Vm>> {
        self.vm.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Where the API's VM is in its life: `Configured` until one is
    /// built and put in.
    pub fn state(&self) -> brisk_vmm::VmState {
        self.get()
            .map_or(brisk_vmm::VmState::Configured, |vm| vm.state())
    }

    /// Put the VM in (the builder, once it runs); no more requests.
    pub fn set(&self, vm: Arc<Vm>) {
        *self.vm.lock().unwrap_or_else(|p| p.into_inner()) = Some(vm);
        *self.builder.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Let go of the VM (shutting down: its owner takes it back).
    pub fn take(&self) -> Option<Arc<Vm>> {
        self.vm.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// `vm.shutdown` with no VM: the wait for one ends (a pending
    /// `vm.receive-migration` included).
    pub fn request_shutdown(&self) {
        self.shutdown.store(true, SeqCst);
    }

    /// Whether `vm.shutdown` came while there was no VM.
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown.load(SeqCst)
    }

    /// Ask the builder for a VM and wait for its answer.
    pub(crate) fn bring(&self, what: Bring) -> Result<(), BringError> {
        if self.get().is_some() {
            return Err(BringError::AlreadyRunning);
        }
        let builder = self
            .builder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(builder) = builder else {
            return Err(BringError::NotWaiting);
        };
        if self.bringing.swap(true, SeqCst) {
            return Err(BringError::InProgress);
        }
        let (tx, rx) = mpsc::channel();
        let answer = match builder.send((what, tx)) {
            Ok(()) => match rx.recv() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(BringError::ShuttingDown),
            },
            Err(_) => Err(BringError::ShuttingDown),
        };
        self.bringing.store(false, SeqCst);
        answer
    }
}
