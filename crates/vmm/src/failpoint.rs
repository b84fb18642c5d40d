//! Test-only fault injection: a panic armed by a unit test and hit once
//! where brisk must survive one (a snapshot's save, a migration's stopped
//! phase). Compiled into test builds only.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

use crate::{Output, Vm, VmConfig};

/// A place a test can make panic, once.
pub(crate) struct Failpoint {
    armed: AtomicBool,
    what: &'static str,
}

impl Failpoint {
    pub(crate) const fn new(what: &'static str) -> Failpoint {
        Failpoint {
            armed: AtomicBool::new(false),
            what,
        }
    }

    /// Make the next [`Failpoint::hit`] panic.
    pub(crate) fn arm(&self) {
        self.armed.store(true, SeqCst);
    }

    /// Panic if armed (once).
    pub(crate) fn hit(&self) {
        if self.armed.swap(false, SeqCst) {
            panic!("injected into {}", self.what);
        }
    }
}

/// The spin guest on one vCPU, running.
pub(crate) fn spin_vm() -> Vm {
    let config = VmConfig {
        payload: crate::Payload::builtin("spin"),
        cpus: 1,
        ..VmConfig::default()
    };
    Vm::start(&config, Output::Null).unwrap()
}
