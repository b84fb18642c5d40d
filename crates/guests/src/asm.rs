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

/// `dst` = this vCPU's place in a per-vCPU area (`rdi` = vCPU index), as
/// [`layout::per_vcpu`] has it: `low + id * stride` for the first
/// [`layout::MAX_VCPUS`], `high + (id - MAX_VCPUS) * stride` after.
fn per_vcpu(a: &mut Asm, dst: AsmRegister64, low: u64, high: u64, stride: u64) -> R {
    let (mut first, mut done) = (a.create_label(), a.create_label());
    a.mov(dst, rdi)?;
    a.cmp(rdi, layout::MAX_VCPUS as i32)?;
    a.jb(first)?;
    a.sub(dst, layout::MAX_VCPUS as i32)?;
    a.shl(dst, stride.trailing_zeros())?;
    a.add(dst, high as i32)?;
    a.jmp(done)?;
    a.set_label(&mut first)?;
    a.shl(dst, stride.trailing_zeros())?;
    a.add(dst, low as i32)?;
    a.set_label(&mut done)?;
    a.nop()
}

/// `rbx` = this vCPU's data line (`rdi` = vCPU index).
pub(crate) fn vcpu_data_to_rbx(a: &mut Asm) -> R {
    let (low, high) = (layout::VCPU_DATA, layout::VCPU_DATA_HIGH);
    per_vcpu(a, rbx, low, high, layout::VCPU_DATA_STRIDE)
}

/// `rax` = this vCPU's pvclock structure.
pub(crate) fn pvclock_to_rax(a: &mut Asm) -> R {
    let (low, high) = (layout::PVCLOCK, layout::PVCLOCK_HIGH);
    per_vcpu(a, rax, low, high, layout::VCPU_DATA_STRIDE)
}

/// `edx` = this vCPU's counter port.
pub(crate) fn counter_port_to_edx(a: &mut Asm) -> R {
    let (low, high) = (ports::COUNTER.into(), ports::COUNTER_HIGH.into());
    per_vcpu(a, rdx, low, high, ports::COUNTER_STRIDE.into())
}

/// `edx` = this vCPU's first timer port.
pub(crate) fn timer_port_to_edx(a: &mut Asm) -> R {
    let (low, high) = (ports::TIMER.into(), ports::TIMER_HIGH.into());
    per_vcpu(a, rdx, low, high, ports::TIMER_STRIDE.into())
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

/// Point IDT gate `vector` at `handler` (a 64-bit interrupt gate, code
/// selector 0x8, DPL 0). Clobbers rax, rcx, rdx. Every vCPU may write the
/// same gate: the bytes are identical.
pub(crate) fn idt_gate(a: &mut Asm, vector: u8, handler: CodeLabel) -> R {
    let gate = layout::IDT + 16 * u64::from(vector);
    a.lea(rax, ptr(handler))?;
    a.mov(ecx, eax)?;
    a.and(ecx, 0xffff)?; // offset 15:0
    a.mov(rdx, 0x8e00_0008_0000u64)?; // present, interrupt gate; selector 0x8
    a.or(rcx, rdx)?;
    a.mov(rdx, rax)?;
    a.shr(rdx, 16)?;
    a.and(edx, 0xffff)?;
    a.shl(rdx, 48)?; // offset 31:16
    a.or(rcx, rdx)?;
    a.mov(qword_ptr(gate), rcx)?;
    a.shr(rax, 32)?; // offset 63:32
    a.mov(qword_ptr(gate + 8), rax)
}

/// `lidt` of the 256-gate table at `layout::IDT`, through the stack.
pub(crate) fn load_idt(a: &mut Asm) -> R {
    a.sub(rsp, 16)?;
    a.mov(word_ptr(rsp), 16 * 256 - 1)?;
    a.mov(rax, layout::IDT)?;
    a.mov(qword_ptr(rsp + 2), rax)?;
    a.lidt(ptr(rsp))?;
    a.add(rsp, 16)
}

/// Count this vCPU done in `layout::SHARED`; the last of `r13` vCPUs powers
/// off, the others halt with interrupts off. Clobbers rax, rdx.
pub(crate) fn last_one_powers_off(a: &mut Asm) -> R {
    let mut others = a.create_label();
    a.mov(eax, 1)?;
    a.lock().xadd(qword_ptr(layout::SHARED), rax)?;
    a.inc(rax)?;
    a.cmp(rax, r13)?;
    a.jne(others)?;
    a.mov(dx, ports::PM1A_CNT as u32)?;
    a.mov(ax, ports::PM1A_POWER_OFF as u32)?;
    a.out(dx, ax)?;
    halt_forever(a, &mut others)
}

/// An interrupt handler that counts into `[r15]` (the interrupted code
/// keeps r15 = its progress counter) and returns.
pub(crate) fn counting_handler(a: &mut Asm, l: &mut CodeLabel) -> R {
    a.set_label(l)?;
    a.inc(qword_ptr(r15))?;
    a.iretq()
}
