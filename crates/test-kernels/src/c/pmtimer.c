/* Finds the PM timer through the FADT and checks it runs at 3.579545 MHz
 * within 5%, timing it against PIT channel 2 (1.193182 MHz). The vCPU can
 * be preempted anywhere (a PIO exit to a busy host's user space makes
 * that likelier), so each round brackets its two instants with PM timer
 * reads: the PIT's start lies between the reads around the write that
 * starts it, and OUT2's rise between the last read that still saw it low
 * and the one after it rose. A round whose brackets are wider than 1 ms
 * measured the host's scheduler, not the timer: it is not counted. The
 * best of the counted rounds (up to 40, until 5 are counted) is what the
 * timer does. */
#include "lib.h"

#define PIT_HZ 1193182
#define PM_HZ 3579545
#define PIT_COUNT 59659 /* 50 ms */

int kmain(u32 magic, struct multiboot_info *mbi)
{
    (void)magic;
    (void)mbi;
    u16 port = pm_timer_port();
    puts("pmtimer: FADT PM timer block at ");
    puthex(port);
    putc('\n');
    if (!port)
        return 3;
    u32 best = ~0u, counted = 0;
    for (int round = 0; round < 40 && counted < 5; round++) {
        /* Channel 2, mode 0 (interrupt on terminal count), gate on,
         * speaker off: OUT2 (port 0x61 bit 5) rises after PIT_COUNT ticks. */
        outb(0x61, (inb(0x61) & ~0x02) | 0x01);
        outb(0x43, 0xb0);
        outb(0x42, PIT_COUNT & 0xff);
        u32 a0 = inl(port) & 0xffffff;
        outb(0x42, PIT_COUNT >> 8);
        u32 a1 = inl(port) & 0xffffff, b0 = a1, b1;
        for (;;) {
            u32 t = inl(port) & 0xffffff;
            if (inb(0x61) & 0x20) {
                b1 = inl(port) & 0xffffff; /* after a read that saw it high */
                break;
            }
            b0 = t; /* before a read that saw it low */
        }
        u32 wa = (a1 - a0) & 0xffffff, wb = (b1 - b0) & 0xffffff;
        if (wa + wb > PM_HZ / 1000)
            continue; /* preempted: this round timed the scheduler */
        counted++;
        /* From the middle of one bracket to the middle of the other. */
        u32 ticks = ((b0 + wb / 2) - (a0 + wa / 2)) & 0xffffff;
        u32 hz = (u32)udiv((u64)ticks * PIT_HZ, PIT_COUNT);
        u32 off = hz > PM_HZ ? hz - PM_HZ : PM_HZ - hz;
        u32 permille = (u32)udiv((u64)off * 1000, PM_HZ);
        if (permille < best)
            best = permille;
        puts("pmtimer: ");
        putdec(ticks);
        puts(" ticks in 50 ms of PIT channel 2 = ");
        putdec(hz);
        puts(" Hz (off by ");
        putdec(permille);
        puts(" per mille)\n");
    }
    if (!counted) {
        puts("pmtimer: FAIL, every round was preempted\n");
        return 5;
    }
    if (best > 50) {
        puts("pmtimer: FAIL, more than 5% off 3579545 Hz\n");
        return 4;
    }
    puts("pmtimer: ok, within 5% of 3579545 Hz\n");
    return 0;
}
