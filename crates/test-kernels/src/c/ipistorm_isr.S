/* Interrupt entries for the ipistorm test kernel: one stub per vector it
 * takes, each handing its vector to storm_isr(), which returns the top of
 * this CPU's stack; the stub switches to it and continues with
 * after_irq(). Like uartirq's, they never IRET (PVM cannot emulate a
 * 32-bit IRET). */
    .text
    .macro stub vec
    .globl isr_\vec
isr_\vec:
    push $\vec
    jmp isr_common
    .endm

    .irp v, 48, 49, 64, 65, 66, 67, 68, 69, 70, 71, 128, 129, 130, 131, 132, 133, 134, 135, 255
    stub \v
    .endr

isr_common:
    cld
    call storm_isr
    mov %eax, %esp
    call after_irq

    .section .rodata
    .globl storm_vectors, storm_stubs
storm_vectors:
    .irp v, 48, 49, 64, 65, 66, 67, 68, 69, 70, 71, 128, 129, 130, 131, 132, 133, 134, 135, 255
    .long \v
    .endr
    .long 0
storm_stubs:
    .irp v, 48, 49, 64, 65, 66, 67, 68, 69, 70, 71, 128, 129, 130, 131, 132, 133, 134, 135, 255
    .long isr_\v
    .endr
