/* Reads the vCPU count from fw_cfg and the LAPICs from the ACPI MADT,
 * checks they agree, then starts every AP with INIT/SIPI through the
 * LAPIC; each AP prints its APIC id. */
#include "lib.h"

#define LAPIC 0xfee00000
#define TRAMP 0x9000
#define MAX_APS 16

extern char tramp_start[], tramp_end[];
volatile u32 ap_next;
u8 ap_stacks[(MAX_APS + 1) * 4096] __attribute__((aligned(16)));
static volatile u32 started, print_lock;

static u32 lapic_read(u32 reg) { return *(volatile u32 *)(LAPIC + reg); }
static void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC + reg) = v; }

static void lock(void)
{
    while (__sync_lock_test_and_set(&print_lock, 1))
        pause();
}

static void unlock(void) { __sync_lock_release(&print_lock); }

void ap_main(void)
{
    u32 id = lapic_read(0x20) >> 24;
    lock();
    puts("smp: AP with APIC id ");
    putdec(id);
    puts(" is up\n");
    unlock();
    __sync_fetch_and_add(&started, 1);
}

static void ipi(u32 icr)
{
    lapic_write(0x310, 0);
    lapic_write(0x300, icr);
    while (lapic_read(0x300) & (1 << 12)) /* delivery pending */
        pause();
}

int kmain(u32 magic, struct multiboot_info *mbi)
{
    (void)magic;
    (void)mbi;
    char sig[5] = {0};
    u16 cpus = 0;
    fw_cfg_read(0x00, sig, 4);
    fw_cfg_read(0x05, &cpus, 2);
    puts("smp: fw_cfg signature '");
    puts(sig);
    puts("', ");
    putdec(cpus);
    puts(" CPUs\n");
    const u8 *madt = acpi_find("APIC");
    if (!madt) {
        puts("smp: no MADT\n");
        return 6;
    }
    u32 lapics = 0;
    puts("smp: MADT LAPIC ids:");
    for (u32 at = 44; at < acpi_u32(madt + 4); at += madt[at + 1]) {
        if (madt[at] == 0 && (madt[at + 4] & 1)) {
            putc(' ');
            putdec(madt[at + 3]);
            lapics++;
        }
    }
    puts(", LAPIC at ");
    puthex(acpi_u32(madt + 36));
    putc('\n');
    if (lapics != cpus || cpus > MAX_APS + 1 || acpi_u32(madt + 36) != LAPIC) {
        puts("smp: FAIL, MADT and fw_cfg disagree\n");
        return 6;
    }
    u16 pm = pm_timer_port();
    puts("smp: BSP APIC id ");
    putdec(lapic_read(0x20) >> 24);
    putc('\n');
    lapic_write(0xf0, lapic_read(0xf0) | 0x1ff); /* software-enable */
    for (char *s = tramp_start, *d = (char *)TRAMP; s < tramp_end; s++, d++)
        *d = *s;
    ipi(0x000c4500); /* INIT, assert, to all but self */
    pm_wait(pm, 35795); /* 10 ms */
    for (int i = 0; i < 2; i++) {
        ipi(0x000c4600 | (TRAMP >> 12)); /* SIPI */
        pm_wait(pm, 716); /* 200 us */
    }
    for (int waited = 0; started < (u32)cpus - 1 && waited < 100; waited++)
        pm_wait(pm, 35795);
    lock();
    puts("smp: ");
    putdec(started);
    puts(" of ");
    putdec(cpus - 1);
    puts(" APs started\n");
    unlock();
    return started == (u32)cpus - 1 ? 0 : 7;
}
