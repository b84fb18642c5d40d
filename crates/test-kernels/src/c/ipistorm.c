/* An IPI storm through the x2APIC: every vCPU plays ping-pong with every
 * other, ROUNDS round trips each way, all at once. A ping from CPU i is
 * vector 0x40 + i, the answer from CPU j vector 0x80 + j, and a CPU
 * sends its next ping to j only when j's pong came back: no vector is
 * ever sent twice before it was taken, so every IPI is counted and one
 * lost IPI stops its pair for good (the host's bound on the run fails
 * it). CPUs wait for interrupts with sti; hlt. The BSP prints progress
 * every ROUNDS / 5 round trips with CPU 1 and, given "hold" on its command
 * line, holds that pair there until a byte arrives on COM1 (the other
 * pairs storm on, and the run cannot end before the host lets it go: a
 * host saves and restores the VM there). At the end it checks every count and prints the time
 * per round trip by the TSC (calibrated on the PM timer). Needs 2-8 CPUs.
 *
 * With "timer" on its command line it measures instead, on the BSP
 * alone, how late the LAPIC timer's interrupt is: TIMER_SAMPLES one-shot
 * counts of 200 us (TMICT at divide-by-1 of the 1 GHz APIC bus that both
 * KVM's and brisk's LAPICs model), each handler's TSC against the arming
 * TSC plus 200 us, and prints the median and p99 lateness. */
#include "lib.h"

#define MAX_CPUS 8
#define ROUNDS 2000
#define DONE 0x30
#define PING 0x40
#define PONG 0x80
#define TRAMP 0x9000
#define TIMER 0x31
#define TIMER_SAMPLES 200
#define TIMER_US 200

static inline u64 rdmsr(u32 i)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(i));
    return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 i, u64 v)
{
    __asm__ volatile("wrmsr" : : "c"(i), "a"((u32)v), "d"((u32)(v >> 32)));
}

struct gate { u16 off_lo, sel; u8 zero, type; u16 off_hi; } __attribute__((packed));
static struct gate idt[256];
static struct { u16 limit; u32 base; } __attribute__((packed)) idtr;
extern const u32 storm_vectors[], storm_stubs[];
extern char tramp_start[], tramp_end[];

/* The AP start-up stacks smp_boot.S takes, then each CPU's handler stack. */
volatile u32 ap_next;
u8 ap_stacks[(MAX_CPUS + 1) * 4096] __attribute__((aligned(16)));
static u8 stacks[MAX_CPUS][4096] __attribute__((aligned(16)));
static u32 cpus;
static volatile u32 pings[MAX_CPUS][MAX_CPUS]; /* [to][from] */
static volatile u32 pongs[MAX_CPUS][MAX_CPUS]; /* [to][from] */
static volatile u32 done[MAX_CPUS];
static volatile u32 up, go, finished, reported, hold, held;
static u64 t0, tsc_per_ms;
static volatile u32 timer_mode, fired;
static u64 armed_at, late_ns[TIMER_SAMPLES];


/* One-shot LAPIC timer, TIMER_US from now. */
static void arm_timer(void)
{
    armed_at = rdtsc();
    __asm__ volatile("" ::: "memory");
    wrmsr(0x838, TIMER_US * 1000); /* TMICT: ns at divide-by-1 */
}

static void __attribute__((noreturn)) report_timer(void)
{
    /* Insertion sort: 200 samples. */
    for (int i = 1; i < TIMER_SAMPLES; i++)
        for (int j = i; j > 0 && late_ns[j - 1] > late_ns[j]; j--) {
            u64 t = late_ns[j];
            late_ns[j] = late_ns[j - 1];
            late_ns[j - 1] = t;
        }
    puts("timer: ");
    putdec(TIMER_SAMPLES);
    puts(" one-shot interrupts of 200 us: median ");
    putdec(late_ns[TIMER_SAMPLES / 2]);
    puts(" ns, p99 ");
    putdec(late_ns[TIMER_SAMPLES * 99 / 100]);
    puts(" ns late\n");
    exit(0);
}

static u32 me(void) { return (u32)rdmsr(0x802); }
static void send(u32 dest, u32 vector) { wrmsr(0x830, ((u64)dest << 32) | vector); }

/* This CPU's LAPIC in x2APIC mode, software-enabled, taking everything. */
static void x2apic_on(void)
{
    wrmsr(0x1b, rdmsr(0x1b) | (1u << 11) | (1u << 10));
    wrmsr(0x80f, 0x1ff);
    wrmsr(0x808, 0);
    __asm__ volatile("lidt %0" : : "m"(idtr));
}

static void first_pings(u32 id)
{
    for (u32 j = 0; j < cpus; j++)
        if (j != id)
            send(j, PING + id);
}

