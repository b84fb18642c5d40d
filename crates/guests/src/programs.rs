//! The guest programs. Entry: rdi = vCPU index, rsi = vCPU count.

use brisk_boot::{layout, ports};
use iced_x86::code_asm::*;

use crate::asm::{self, halt_forever, Uart};
use crate::{DEBUG_EXIT_VALUE, DOORBELL_VECTOR, TICK_PERIOD_US, TICK_VECTOR};
#[cfg(doc)]
use crate::{PINGPONG_ROUNDS, TICKS};

type Program = Result<Vec<u8>, IcedError>;

/// Each vCPU waits for its turn (a shared counter), prints its line, passes
/// the turn on; the last one powers off through PM1a_CNT.
pub(crate) fn hello(_n: u64) -> Program {
    let mut a = asm::new()?;
    let uart = Uart::new(&mut a);
    let (mut msg, mut wait, mut go, mut done) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    a.mov(r12, rdi)?;
    a.mov(r13, rsi)?;
    a.set_label(&mut wait)?;
    a.mov(rax, qword_ptr(layout::SHARED))?;
    a.cmp(rax, r12)?;
    a.je(go)?;
    a.pause()?;
    a.jmp(wait)?;
    a.set_label(&mut go)?;
    a.lea(rsi, ptr(msg))?;
    a.call(uart.puts)?;
    a.mov(rax, r12)?;
    a.call(uart.putdec)?;
    a.mov(al, b'\n' as u32)?;
    a.call(uart.putc)?;
    a.inc(qword_ptr(layout::SHARED))?;
    a.lea(rax, ptr(r12 + 1))?;
    a.cmp(rax, r13)?;
    a.jne(done)?;
    a.mov(dx, ports::PM1A_CNT as u32)?;
    a.mov(ax, ports::PM1A_POWER_OFF as u32)?;
    a.out(dx, ax)?;
    halt_forever(&mut a, &mut done)?;
    uart.emit(&mut a)?;
    a.set_label(&mut msg)?;
    a.db(b"Hello from vCPU \0")?;
    asm::finish(a)
}

/// Increment the progress counter forever.
pub(crate) fn spin(_n: u64) -> Program {
    let mut a = asm::new()?;
    asm::vcpu_data_to_rbx(&mut a)?;
    let mut l = a.create_label();
    a.set_label(&mut l)?;
    a.inc(qword_ptr(rbx))?;
    a.jmp(l)?;
    asm::finish(a)
}

/// Sweep this vCPU's `mib` MiB from `DIRTY_BASE + id * mib MiB`: write
/// the sweep number (progress + 1) into the first qword of every page,
/// then count the sweep. At any moment the pages hold progress + 1 up to
/// where the sweep is, progress after it: what a migration test checks.
pub(crate) fn dirty(mib: u64) -> Program {
    sweeps(mib, false)
}

/// As `dirty`, one sweep: then HLT (interrupts off) forever. A VM whose
/// RAM is all touched and which then sits idle.
pub(crate) fn fill(mib: u64) -> Program {
    sweeps(mib, true)
}

fn sweeps(mib: u64, once: bool) -> Program {
    let mut a = asm::new()?;
    asm::vcpu_data_to_rbx(&mut a)?;
    let bytes = mib << 20;
    // r12 = start of this vCPU's area, r13 = its end.
    a.mov(r12, bytes)?;
    a.imul_2(r12, rdi)?;
    a.mov(rax, crate::DIRTY_BASE)?;
    a.add(r12, rax)?;
    a.mov(r13, r12)?;
    a.mov(rax, bytes)?;
    a.add(r13, rax)?;
    let (mut sweep, mut page) = (a.create_label(), a.create_label());
    a.set_label(&mut sweep)?;
    a.mov(rax, qword_ptr(rbx))?;
    a.inc(rax)?;
    a.mov(rcx, r12)?;
    a.set_label(&mut page)?;
    a.mov(qword_ptr(rcx), rax)?;
    a.add(rcx, 4096)?;
    a.cmp(rcx, r13)?;
    a.jb(page)?;
    a.mov(qword_ptr(rbx), rax)?;
    if once {
        let mut idle = a.create_label();
        halt_forever(&mut a, &mut idle)?;
    } else {
        a.jmp(sweep)?;
    }
    asm::finish(a)
}

