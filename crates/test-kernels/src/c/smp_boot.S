/* AP start-up: smp.c copies [tramp_start, tramp_end) to 0x9000 and sends
 * SIPI vector 0x09; the AP starts in real mode with CS base 0x9000. */
#define TRAMP 0x9000
    .text
    .code16
    .globl tramp_start, tramp_end
tramp_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl tramp_gdt_desc - tramp_start
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $ap_entry32
    .align 8
tramp_gdt:
    .quad 0
    .quad 0x00cf9b000000ffff
    .quad 0x00cf93000000ffff
tramp_gdt_desc:
    .word 23
    .long TRAMP + (tramp_gdt - tramp_start)
tramp_end:

    .code32
ap_entry32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    /* Each AP takes the next stack. */
    mov $1, %eax
    lock xadd %eax, ap_next
    inc %eax
    shl $12, %eax
    add $ap_stacks, %eax
    mov %eax, %esp
    call ap_main
2:  cli
    hlt
    jmp 2b
