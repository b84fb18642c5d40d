/* The little a test kernel needs: port I/O, COM1, exit, fw_cfg, ACPI. */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u64 rdtsc(void) { u64 v; __asm__ volatile("rdtsc" : "=A"(v)); return v; }
static inline void pause(void) { __asm__ volatile("pause"); }

struct multiboot_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
    u32 syms[4], mmap_length, mmap_addr;
};
struct multiboot_module { u32 start, end, string, reserved; };

void putc(char c);
void puts(const char *s);
void putdec(u64 v);
void puthex(u32 v);
void exit(int code) __attribute__((noreturn));
u64 udiv(u64 n, u32 d);
int strncmp(const char *a, const char *b, u32 n);

void fw_cfg_read(u16 key, void *buf, u32 len);
/* The ACPI table with this signature (via the RSDP's RSDT), or 0. */
const u8 *acpi_find(const char *sig);
u32 acpi_u32(const u8 *p);
/* The PM timer port from the FADT (0 if none), and its 24-bit count. */
u16 pm_timer_port(void);
/* Busy-wait `ticks` of the 3.579545 MHz PM timer. */
void pm_wait(u16 port, u32 ticks);