/* Handle one vector on this CPU; returns the top of its stack. */
u32 storm_isr(u32 vector)
{
    u32 id = me();
    if (vector != 0xff)
        wrmsr(0x80b, 0); /* EOI */
    if (vector == TIMER && timer_mode && fired < TIMER_SAMPLES) {
        u64 due = armed_at + udiv(tsc_per_ms * TIMER_US, 1000);
        u64 now = rdtsc();
        late_ns[fired] = now > due ? udiv((now - due) * 1000000, (u32)tsc_per_ms) : 0;
        if (++fired < TIMER_SAMPLES)
            arm_timer();
    } else if (vector >= PONG && vector < PONG + MAX_CPUS) {
        u32 from = vector - PONG, n = ++pongs[id][from];
        u32 mark = id == 0 && from == 1 && n % (ROUNDS / 5) == 0 && n < ROUNDS;
        if (mark) {
            puts("ipistorm: ");
            putdec(n);
            puts(" round trips with CPU 1\n");
            held = hold;
        }
        if (n < ROUNDS && !(mark && hold))
            send(from, PING + id);
        u32 all = 1;
        for (u32 j = 0; j < cpus; j++)
            all &= j == id || pongs[id][j] >= ROUNDS;
        if (all && !done[id]) {
            done[id] = 1;
            __sync_fetch_and_add(&finished, 1);
            send(0, DONE);
        }
    } else if (vector >= PING && vector < PING + MAX_CPUS) {
        u32 from = vector - PING;
        pings[id][from]++;
        send(from, PONG + id);
    }
    return (u32)&stacks[id][sizeof(stacks[0])];
}

static void __attribute__((noreturn)) report(void)
{
    u64 us = udiv((rdtsc() - t0) * 1000, (u32)tsc_per_ms);
    u32 trips = cpus * (cpus - 1) * ROUNDS, bad = 0;
    for (u32 i = 0; i < cpus; i++)
        for (u32 j = 0; j < cpus; j++)
            if (i != j && (pings[i][j] != ROUNDS || pongs[i][j] != ROUNDS)) {
                puts("ipistorm: CPU ");
                putdec(i);
                puts(" from CPU ");
                putdec(j);
                puts(": ");
                putdec(pings[i][j]);
                puts(" pings, ");
                putdec(pongs[i][j]);
                puts(" pongs\n");
                bad++;
            }
    puts("ipistorm: ");
    putdec(trips);
    puts(" round trips on ");
    putdec(cpus);
    puts(" CPUs in ");
    putdec(us);
    puts(" us: ");
    putdec(udiv(us * 1000, trips));
    puts(" ns per round trip\n");
    exit(bad ? 5 : 0);
}

/* Entered on this CPU's fresh stack after each interrupt. */
void __attribute__((noreturn)) after_irq(void)
{
    if (timer_mode && fired == TIMER_SAMPLES)
        report_timer();
    if (me() == 0 && finished == cpus && !reported) {
        reported = 1;
        report();
    }
    /* Held: the next ping to CPU 1 waits for a byte on COM1 (polled,
     * taking interrupts meanwhile). */
    while (me() == 0 && held) {
        if (inb(0x3f8 + 5) & 1) {
            inb(0x3f8);
            held = 0;
            send(1, PING);
            break;
        }
        __asm__ volatile("sti; pause; cli");
    }
    for (;;)
        __asm__ volatile("sti; hlt; cli");
}

void ap_main(void)
{
    x2apic_on();
    __sync_fetch_and_add(&up, 1);
    while (!go)
        pause();
    first_pings(me());
    after_irq();
}

static void gate(int v, u32 f)
{
    idt[v] = (struct gate){ f & 0xffff, 0x08, 0, 0x8e, f >> 16 };
}

int kmain(u32 magic, struct multiboot_info *mbi)
{
    (void)magic;
    const char *arg = (const char *)mbi->cmdline;
    for (; (mbi->flags & 4) && *arg; arg++)
        if (!strncmp(arg, "hold", 4))
            hold = 1;
        else if (!strncmp(arg, "timer", 5))
            timer_mode = 1;
    u16 n = 0;
    fw_cfg_read(0x05, &n, 2);
    cpus = n;
    u16 pm = pm_timer_port();
    if ((cpus < 2 && !timer_mode) || cpus > MAX_CPUS || !pm) {
        puts("ipistorm: needs 2-8 CPUs and a PM timer\n");
        return 3;
    }
    if (!(rdmsr(0x1b) & (1u << 11))) {
        puts("ipistorm: the APIC is disabled\n");
        return 4;
    }
    for (int i = 0; storm_vectors[i]; i++)
        gate(storm_vectors[i], storm_stubs[i]);
    idtr.limit = sizeof(idt) - 1;
    idtr.base = (u32)idt;
    x2apic_on();
    u64 a = rdtsc();
    pm_wait(pm, 35795); /* 10 ms */
    tsc_per_ms = udiv(rdtsc() - a, 10);
    if (timer_mode) {
        wrmsr(0x83e, 0xb);  /* TDCR: divide by 1 */
        wrmsr(0x832, TIMER); /* LVT timer: one-shot, unmasked */
        arm_timer();
        after_irq();
    }
    for (char *s = tramp_start, *d = (char *)TRAMP; s < tramp_end; s++, d++)
        *d = *s;
    send(0, 0x000c4500); /* INIT, assert, to all but self */
    pm_wait(pm, 35795);
    for (int i = 0; i < 2; i++) {
        send(0, 0x000c4600 | (TRAMP >> 12)); /* SIPI */
        pm_wait(pm, 716);
    }
    while (up < cpus - 1)
        pause();
    puts("ipistorm: ");
    putdec(cpus);
    puts(" CPUs in x2APIC mode, storm starts\n");
    t0 = rdtsc();
    go = 1;
    first_pings(0);
    after_irq();
}
