//! The synchronisation primitives the protocol uses: std's, or loom's when
//! built with `--cfg loom` for the model check (`tests/model.rs`).
//!
//! Statistics counters stay std atomics in both builds: they never order
//! anything, and leaving them out of the model keeps its state space small.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU8};
#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU8};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

#[cfg(loom)]
pub(crate) use loom::thread::yield_now;
#[cfg(not(loom))]
pub(crate) use std::thread::yield_now;

#[cfg(loom)]
pub(crate) type JoinHandle = loom::thread::JoinHandle<()>;
#[cfg(not(loom))]
pub(crate) type JoinHandle = std::thread::JoinHandle<()>;

/// Start a named thread (a loom thread in the model, which has no names).
pub(crate) fn spawn(
    name: String,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle> {
    #[cfg(loom)]
    {
        let _ = name;
        Ok(loom::thread::spawn(f))
    }
    #[cfg(not(loom))]
    std::thread::Builder::new().name(name).spawn(f)
}

use std::time::Duration;

/// Sits between the two halves of each Dekker pair (a SeqCst store, then a
/// SeqCst load of another location). Rust's SeqCst accesses already forbid
/// both loads missing both stores, so in a normal build this is nothing and
/// the exit path carries no extra fence. loom approximates SeqCst accesses
/// as acquire/release (its README: "false alarms") but models SeqCst fences
/// exactly, so under loom this is `fence(SeqCst)`, restoring the guarantee
/// the real build has.
#[inline(always)]
pub(crate) fn dekker_fence() {
    #[cfg(loom)]
    loom::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

/// Lock, ignoring poison: the state behind these locks is plain flags and
/// queues that stay meaningful if a holder panicked.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Wait on `cv` until `done` or until `timeout` has passed (re-checking
/// after every wake-up). Under loom, timeouts are not modelled: a wait that
/// never ends shows up as a deadlock, which is what the model looks for.
pub(crate) fn wait_until<'a, T>(
    cv: &Condvar,
    mut guard: MutexGuard<'a, T>,
    deadline: crate::Deadline,
    mut done: impl FnMut(&mut T) -> bool,
) -> MutexGuard<'a, T> {
    while !done(&mut guard) {
        let left: Duration = deadline.remaining();
        if left.is_zero() {
            break;
        }
        guard = cv
            .wait_timeout(guard, left)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
    }
    guard
}

/// One wait on `cv` (the caller re-checks what it waits for).
pub(crate) fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(|p| p.into_inner())
}

/// One wait on `cv` of at most `timeout` (under loom: a plain wait).
pub(crate) fn wait_timeout<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> MutexGuard<'a, T> {
    cv.wait_timeout(guard, timeout)
        .map(|(g, _)| g)
        .unwrap_or_else(|p| p.into_inner().0)
}

/// Wait on `cv` (no deadline) until `done`.
pub(crate) fn wait_while<'a, T>(
    cv: &Condvar,
    mut guard: MutexGuard<'a, T>,
    mut blocked: impl FnMut(&mut T) -> bool,
) -> MutexGuard<'a, T> {
    while blocked(&mut guard) {
        guard = cv.wait(guard).unwrap_or_else(|p| p.into_inner());
    }
    guard
}
