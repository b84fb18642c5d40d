//! Exclusive groups: a set of vCPUs of which at most one runs (e.g. VTLs
//! modelled as vCPUs); `switch_to` stops the running one synchronously,
//! then resumes the target.

use std::sync::{Arc, Mutex};

use crate::{pause_all, Deadline, Error, VcpuCtl};

/// At most one member is ever outside the parked state. Members must only
/// be resumed through the group.
pub struct ExclusiveGroup<G> {
    members: Vec<Arc<VcpuCtl<G>>>,
    /// Index (into `members`) of the one allowed to run.
    running: Mutex<Option<usize>>,
}

impl<G> ExclusiveGroup<G> {
    /// Park every member but `first` (a vCPU id), which keeps running.
    pub fn new(
        members: Vec<Arc<VcpuCtl<G>>>,
        first: usize,
        deadline: Deadline,
    ) -> Result<Self, Error> {
        let first_at = members
            .iter()
            .position(|m| m.id() == first)
            .ok_or(Error::NotMember { vcpu: first })?;
        let others = members.iter().filter(|m| m.id() != first).map(|m| &**m);
        pause_all(others, deadline)?;
        members[first_at].resume();
        Ok(ExclusiveGroup {
            members,
            running: Mutex::new(Some(first_at)),
        })
    }

    /// The vCPU id allowed to run.
    pub fn running(&self) -> Option<usize> {
        let at = *self.running.lock().unwrap_or_else(|p| p.into_inner());
        at.map(|i| self.members[i].id())
    }

    /// Stop the running member (returns once it is parked), then resume
    /// `vcpu`. If the stop misses its deadline nothing is resumed and the
    /// error names the member that did not park.
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
            self.members[current].stop(deadline)?;
            *running = None;
        }
        self.members[target].resume();
        *running = Some(target);
        Ok(())
    }
}
