/* Multiboot header and entry: a stack, then kmain(magic, info); its return
 * value goes to the debug-exit port. */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x3            /* page-aligned modules, memory information */

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .text
    .globl _start
_start:
    mov $stack_top, %esp
    push %ebx
    push %eax
    call kmain
    push %eax
    call exit
1:  cli
    hlt
    jmp 1b

    .bss
    .align 16
stack:
    .space 16384
stack_top:
