//! Idle groups: low-priority work that runs on whichever member vCPU is
//! halted first (`run_when_idle(any, ...)`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use crate::idle_queue::SharedIdle;
use crate::oneshot;
use crate::sync::{self, Mutex};
use crate::work::{RunOnTicket, Who};
use crate::{Error, Mode, Op, VcpuCtl};

/// A set of vCPUs sharing one queue of idle-time tasks. A vCPU belongs to
/// at most one idle group; its own `run_when_idle` queue goes first.
pub struct IdleGroup<G> {
    members: Vec<Arc<VcpuCtl<G>>>,
    ids: Arc<[usize]>,
    shared: Arc<SharedIdle<G>>,
}

impl<G> IdleGroup<G> {
    /// Group `members`. Fails if there are none, or if one is already in
    /// an idle group (listed twice counts) or has exited; then no member is
    /// left bound to the group.
    pub fn new(members: Vec<Arc<VcpuCtl<G>>>) -> Result<Self, Error> {
        if members.is_empty() {
            return Err(Error::EmptyGroup);
        }
        let shared = Arc::new(SharedIdle {
            queue: Mutex::new(VecDeque::new()),
            live: AtomicUsize::new(0),
        });
        for (i, m) in members.iter().enumerate() {
            let mut slow = m.lock();
            let refused = if slow.exited {
                Some(Error::Exited {
                    op: Op::RunOn,
                    vcpu: m.id(),
                })
            } else if slow.idle_group.is_some() {
                Some(Error::AlreadyGrouped { vcpu: m.id() })
            } else {
                None
            };
            if let Some(e) = refused {
                drop(slow);
                Self::unbind(&members[..i], &shared);
                return Err(e);
            }
            // Counted under the member's lock, which its exit takes to
            // count itself out: a member that exits from here on is seen.
            slow.idle_group = Some(shared.clone());
            shared.live.fetch_add(1, SeqCst);
        }
        let ids = members.iter().map(|m| m.id()).collect();
        Ok(IdleGroup {
            members,
            ids,
            shared,
        })
    }

    /// Undo a partial `new`: members still bound to `shared` are freed.
    fn unbind(members: &[Arc<VcpuCtl<G>>], shared: &Arc<SharedIdle<G>>) {
        for m in members {
            let mut slow = m.lock();
            if slow
                .idle_group
                .as_ref()
                .is_some_and(|g| Arc::ptr_eq(g, shared))
            {
                slow.idle_group = None;
            }
        }
    }

    /// Queue `f` to run on the first member found halted (in user space).
    /// Never kicks or signals; halted members are woken with a futex.
    pub fn run_when_idle<R, F>(&self, f: F) -> Result<RunOnTicket<R>, Error>
    where
        F: FnOnce(&mut G) -> R + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        {
            let mut queue = sync::lock(&self.shared.queue);
            if self.shared.live.load(SeqCst) == 0 {
                return Err(Error::Exited {
                    op: Op::RunOn,
                    vcpu: self.ids[0],
                });
            }
            queue.push_back(crate::work::work(f, tx));
        }
        // The push is published (queue lock) before we look at the modes;
        // a member storing Halted after our look finds it when it checks
        // the queue. Every halted member is woken: one that leaves its halt
        // for an interrupt meanwhile must not strand the task.
        for m in &self.members {
            if m.mode.load() == Mode::Halted {
                let mut slow = m.lock();
                m.wake(&mut slow, crate::vcpu::Wake::Idle);
            }
        }
        Ok(RunOnTicket::new(Who::AnyOf(self.ids.clone()), rx))
    }
}
