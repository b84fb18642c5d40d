//! Routines shared by the guest programs.

use brisk_boot::{layout, ports};
use iced_x86::code_asm::*;

pub(crate) type Asm = CodeAssembler;
pub(crate) type R = Result<(), IcedError>;

pub(crate) fn new() -> Result<Asm, IcedError> {
    CodeAssembler::new(64)
}

pub(crate) fn finish(mut a: Asm) -> Result<Vec<u8>, IcedError> {
    a.assemble(layout::CODE)
}

/// `rbx` = this vCPU's data line (`rdi` = vCPU index).
pub(crate) fn vcpu_data_to_rbx(a: &mut Asm) -> R {
    a.mov(rbx, rdi)?;
    a.shl(rbx, layout::VCPU_DATA_STRIDE.trailing_zeros())?;
    a.add(rbx, layout::VCPU_DATA as i32)
}

/// `edx` = this vCPU's counter port.
pub(crate) fn counter_port_to_edx(a: &mut Asm) -> R {
    a.mov(edx, edi)?;
    a.shl(edx, 2)?;
    a.add(edx, ports::COUNTER as i32)
}

/// `cli; hlt; jmp` forever, starting at `l`.
pub(crate) fn halt_forever(a: &mut Asm, l: &mut CodeLabel) -> R {
    a.set_label(l)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(*l)
}

/// Subroutines: `putc` (al), `puts` (rsi = NUL-terminated string),
/// `putdec` (rax). They clobber rax, rcx, rdx, rsi.
pub(crate) struct Uart {
    pub putc: CodeLabel,
    pub puts: CodeLabel,
    pub putdec: CodeLabel,
}

impl Uart {
    pub(crate) fn new(a: &mut Asm) -> Self {
        Uart {
            putc: a.create_label(),
            puts: a.create_label(),
            putdec: a.create_label(),
        }
    }

    pub(crate) fn emit(mut self, a: &mut Asm) -> R {
        // putc: wait for the transmitter holding register to be empty
        // (LSR bit 5), then write THR.
        a.set_label(&mut self.putc)?;
        a.mov(cl, al)?;
        let mut wait = a.create_label();
        a.set_label(&mut wait)?;
        a.mov(dx, (ports::COM1 + 5) as u32)?;
        a.in_(al, dx)?;
        a.test(al, 0x20)?;
        a.jz(wait)?;
        a.mov(dx, ports::COM1 as u32)?;
        a.mov(al, cl)?;
        a.out(dx, al)?;
        a.ret()?;

        a.set_label(&mut self.puts)?;
        let mut done = a.create_label();
        a.mov(al, byte_ptr(rsi))?;
        a.test(al, al)?;
        a.jz(done)?;
        a.push(rsi)?;
        a.call(self.putc)?;
        a.pop(rsi)?;
        a.inc(rsi)?;
        a.jmp(self.puts)?;
        a.set_label(&mut done)?;
        a.ret()?;

        // putdec: push decimal digits (least significant first), then
        // print them back in order; r8 counts them.
        a.set_label(&mut self.putdec)?;
        a.xor(r8d, r8d)?;
        a.mov(ecx, 10)?;
        let mut divide = a.create_label();
        a.set_label(&mut divide)?;
        a.xor(edx, edx)?;
        a.div(rcx)?;
        a.add(edx, b'0' as i32)?;
        a.push(rdx)?;
        a.inc(r8)?;
        a.test(rax, rax)?;
        a.jnz(divide)?;
        let mut print = a.create_label();
        a.set_label(&mut print)?;
        a.pop(rax)?;
        a.call(self.putc)?;
        a.dec(r8)?;
        a.jnz(print)?;
        a.ret()
    }
}