/// `in` from the vCPU's counter port forever; stores the value read and
/// counts iterations.
pub(crate) fn pio(_n: u64) -> Program {
    let mut a = asm::new()?;
    asm::vcpu_data_to_rbx(&mut a)?;
    asm::counter_port_to_edx(&mut a)?;
    let mut l = a.create_label();
    a.set_label(&mut l)?;
    a.in_(eax, dx)?;
    a.mov(qword_ptr(rbx + 8), rax)?;
    a.inc(qword_ptr(rbx))?;
    a.jmp(l)?;
    asm::finish(a)
}

/// HLT with IF = 0 forever, counting each return from HLT.
pub(crate) fn halt(_n: u64) -> Program {
    let mut a = asm::new()?;
    asm::vcpu_data_to_rbx(&mut a)?;
    a.cli()?;
    let mut l = a.create_label();
    a.set_label(&mut l)?;
    a.hlt()?;
    a.inc(qword_ptr(rbx))?;
    a.jmp(l)?;
    asm::finish(a)
}

/// Forever: 100k spin iterations, 100 PIO reads, one HLT. Every step
/// counts as progress.
pub(crate) fn mixed(_n: u64) -> Program {
    let mut a = asm::new()?;
    asm::vcpu_data_to_rbx(&mut a)?;
    asm::counter_port_to_edx(&mut a)?;
    let (mut top, mut spin, mut pio) = (a.create_label(), a.create_label(), a.create_label());
    a.set_label(&mut top)?;
    a.mov(ecx, 100_000)?;
    a.set_label(&mut spin)?;
    a.inc(qword_ptr(rbx))?;
    a.dec(ecx)?;
    a.jnz(spin)?;
    a.mov(ecx, 100)?;
    a.set_label(&mut pio)?;
    a.in_(eax, dx)?;
    a.mov(qword_ptr(rbx + 8), rax)?;
    a.inc(qword_ptr(rbx))?;
    a.dec(ecx)?;
    a.jnz(pio)?;
    a.hlt()?;
    a.inc(qword_ptr(rbx))?;
    a.jmp(top)?;
    asm::finish(a)
}

/// vCPU 0 prints a line and writes [`DEBUG_EXIT_VALUE`] to the debug-exit
/// port; other vCPUs halt.
pub(crate) fn debug_exit(_n: u64) -> Program {
    let mut a = asm::new()?;
    let uart = Uart::new(&mut a);
    let (mut msg, mut others) = (a.create_label(), a.create_label());
    a.test(rdi, rdi)?;
    a.jnz(others)?;
    a.lea(rsi, ptr(msg))?;
    a.call(uart.puts)?;
    a.mov(al, DEBUG_EXIT_VALUE as u32)?;
    a.out(ports::DEBUG_EXIT as u32, al)?;
    halt_forever(&mut a, &mut others)?;
    uart.emit(&mut a)?;
    a.set_label(&mut msg)?;
    a.db(format!(
        "debug-exit: writing {DEBUG_EXIT_VALUE:#x} to port {:#x}\n\0",
        ports::DEBUG_EXIT
    )
    .as_bytes())?;
    asm::finish(a)
}

