//! A one-value channel with a deadline, for `run_on` results (std's mpsc
//! `recv_timeout` has no loom model).

use std::sync::Arc;

use crate::sync::{lock, wait_until, Condvar, Mutex};
use crate::Deadline;

enum State<R> {
    Empty,
    Full(R),
    /// The sender was dropped without sending.
    Closed,
}

struct Slot<R> {
    state: Mutex<State<R>>,
    cv: Condvar,
}

pub(crate) struct Sender<R>(Arc<Slot<R>>);
pub(crate) struct Receiver<R>(Arc<Slot<R>>);

/// Why no value arrived.
pub(crate) enum RecvError {
    Timeout,
    Closed,
}

pub(crate) fn channel<R>() -> (Sender<R>, Receiver<R>) {
    let slot = Arc::new(Slot {
        state: Mutex::new(State::Empty),
        cv: Condvar::new(),
    });
    (Sender(slot.clone()), Receiver(slot))
}

impl<R> Sender<R> {
    pub(crate) fn send(self, value: R) {
        *lock(&self.0.state) = State::Full(value);
        self.0.cv.notify_all();
    }
}

impl<R> Drop for Sender<R> {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        if matches!(*state, State::Empty) {
            *state = State::Closed;
            self.0.cv.notify_all();
        }
    }
}

impl<R> Receiver<R> {
    pub(crate) fn recv(self, deadline: Deadline) -> Result<R, RecvError> {
        let guard = lock(&self.0.state);
        let mut guard = wait_until(&self.0.cv, guard, deadline, |s| !matches!(s, State::Empty));
        match std::mem::replace(&mut *guard, State::Closed) {
            State::Full(v) => Ok(v),
            State::Closed => Err(RecvError::Closed),
            State::Empty => {
                *guard = State::Empty;
                Err(RecvError::Timeout)
            }
        }
    }
}
