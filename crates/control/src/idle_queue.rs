//! The queue an idle group's members share (kept apart from `idle.rs`, so
//! that the control block can hold one without importing the group).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use crate::sync::{self, Mutex};
use crate::work::Work;

/// The queue members share. Lock order: a vCPU's own slow lock, then this.
pub(crate) struct SharedIdle<G> {
    pub(crate) queue: Mutex<VecDeque<Work<G>>>,
    /// Members whose thread has not exited; the last one out drops the queue.
    pub(crate) live: AtomicUsize,
}

impl<G> SharedIdle<G> {
    pub(crate) fn has_work(&self) -> bool {
        !sync::lock(&self.queue).is_empty()
    }

    pub(crate) fn pop(&self) -> Option<Work<G>> {
        sync::lock(&self.queue).pop_front()
    }

    /// A member's thread left its loop; returns the orphaned tasks if it
    /// was the last, so they are dropped (their tickets see Exited).
    pub(crate) fn member_exited(&self) -> VecDeque<Work<G>> {
        if self.live.fetch_sub(1, SeqCst) == 1 {
            std::mem::take(&mut *sync::lock(&self.queue))
        } else {
            VecDeque::new()
        }
    }
}
