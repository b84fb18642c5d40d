/* Times `inl` from a port nobody claims (every one is an exit to the VMM)
 * and from the PM timer, in TSC cycles, as kvm-unit-tests' vmexit does;
 * the TSC rate is calibrated against the PM timer. */
#include "lib.h"

#define N 2000
#define UNCLAIMED 0x80

static u64 time_inl(u16 port)
{
    u64 t0 = rdtsc();
    for (int i = 0; i < N; i++)
        (void)inl(port);
    return udiv(rdtsc() - t0, N);
}

int kmain(u32 magic, struct multiboot_info *mbi)
{
    (void)magic;
    (void)mbi;
    u16 pm = pm_timer_port();
    if (!pm)
        return 3;
    /* TSC ticks in 100 ms of PM timer (357954 ticks). */
    u64 t0 = rdtsc();
    pm_wait(pm, 357954);
    u64 tsc_khz = udiv(rdtsc() - t0, 100);
    puts("inl: TSC ");
    putdec(udiv(tsc_khz, 1000));
    puts(" MHz\n");
    u32 unclaimed_ones = inl(UNCLAIMED);
    u64 cycles = time_inl(UNCLAIMED);
    puts("inl: unassigned port ");
    puthex(UNCLAIMED);
    puts(" reads ");
    puthex(unclaimed_ones);
    puts(", ");
    putdec(cycles);
    puts(" cycles per inl (");
    putdec(udiv(cycles * 1000000, (u32)tsc_khz));
    puts(" ns)\n");
    u64 pm_cycles = time_inl(pm);
    puts("inl: PM timer port, ");
    putdec(pm_cycles);
    puts(" cycles per inl (");
    putdec(udiv(pm_cycles * 1000000, (u32)tsc_khz));
    puts(" ns)\n");
    return unclaimed_ones == 0xffffffff ? 0 : 5;
}