/// vCPU i runs `spin`, `pio` or `halt` by i mod 3: one VM with all three
/// behaviours, for the stress test.
pub(crate) fn stress(_n: u64) -> Program {
    let mut a = asm::new()?;
    asm::vcpu_data_to_rbx(&mut a)?;
    asm::counter_port_to_edx(&mut a)?;
    let (mut spin, mut pio, mut halt) = (a.create_label(), a.create_label(), a.create_label());
    // role = rdi % 3 (crate::stress_role says the same)
    a.mov(rax, rdi)?;
    a.xor(ecx, ecx)?;
    a.mov(r8, rdx)?; // keep the port: div clobbers rdx
    a.xor(edx, edx)?;
    a.mov(ecx, 3)?;
    a.div(rcx)?;
    a.mov(rcx, rdx)?;
    a.mov(rdx, r8)?;
    a.test(rcx, rcx)?;
    a.jz(spin)?;
    a.cmp(rcx, 1)?;
    a.je(pio)?;
    a.jmp(halt)?;
    a.set_label(&mut spin)?;
    a.inc(qword_ptr(rbx))?;
    a.jmp(spin)?;
    a.set_label(&mut pio)?;
    a.in_(eax, dx)?;
    a.mov(qword_ptr(rbx + 8), rax)?;
    a.inc(qword_ptr(rbx))?;
    a.jmp(pio)?;
    a.set_label(&mut halt)?;
    a.cli()?;
    a.hlt()?;
    a.inc(qword_ptr(rbx))?;
    a.jmp(halt)?;
    asm::finish(a)
}

/// Load an empty IDT (limit 0), then `ud2`: #UD cannot be delivered, nor
/// can the #DF that follows: a triple fault (KVM_EXIT_SHUTDOWN).
pub(crate) fn triple_fault(_n: u64) -> Program {
    let mut a = asm::new()?;
    let mut empty_idt = a.create_label();
    a.lidt(ptr(empty_idt))?;
    a.ud2()?;
    let mut spin = a.create_label();
    halt_forever(&mut a, &mut spin)?;
    a.set_label(&mut empty_idt)?;
    a.db(&[0; 10])?; // limit 0, base 0
    asm::finish(a)
}

/// `ud2` with no IDT set up (IDTR as at reset).
pub(crate) fn ud2(_n: u64) -> Program {
    let mut a = asm::new()?;
    a.ud2()?;
    let mut spin = a.create_label();
    halt_forever(&mut a, &mut spin)?;
    asm::finish(a)
}

/// `int3` with no IDT set up.
pub(crate) fn int3(_n: u64) -> Program {
    let mut a = asm::new()?;
    a.int3()?;
    let mut spin = a.create_label();
    halt_forever(&mut a, &mut spin)?;
    asm::finish(a)
}

/// Write then read an address with no RAM and no device behind it (just
/// below 4 GiB). brisk must answer the read with all-ones and ignore the
/// write; the guest reports what it read through the debug-exit port:
/// [`MMIO_ALL_ONES`](crate::MMIO_ALL_ONES) if all-ones, anything else
/// otherwise.
pub(crate) fn mmio_unmapped(_n: u64) -> Program {
    let mut a = asm::new()?;
    let mut wrong = a.create_label();
    a.mov(rbx, crate::UNMAPPED_MMIO)?;
    a.mov(dword_ptr(rbx), 0x1234_5678)?;
    a.mov(eax, dword_ptr(rbx))?;
    a.cmp(eax, -1)?;
    a.jne(wrong)?;
    a.mov(al, crate::MMIO_ALL_ONES as u32)?;
    a.out(ports::DEBUG_EXIT as u32, al)?;
    let mut spin = a.create_label();
    halt_forever(&mut a, &mut spin)?;
    a.set_label(&mut wrong)?;
    a.mov(al, (crate::MMIO_ALL_ONES + 1) as u32)?;
    a.out(ports::DEBUG_EXIT as u32, al)?;
    let mut spin2 = a.create_label();
    halt_forever(&mut a, &mut spin2)?;
    asm::finish(a)
}

/// `out` and `in` on a port nobody claims, forever, counting iterations.
pub(crate) fn pio_storm(_n: u64) -> Program {
    let mut a = asm::new()?;
    asm::vcpu_data_to_rbx(&mut a)?;
    a.mov(dx, ports::UNCLAIMED as u32)?;
    let mut l = a.create_label();
    a.set_label(&mut l)?;
    a.out(dx, al)?;
    a.in_(al, dx)?;
    a.inc(qword_ptr(rbx))?;
    a.jmp(l)?;
    asm::finish(a)
}

