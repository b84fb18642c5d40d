//! The guest programs. Entry: rdi = vCPU index, rsi = vCPU count.

use brisk_boot::{layout, ports};
use iced_x86::code_asm::*;

use crate::asm::{self, halt_forever, Uart};
use crate::DEBUG_EXIT_VALUE;

type Program = Result<Vec<u8>, IcedError>;

/// Each vCPU waits for its turn (a shared counter), prints its line, passes
/// the turn on; the last one powers off through PM1a_CNT.
pub(crate) fn hello() -> Program {
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
pub(crate) fn spin() -> Program {
    let mut a = asm::new()?;
    asm::vcpu_data_to_rbx(&mut a)?;
    let mut l = a.create_label();
    a.set_label(&mut l)?;
    a.inc(qword_ptr(rbx))?;
    a.jmp(l)?;
    asm::finish(a)
}

/// `in` from the vCPU's counter port forever; stores the value read and
/// counts iterations.
pub(crate) fn pio() -> Program {
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
pub(crate) fn halt() -> Program {
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
pub(crate) fn mixed() -> Program {
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
pub(crate) fn debug_exit() -> Program {
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
