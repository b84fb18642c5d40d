/* Interrupt entries for the uartirq test kernel. They never return with
 * IRET: KVM on hosts without VT-x/SVM (PVM) cannot emulate a 32-bit IRET,
 * so each entry handles the interrupt, then continues the kernel's next
 * step on a fresh stack (after_irq() never returns; it waits for the next
 * interrupt with sti; hlt). */
    .text
    .globl isr_uart
isr_uart:
    cld
    call uart_isr
    mov $irq_stack_top, %esp
    call after_irq

    .globl isr_spurious
isr_spurious:
    mov $irq_stack_top, %esp
    call after_irq

    .bss
    .align 16
irq_stack:
    .space 8192
irq_stack_top:
