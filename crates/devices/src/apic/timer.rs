//! The LAPIC timers' thread: one per VM, sleeping (never spinning) until
//! the earliest armed LAPIC timer is due, then letting that LAPIC fire.
//!
//! One slot per LAPIC, so a guest re-arming its timer as fast as it can
//! replaces its slot instead of growing a queue.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use super::Lapics;

#[derive(Default)]
struct Slots {
    due: Vec<Option<Instant>>,
    shutdown: bool,
}

/// When each LAPIC's timer is due; the LAPICs arm and disarm it.
#[derive(Default)]
pub(crate) struct TimerQueue {
    slots: Mutex<Slots>,
    cv: Condvar,
}

impl TimerQueue {
    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn arm(&self, lapic: usize, at: Instant) {
        let mut s = self.lock();
        if s.due.len() <= lapic {
            s.due.resize(lapic + 1, None);
        }
        let earlier = s.due.iter().flatten().all(|&d| at < d);
        s.due[lapic] = Some(at);
        drop(s);
        if earlier {
            self.cv.notify_one();
        }
    }

    pub(crate) fn disarm(&self, lapic: usize) {
        if let Some(slot) = self.lock().due.get_mut(lapic) {
            *slot = None;
        }
    }
}

/// The thread; dropping this stops and joins it.
pub(crate) struct TimerThread {
    queue: Arc<TimerQueue>,
    thread: Option<JoinHandle<()>>,
}

impl TimerThread {
    pub(crate) fn start(
        queue: Arc<TimerQueue>,
        lapics: Arc<Lapics>,
        init: Box<dyn FnOnce() + Send>,
    ) -> std::io::Result<TimerThread> {
        let q = queue.clone();
        let thread = std::thread::Builder::new()
            .name("lapic-timer".into())
            .spawn(move || {
                init();
                serve(&q, &lapics)
            })?;
        Ok(TimerThread {
            queue,
            thread: Some(thread),
        })
    }
}

fn serve(q: &TimerQueue, lapics: &Lapics) {
    let mut s = q.lock();
    loop {
        if s.shutdown {
            return;
        }
        let now = Instant::now();
        let due: Vec<(usize, Instant)> = s
            .due
            .iter_mut()
            .enumerate()
            .filter_map(|(i, d)| match *d {
                Some(at) if at <= now => d.take().map(|at| (i, at)),
                _ => None,
            })
            .collect();
        if due.is_empty() {
            s = match s.due.iter().flatten().min().copied() {
                Some(next) => {
                    q.cv.wait_timeout(s, next - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => q.cv.wait(s).unwrap_or_else(|p| p.into_inner()),
            };
            continue;
        }
        // Fire without the queue's lock: a LAPIC arms under its own lock
        // and then takes this one.
        drop(s);
        for (i, at) in due {
            if let Some(l) = lapics.get(i) {
                l.timer_expired(at);
            }
        }
        s = q.lock();
    }
}

impl Drop for TimerThread {
    fn drop(&mut self) {
        self.queue.lock().shutdown = true;
        self.queue.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
