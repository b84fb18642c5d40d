//! Wave2 review #1, save side: an interrupt a device pulls through an
//! irqfd just before a save must be in the saved irqchip. KVM injects an
//! irqfd write routed to the IOAPIC or PIC later, from a kernel worker on
//! the writer's CPU; a save that reads the irqchip before that worker ran
//! saves neither the interrupt nor (the device having handed it off) a
//! reason to raise it again. `Vm::save_state` waits for those workers
//! (it flushes the irqfds) before it reads the irqchip.

use brisk_kvm::{Error, Irqchip, Vm};
use vmm_sys_util::eventfd::EventFd;

/// GSI 4: COM1's ISA line, routed to the PIC and the IOAPIC.
const GSI: u32 = 4;

/// Keep the calling thread ahead of every ordinary thread on its CPU:
/// pinned there at a real-time priority, so a kernel worker woken on that
/// CPU waits until the thread sleeps. A loaded host can give that schedule
/// to any thread (the worker is one more runnable thread); here it is the
/// only one. `false` where this user may not (not root).
fn hold_this_cpu() -> bool {
    // SAFETY: plain syscalls on the calling thread with values built here;
    // the cpu_set_t and sched_param outlive the calls that read them.
    unsafe {
        let cpu = libc::sched_getcpu();
        if cpu < 0 {
            return false;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return false;
        }
        let param = libc::sched_param { sched_priority: 1 };
        libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0
    }
}

/// Whether the saved PIC (master) or IOAPIC holds GSI 4's edge.
fn holds_gsi(saved: &brisk_kvm::VmSnapshot) -> bool {
    saved.irqchips.iter().any(|chip| {
        // SAFETY: `chip_id` says which member of KVM's union this is
        // (0: master PIC, 2: IOAPIC); both are plain integer structs.
        unsafe {
            match chip.chip_id {
                kvm_bindings::KVM_IRQCHIP_PIC_MASTER => chip.chip.pic.irr & (1 << GSI) != 0,
                kvm_bindings::KVM_IRQCHIP_IOAPIC => chip.chip.ioapic.irr & (1 << GSI) != 0,
                _ => false,
            }
        }
    })
}

#[test]
fn an_interrupt_pulled_through_an_irqfd_just_before_a_save_is_saved() {
    let vm = match Vm::new(&[(0, 1 << 20)], Irqchip::Kernel) {
        Err(e @ (Error::NoKvm | Error::KvmPermission)) => {
            eprintln!("\n*** SKIPPED: this test needs KVM ({e}) ***\n");
            return;
        }
        vm => vm.unwrap(),
    };
    let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.register_irqfd(&line, GSI).unwrap();
    let saved = std::thread::scope(|s| {
        s.spawn(|| {
            if !hold_this_cpu() {
                eprintln!("\n*** SKIPPED: this test needs SCHED_FIFO (run as root) ***\n");
                return None;
            }
            line.write(1).unwrap();
            Some(vm.save_state().unwrap())
        })
        .join()
        .unwrap()
    });
    if let Some(saved) = saved {
        assert!(
            holds_gsi(&saved),
            "the interrupt written to the irqfd is in neither the saved PIC nor IOAPIC"
        );
    }
}
