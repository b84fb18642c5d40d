//! What a vCPU thread does with each exit: dispatch I/O to the bus, halt,
//! or end the VM with a report.

use brisk_control::Flow;
use brisk_devices::apic::{msr, GuestTsc};
use brisk_devices::{Apics, Bus};
use brisk_kvm::{Exit, KvmVcpu};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::VmEnd;

/// KVM_INTERNAL_ERROR_EMULATION: an instruction KVM could not emulate.
const EMULATION_FAILURE: u32 = 1;

/// The exit handler of a vCPU thread: I/O to the bus (the APIC page and
/// MSRs to the vCPU's own LAPIC, given brisk's `apics`), HLT to a
/// user-space halt, fatal exits to `fatal` (with the vCPU, RIP and, given
/// guest memory `mem`, the instruction there) and [`Flow::Exit`].
/// No lock of its own (devices lock what they need); no allocation but a
/// TSC-deadline or APIC-base WRMSR's one-entry MSR list.
pub fn handle(
    v: &mut KvmVcpu,
    exit: Exit,
    bus: &Bus,
    apics: Option<&Apics>,
    mem: Option<&GuestMemoryMmap<AtomicBitmap>>,
    fatal: &dyn Fn(VmEnd),
) -> Flow {
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
            let id = v.id();
            match apics {
                Some(a) if a.claims_mmio(id, addr) => a.mmio_read(id, addr, v.mmio_data()),
                _ => bus.mmio_read(addr, v.mmio_data()),
            }
            Flow::Continue
        }
        Exit::MmioWrite { addr, .. } => {
            let id = v.id();
            match apics {
                Some(a) if a.claims_mmio(id, addr) => a.mmio_write(id, addr, v.mmio_data()),
                _ => bus.mmio_write(addr, v.mmio_data()),
            }
            Flow::Continue
        }
        Exit::RdMsr { index } => {
            let value = match apics {
                Some(a) if Apics::is_apic_msr(index) => a.msr_read(v.id(), index),
                _ => Err(brisk_devices::apic::MsrError::Unknown(index)),
            };
            if let Err(e) = &value {
                log::debug!("vCPU {}: RDMSR faults: {e}", v.id());
            }
            v.answer_msr(value.ok());
            Flow::Continue
        }
        Exit::WrMsr { index, value } => {
            let done = match apics {
                Some(a) if Apics::is_apic_msr(index) => {
                    let mut tsc = || v.guest_tsc().map(|(now, khz)| GuestTsc { now, khz });
                    a.msr_write(v.id(), index, value, &mut tsc)
                }
                _ => Err(brisk_devices::apic::MsrError::Unknown(index)),
            };
            match &done {
                // KVM shows CPUID's APIC bit from its own copy.
                Ok(()) if index == msr::APIC_BASE => {
                    if let Some(a) = apics {
                        v.mirror_apic_base(a.lapic(v.id()).apic_base());
                    }
                }
                Ok(()) => {}
                // Kernels probe MSRs expecting #GP (rdmsr_safe): debug only.
                Err(e) => log::debug!("vCPU {}: WRMSR {value:#x} faults: {e}", v.id()),
            }
            v.answer_msr(done.ok().map(|()| 0));
            Flow::Continue
        }
        // CR8 is read back after every exit (the LAPIC's TPR).
        Exit::SetTpr => Flow::Continue,
        Exit::WaitForSipi => Flow::Halt,
        // An interrupt the guest can take now ends the HLT at once.
        Exit::Hlt if v.interrupt_deliverable() => Flow::Continue,
        Exit::Hlt => Flow::Halt,
        // The next entry injects the pending interrupt.
        Exit::IrqWindowOpen => Flow::Continue,
        other => {
            let rip = v.fd().get_regs().map(|r| r.rip).unwrap_or(0);
            let mut what = describe_fatal(other);
            if let Some(mem) = mem {
                what.push_str(&instruction_at(v, mem, rip));
            }
            fatal(VmEnd::Crash {
                vcpu: v.id(),
                what,
                rip,
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

/// "; instruction at RIP: BYTES (DECODED)": the bytes at the vCPU's RIP and
/// what they decode to, so that a report tells an instruction the host
/// could not emulate (say `xrstor`) from a guest that jumped into garbage
/// or a brisk bug. Empty when RIP does not translate to guest RAM.
fn instruction_at(v: &KvmVcpu, mem: &GuestMemoryMmap<AtomicBitmap>, rip: u64) -> String {
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
    let Ok(sregs) = v.fd().get_sregs() else {
        return String::new();
    };
    let linear = sregs.cs.base.wrapping_add(rip);
    let physical = match v.fd().translate_gva(linear) {
        Ok(t) if t.valid != 0 => t.physical_address,
        // Paging off: linear is physical.
        _ if sregs.cr0 & (1 << 31) == 0 => linear,
        _ => return String::new(),
    };
    let mut bytes = [0u8; 15];
    // Up to 15 bytes, fewer where RAM ends.
    let n = (1..=bytes.len())
        .rev()
        .find(|&n| {
            mem.read_slice(&mut bytes[..n], GuestAddress(physical))
                .is_ok()
        })
        .unwrap_or(0);
    if n == 0 {
        return String::new();
    }
    let bitness = if sregs.cs.l == 1 {
        64
    } else if sregs.cs.db == 1 {
        32
    } else {
        16
    };
    let mut decoder = Decoder::with_ip(bitness, &bytes[..n], rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    let len = if insn.is_invalid() {
        n.min(8)
    } else {
        insn.len()
    };
    let hex: Vec<String> = bytes[..len].iter().map(|b| format!("{b:02x}")).collect();
    let mut text = String::new();
    if insn.is_invalid() {
        text.push_str("not a valid instruction");
    } else {
        IntelFormatter::new().format(&insn, &mut text);
    }
    format!("; instruction at RIP: {} ({text})", hex.join(" "))
}
