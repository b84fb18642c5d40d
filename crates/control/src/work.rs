//! Queued closures and their tickets: what `run_on_async`, `run_when_idle`
//! and idle groups queue, and what their callers wait on.

use std::sync::Arc;

use crate::oneshot::{self, RecvError};
use crate::{Deadline, Error, Op};

/// A queued closure; it is given the id of the vCPU that runs it.
pub(crate) type Work<G> = Box<dyn FnOnce(&mut G, usize) + Send>;

/// What a queued closure sends back: its result, or the vCPU it panicked
/// on and the panic's message.
pub(crate) type Outcome<R> = Result<R, (usize, String)>;

/// Which vCPUs a queued closure may run on.
pub(crate) enum Who {
    One(usize),
    AnyOf(Arc<[usize]>),
}

/// The pending result of [`VcpuCtl::run_on_async`] and the idle queues.
pub struct RunOnTicket<R> {
    who: Who,
    rx: oneshot::Receiver<Outcome<R>>,
}

/// Wrap `f` so that it sends its result, or its panic, on `tx`. A panic in
/// a controller's closure is the controller's bug: it is reported to the
/// waiter and the vCPU goes on (the guest's state is whatever `f` left).
pub(crate) fn work<G, R, F>(f: F, tx: oneshot::Sender<Outcome<R>>) -> Work<G>
where
    F: FnOnce(&mut G) -> R + Send + 'static,
    R: Send + 'static,
{
    Box::new(move |g: &mut G, vcpu: usize| {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(g)));
        tx.send(r.map_err(|p| (vcpu, panic_message(&*p))));
    })
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-string payload".into())
}

impl<R> RunOnTicket<R> {
    pub(crate) fn new(who: Who, rx: oneshot::Receiver<Outcome<R>>) -> Self {
        RunOnTicket { who, rx }
    }

    /// Wait for the closure's result.
    pub fn wait(self, deadline: Deadline) -> Result<R, Error> {
        let ids = match &self.who {
            Who::One(id) => std::slice::from_ref(id),
            Who::AnyOf(ids) => &ids[..],
        };
        match self.rx.recv(deadline) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err((vcpu, message))) => Err(Error::Panicked {
                op: Op::RunOn,
                vcpu,
                message,
            }),
            Err(RecvError::Timeout) => Err(Error::Timeout {
                op: Op::RunOn,
                vcpus: ids.to_vec(),
            }),
            // The work item was dropped unrun: the thread(s) left the loop.
            Err(RecvError::Closed) => Err(Error::Exited {
                op: Op::RunOn,
                vcpu: ids[0],
            }),
        }
    }
}
