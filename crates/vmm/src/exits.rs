//! What a vCPU thread does with each exit: dispatch I/O to the bus, halt,
//! or end the VM with a report.

use brisk_control::Flow;
use brisk_devices::Bus;
use brisk_kvm::{Exit, KvmVcpu};

use crate::VmEnd;

/// KVM_INTERNAL_ERROR_EMULATION: an instruction KVM could not emulate.
const EMULATION_FAILURE: u32 = 1;

/// The exit handler of a vCPU thread: I/O to the bus, HLT to a user-space
/// halt, fatal exits to `fatal` (with the vCPU and RIP) and [`Flow::Exit`].
/// No allocation, no lock of its own: devices lock what they need.
pub fn handle(v: &mut KvmVcpu, exit: Exit, bus: &Bus, fatal: &dyn Fn(VmEnd)) -> Flow {
    match exit {
        Exit::IoIn { port, size, .. } => {
            // String I/O (`rep ins`) arrives as `count` elements of `size`.
            for chunk in v.io_data().chunks_mut(size.max(1) as usize) {
                bus.pio_read(port, chunk);
            }
            Flow::Continue
        }
        Exit::IoOut { port, size, .. } => {
            for chunk in v.io_data().chunks(size.max(1) as usize) {
                bus.pio_write(port, chunk);
            }
            Flow::Continue
        }
        Exit::MmioRead { addr, .. } => {
            bus.mmio_read(addr, v.mmio_data());
            Flow::Continue
        }
        Exit::MmioWrite { addr, .. } => {
            bus.mmio_write(addr, v.mmio_data());
            Flow::Continue
        }
        // An interrupt the guest can take now ends the HLT at once.
        Exit::Hlt if v.interrupt_deliverable() => Flow::Continue,
        Exit::Hlt => Flow::Halt,
        // The next entry injects the pending interrupt.
        Exit::IrqWindowOpen => Flow::Continue,
        other => {
            fatal(VmEnd::Crash {
                vcpu: v.id(),
                what: describe_fatal(other),
                rip: v.fd().get_regs().map(|r| r.rip).unwrap_or(0),
            });
            Flow::Exit
        }
    }
}

fn describe_fatal(exit: Exit) -> String {
    match exit {
        Exit::Shutdown => "triple fault or shutdown (KVM_EXIT_SHUTDOWN)".into(),
        Exit::InternalError {
            suberror: EMULATION_FAILURE,
        } => "emulation failure: KVM could not emulate an instruction (KVM_EXIT_INTERNAL_ERROR)"
            .into(),
        Exit::InternalError { suberror } => {
            format!("KVM internal error, suberror {suberror}")
        }
        Exit::FailEntry { reason } => {
            format!("KVM could not enter the guest, hardware reason {reason:#x}")
        }
        Exit::SystemEvent { kind } => format!("system event {kind} (reset, shutdown or crash)"),
        Exit::Other { reason } => format!("unhandled exit reason {reason}"),
        other => format!("unexpected exit {other:?}"),
    }
}
