//! Operations on several vCPUs at once.

use crate::{Deadline, Error, Op, VcpuCtl};

/// Stop every vCPU: signal them all first, then wait for all (never
/// signal-and-wait one by one). Reports every vCPU that did not park.
/// Called on one of the vCPUs' own threads it fails at once, pausing none.
pub fn pause_all<'a, G: 'a>(
    vcpus: impl IntoIterator<Item = &'a VcpuCtl<G>> + Clone,
    deadline: Deadline,
) -> Result<(), Error> {
    if let Some(own) = vcpus
        .clone()
        .into_iter()
        .find(|v| v.on_own_thread().is_some())
    {
        return Err(Error::OwnThread {
            op: Op::PauseAll,
            vcpu: own.id(),
        });
    }
    let mut waiting = Vec::new();
    for v in vcpus.clone() {
        match v.begin_stop(Op::PauseAll) {
            Ok(true) => waiting.push(v),
            Ok(false) => {}
            Err(Error::Exited { .. }) => {} // nothing left to pause
            Err(e) => return Err(e),
        }
    }
    let late: Vec<usize> = waiting
        .into_iter()
        .filter(|v| {
            v.wait_parked(Op::PauseAll, deadline)
                .is_err_and(|e| matches!(e, Error::Timeout { .. }))
        })
        .map(|v| v.id())
        .collect();
    if late.is_empty() {
        Ok(())
    } else {
        Err(Error::Timeout {
            op: Op::PauseAll,
            vcpus: late,
        })
    }
}

/// Resume every vCPU.
pub fn resume_all<'a, G: 'a>(vcpus: impl IntoIterator<Item = &'a VcpuCtl<G>>) {
    for v in vcpus {
        v.resume();
    }
}
