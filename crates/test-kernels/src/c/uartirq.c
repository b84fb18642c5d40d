/* Proves that a device interrupt reaches the guest through KVM's IOAPIC:
 * the UART (COM1, ISA IRQ 4) raises its line (an irqfd on GSI 4), the
 * IOAPIC's redirection entry 4 sends it as vector 0x24 to the LAPIC of
 * CPU 0. First the transmit-empty interrupt, then received data: the host
 * types "ping" once the kernel says it is ready; the kernel echoes it.
 * The kernel is a sequence of steps, each entered from the interrupt that
 * ends the previous wait (see uartirq_isr.S: no IRET). */
#include "lib.h"

#define LAPIC 0xfee00000u
#define IOAPIC 0xfec00000u
#define COM1 0x3f8
#define VECTOR 0x24

struct gate { u16 off_lo, sel; u8 zero, type; u16 off_hi; } __attribute__((packed));
static struct gate idt[256];
static struct { u16 limit; u32 base; } __attribute__((packed)) idtr;

extern void isr_uart(void);
extern void isr_spurious(void);

static volatile u32 interrupts, thr_empty, received;
static volatile char line[32];

static void mmio_write(u32 addr, u32 v) { *(volatile u32 *)addr = v; }
static u32 mmio_read(u32 addr) { return *(volatile u32 *)addr; }

static void ioapic_write(u32 reg, u32 v)
{
    mmio_write(IOAPIC, reg);
    mmio_write(IOAPIC + 0x10, v);
}

static void gate(int v, void (*f)(void))
{
    u32 a = (u32)f;
    idt[v] = (struct gate){ a & 0xffff, 0x08, 0, 0x8e, a >> 16 };
}

void uart_isr(void)
{
    interrupts++;
    for (;;) {
        u8 iir = inb(COM1 + 2);
        if (iir & 1)
            break; /* nothing (left) pending */
        if ((iir & 0x0e) == 0x02)
            thr_empty++;
        while (inb(COM1 + 5) & 1) { /* data ready */
            char c = (char)inb(COM1);
            if (received < sizeof(line) - 1)
                line[received++] = c;
        }
    }
    mmio_write(LAPIC + 0xb0, 0); /* EOI */
}

static volatile int step;

/* Wait for the next interrupt (IF=1 only for the HLT). */
static void __attribute__((noreturn)) wait_for_interrupt(void)
{
    for (;;)
        __asm__ volatile("sti; hlt; cli");
}

/* Entered (on a fresh stack) after each interrupt: the next step. */
void __attribute__((noreturn)) after_irq(void)
{
    if (step == 1 && thr_empty) {
        step = 2;
        puts("uartirq: transmit-empty interrupt as vector 0x24 via IOAPIC pin 4\n");
        outb(COM1 + 1, 0x01); /* IER: received data only */
        puts("uartirq: ready for input\n");
    } else if (step == 2 && received >= 4) {
        line[received] = 0;
        puts("uartirq: got '");
        puts((const char *)line);
        puts("' in ");
        putdec(interrupts);
        puts(" interrupts\n");
        exit(0);
    }
    wait_for_interrupt();
}

int kmain(u32 magic, struct multiboot_info *mbi)
{
    (void)magic;
    (void)mbi;
    /* Only the IOAPIC path: mask the 8259s and the LAPIC's LINT0. */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    mmio_write(LAPIC + 0x350, 1u << 16);
    mmio_write(LAPIC + 0x80, 0);          /* TPR: take everything */
    mmio_write(LAPIC + 0xf0, 0x100 | 0xff); /* enable, spurious vector 0xff */
    for (int v = 0; v < 256; v++)
        gate(v, isr_spurious);
    gate(VECTOR, isr_uart);
    idtr.limit = sizeof(idt) - 1;
    idtr.base = (u32)idt;
    __asm__ volatile("lidt %0" : : "m"(idtr));
    /* Redirection entry 4: fixed delivery, physical destination APIC 0,
     * edge, active high, unmasked. */
    u32 id = mmio_read(LAPIC + 0x20) >> 24;
    ioapic_write(0x10 + 2 * 4 + 1, id << 24);
    ioapic_write(0x10 + 2 * 4, VECTOR);
    step = 1;
    outb(COM1 + 1, 0x02); /* IER: transmit holding register empty */
    wait_for_interrupt();
}
