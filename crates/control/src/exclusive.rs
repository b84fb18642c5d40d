//! Exclusive groups: a set of vCPUs of which at most one runs (e.g. VTLs
//! modelled as vCPUs); `switch_to` stops the running one synchronously,
//! then resumes the target.

use std::sync::{Arc, Mutex};

use crate::{pause_all, resume_all, Deadline, Error, VcpuCtl};

/// At most one member is ever outside the parked state. Members must only
/// be resumed through the group.
pub struct ExclusiveGroup<G> {
    members: Vec<Arc<VcpuCtl<G>>>,
    /// Index (into `members`) of the one allowed to run.
    running: Mutex<Option<usize>>,
}

impl<G> ExclusiveGroup<G> {
    /// Park every member but `first` (a vCPU id), which keeps running. If
    /// a member does not park in time, every member is resumed again and
    /// the error names it: no group, and nothing left paused.
    pub fn new(
        members: Vec<Arc<VcpuCtl<G>>>,
        first: usize,
        deadline: Deadline,
    ) -> Result<Self, Error> {
        let first_at = members
            .iter()
            .position(|m| m.id() == first)
            .ok_or(Error::NotMember { vcpu: first })?;
        let others = || members.iter().filter(|m| m.id() != first).map(|m| &**m);
        if let Err(e) = pause_all(others(), deadline) {
            resume_all(others());
            return Err(e);
        }
        members[first_at].resume();
        Ok(ExclusiveGroup {
            members,
            running: Mutex::new(Some(first_at)),
        })
    }

    /// The vCPU id allowed to run (`None` once the last runner exited and
    /// no other was switched to).
    pub fn running(&self) -> Option<usize> {
        let at = *self.running.lock().unwrap_or_else(|p| p.into_inner());
        at.map(|i| self.members[i].id())
    }

    /// Stop the running member (returns once it is parked), then resume
    /// `vcpu`. If the stop misses its deadline, the running member is
    /// resumed again (its stop is withdrawn) and stays the one that runs:
    /// the error names it. A running member whose thread has exited counts
    /// as stopped.
    pub fn switch_to(&self, vcpu: usize, deadline: Deadline) -> Result<(), Error> {
        let target = self
            .members
            .iter()
            .position(|m| m.id() == vcpu)
            .ok_or(Error::NotMember { vcpu })?;
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if *running == Some(target) {
            return Ok(());
        }
        if let Some(current) = *running {
            let member = &self.members[current];
            match member.stop(deadline) {
                Ok(()) | Err(Error::Exited { .. }) => *running = None,
                Err(e) => {
                    member.resume();
                    return Err(e);
                }
            }
        }
        self.members[target].resume();
        *running = Some(target);
        Ok(())
    }
}