/// MONITOR on the vCPU's data line, then MWAIT, 1000 times; then vCPU 0
/// reports [`MWAIT_DONE`](crate::MWAIT_DONE) through the debug-exit port.
pub(crate) fn mwait(_n: u64) -> Program {
    let mut a = asm::new()?;
    asm::vcpu_data_to_rbx(&mut a)?;
    a.mov(r12, rdi)?;
    // A well-behaved guest asks CPUID first: no MONITOR, no MWAIT.
    let mut l = a.create_label();
    a.mov(eax, 1)?;
    a.cpuid()?;
    a.test(ecx, 1 << 3)?;
    a.jnz(l)?;
    a.mov(al, crate::MWAIT_HIDDEN as u32)?;
    a.out(ports::DEBUG_EXIT as u32, al)?;
    let mut hidden = a.create_label();
    halt_forever(&mut a, &mut hidden)?;
    a.set_label(&mut l)?;
    a.mov(rax, rbx)?;
    a.xor(ecx, ecx)?;
    a.xor(edx, edx)?;
    a.monitor()?;
    a.xor(eax, eax)?;
    a.xor(ecx, ecx)?;
    a.mwait()?;
    a.inc(qword_ptr(rbx))?;
    a.cmp(qword_ptr(rbx), 1000)?;
    a.jb(l)?;
    let mut others = a.create_label();
    a.test(r12, r12)?;
    a.jnz(others)?;
    a.mov(al, crate::MWAIT_DONE as u32)?;
    a.out(ports::DEBUG_EXIT as u32, al)?;
    halt_forever(&mut a, &mut others)?;
    asm::finish(a)
}

/// Take `ticks` ([`TICKS`] by default) timer interrupts (vector [`TICK_VECTOR`], one every
/// [`TICK_PERIOD_US`]) with HLT between them, then stop the timer; the last
/// vCPU done powers off. The handler counts into the progress counter.
pub(crate) fn tick(ticks: u64) -> Program {
    let mut a = asm::new()?;
    let (mut handler, mut wait, mut done) = (a.create_label(), a.create_label(), a.create_label());
    asm::vcpu_data_to_rbx(&mut a)?;
    a.mov(r15, rbx)?;
    a.mov(r13, rsi)?;
    asm::idt_gate(&mut a, TICK_VECTOR, handler)?;
    asm::load_idt(&mut a)?;
    // This vCPU's timer: vector, then period (starts it).
    asm::timer_port_to_edx(&mut a)?;
    a.mov(al, TICK_VECTOR as u32)?;
    a.out(dx, al)?;
    a.add(edx, 4)?;
    a.mov(eax, TICK_PERIOD_US)?;
    a.out(dx, eax)?;
    // Check with interrupts off; `sti; hlt` opens them only for the HLT
    // (STI's one-instruction shadow), so no tick slips in between.
    a.set_label(&mut wait)?;
    a.cli()?;
    a.cmp(qword_ptr(r15), ticks as i32)?;
    a.jae(done)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(wait)?;
    a.set_label(&mut done)?;
    a.xor(eax, eax)?;
    a.out(dx, eax)?; // stop the timer
    asm::last_one_powers_off(&mut a)?;
    asm::counting_handler(&mut a, &mut handler)?;
    asm::finish(a)
}

/// A token passes round the vCPUs through the doorbell (vector
/// [`DOORBELL_VECTOR`]): each vCPU HLTs until its doorbell rings, then rings
/// the next; vCPU 0 starts it and powers off after [`PINGPONG_ROUNDS`]
/// rounds (or `rounds`). Every vCPU counts the rings it received in its progress counter.
pub(crate) fn pingpong(rounds: u64) -> Program {
    let mut a = asm::new()?;
    let (mut handler, mut wait, mut got, mut wrap, mut ring) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    asm::vcpu_data_to_rbx(&mut a)?;
    a.mov(r15, rbx)?;
    a.mov(r12, rdi)?;
    a.mov(r13, rsi)?;
    asm::idt_gate(&mut a, DOORBELL_VECTOR, handler)?;
    asm::load_idt(&mut a)?;
    // ebp = the ring for the next vCPU: ((id + 1) % count) << 8 | vector.
    a.lea(rax, ptr(r12 + 1))?;
    a.cmp(rax, r13)?;
    a.jb(wrap)?;
    a.xor(eax, eax)?;
    a.set_label(&mut wrap)?;
    a.shl(eax, 8)?;
    a.or(eax, DOORBELL_VECTOR as i32)?;
    a.mov(ebp, eax)?;
    a.xor(r14d, r14d)?; // rings handled
    a.test(r12, r12)?;
    a.jz(ring)?; // vCPU 0 starts the token
    a.set_label(&mut wait)?;
    a.cli()?;
    a.cmp(qword_ptr(r15), r14)?;
    a.ja(got)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(wait)?;
    a.set_label(&mut got)?;
    a.inc(r14)?;
    a.test(r12, r12)?;
    a.jnz(ring)?;
    a.cmp(r14, rounds as i32)?;
    a.jb(ring)?;
    a.mov(dx, ports::PM1A_CNT as u32)?;
    a.mov(ax, ports::PM1A_POWER_OFF as u32)?;
    a.out(dx, ax)?;
    let mut off = a.create_label();
    halt_forever(&mut a, &mut off)?;
    a.set_label(&mut ring)?;
    a.mov(eax, ebp)?;
    a.mov(dx, ports::DOORBELL as u32)?;
    a.out(dx, eax)?;
    a.jmp(wait)?;
    asm::counting_handler(&mut a, &mut handler)?;
    asm::finish(a)
}

/// An 8-byte load from unmapped MMIO that straddles a page boundary, in a
/// loop counting iterations. KVM splits the access in two fragments, each
/// a KVM_EXIT_MMIO: the first one's completion returns the second as a new
/// exit, even with immediate_exit set.
pub(crate) fn mmio_split(_n: u64) -> Program {
    let mut a = asm::new()?;
    asm::vcpu_data_to_rbx(&mut a)?;
    a.mov(rsi, crate::UNMAPPED_MMIO + 0xffc)?;
    let mut l = a.create_label();
    a.set_label(&mut l)?;
    a.mov(rax, qword_ptr(rsi))?;
    a.mov(qword_ptr(rbx + 8), rax)?;
    a.inc(qword_ptr(rbx))?;
    a.jmp(l)?;
    asm::finish(a)
}

/// MSR_KVM_SYSTEM_TIME_NEW: where the guest wants its pvclock structure.
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// `flags` in struct pvclock_vcpu_time_info, and its "guest stopped" bit.
const PVCLOCK_FLAGS: i32 = 29;
const PVCLOCK_GUEST_STOPPED: u32 = 2;

/// Enable kvmclock with this vCPU's structure at [`crate::pvclock`] (and
/// say so with 1 in the per-vCPU `last_read` slot), then spin; each time KVM sets PVCLOCK_GUEST_STOPPED (brisk paused it and told
/// KVM with KVM_KVMCLOCK_CTRL) clear it and count it in the progress
/// counter, as Linux's watchdog does.
pub(crate) fn kvmclock(_n: u64) -> Program {
    let mut a = asm::new()?;
    asm::vcpu_data_to_rbx(&mut a)?;
    asm::pvclock_to_rax(&mut a)?;
    a.mov(r14, rax)?;
    a.or(eax, 1)?; // enable
    a.xor(edx, edx)?;
    a.mov(ecx, MSR_KVM_SYSTEM_TIME_NEW)?;
    a.wrmsr()?;
    a.mov(qword_ptr(rbx + 8), 1)?; // "kvmclock is on", for the host
    let (mut l, mut seen) = (a.create_label(), a.create_label());
    a.set_label(&mut l)?;
    a.test(byte_ptr(r14 + PVCLOCK_FLAGS), PVCLOCK_GUEST_STOPPED as i32)?;
    a.jnz(seen)?;
    a.pause()?;
    a.jmp(l)?;
    a.set_label(&mut seen)?;
    a.and(byte_ptr(r14 + PVCLOCK_FLAGS), !PVCLOCK_GUEST_STOPPED as i32)?;
    a.inc(qword_ptr(rbx))?;
    a.jmp(l)?;
    asm::finish(a)
}

/// Print a line on the UART, forever, counting lines.
pub(crate) fn flood(_n: u64) -> Program {
    let mut a = asm::new()?;
    let uart = Uart::new(&mut a);
    asm::vcpu_data_to_rbx(&mut a)?;
    a.mov(r15, rbx)?;
    let (mut l, mut msg) = (a.create_label(), a.create_label());
    a.set_label(&mut l)?;
    a.lea(rsi, ptr(msg))?;
    a.call(uart.puts)?;
    a.inc(qword_ptr(r15))?;
    a.jmp(l)?;
    uart.emit(&mut a)?;
    a.set_label(&mut msg)?;
    a.db(b"flood: the quick brown fox jumps over the lazy dog\n\0")?;
    asm::finish(a)
}

/// vCPU i by i mod 4 ([`crate::stress_irq_role`]): spin, PIO loop ringing
/// a doorbell every [`crate::STRESS_IRQ_RING_EVERY`] reads, `sti; hlt`
/// woken by its own periodic timer, or `sti; hlt` woken by doorbell rings.
/// Interrupts stay enabled; the timer, doorbell and stress vectors share
/// one handler that counts into the progress counter and into `+8`.
pub(crate) fn stress_irq(_n: u64) -> Program {
    let mut a = asm::new()?;
    let mut handler = a.create_label();
    let (mut spin, mut pio, mut timer, mut halt) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    asm::vcpu_data_to_rbx(&mut a)?;
    a.mov(r15, rbx)?;
    for vector in [TICK_VECTOR, DOORBELL_VECTOR, crate::STRESS_RAISE_VECTOR] {
        asm::idt_gate(&mut a, vector, handler)?;
    }
    asm::load_idt(&mut a)?;
    // role = rdi % 4 (crate::stress_irq_role says the same)
    a.mov(eax, edi)?;
    a.and(eax, 3)?;
    a.jz(spin)?;
    a.cmp(eax, 1)?;
    a.je(pio)?;
    a.cmp(eax, 2)?;
    a.je(timer)?;
    a.jmp(halt)?;

    a.set_label(&mut spin)?;
    a.sti()?;
    let mut spin_loop = a.create_label();
    a.set_label(&mut spin_loop)?;
    a.inc(qword_ptr(rbx))?;
    a.jmp(spin_loop)?;

    // ebp = the ring: (target << 8) | vector, target as in
    // crate::stress_irq_ring_target.
    a.set_label(&mut pio)?;
    let mut target_ok = a.create_label();
    a.lea(rax, ptr(rdi + 2))?;
    a.cmp(rax, rsi)?;
    a.jb(target_ok)?;
    a.mov(rax, rdi)?;
    a.set_label(&mut target_ok)?;
    a.shl(eax, 8)?;
    a.or(eax, DOORBELL_VECTOR as i32)?;
    a.mov(ebp, eax)?;
    asm::counter_port_to_edx(&mut a)?;
    a.mov(r8d, edx)?;
    a.sti()?;
    let (mut batch, mut read) = (a.create_label(), a.create_label());
    a.set_label(&mut batch)?;
    a.mov(ecx, crate::STRESS_IRQ_RING_EVERY)?;
    a.set_label(&mut read)?;
    a.in_(eax, dx)?;
    a.inc(qword_ptr(rbx))?;
    a.dec(ecx)?;
    a.jnz(read)?;
    a.mov(eax, ebp)?;
    a.mov(edx, ports::DOORBELL as u32)?;
    a.out(dx, eax)?;
    a.mov(edx, r8d)?;
    a.jmp(batch)?;

    // This vCPU's timer: vector, then period (starts it); then halt.
    a.set_label(&mut timer)?;
    asm::timer_port_to_edx(&mut a)?;
    a.mov(al, TICK_VECTOR as u32)?;
    a.out(dx, al)?;
    a.add(edx, 4)?;
    a.mov(eax, crate::STRESS_IRQ_TIMER_US)?;
    a.out(dx, eax)?;

    // Idle with interrupts on: only an interrupt gets past the HLT.
    a.set_label(&mut halt)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(halt)?;

    a.set_label(&mut handler)?;
    a.inc(qword_ptr(r15))?;
    a.inc(qword_ptr(r15 + 8))?;
    a.iretq()?;
    asm::finish(a)
}
