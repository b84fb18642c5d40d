/* Prints what the multiboot loader handed over; exits with status=N from
 * the command line (0 if absent). */
#include "lib.h"

int kmain(u32 magic, struct multiboot_info *mbi)
{
    puts("hello: multiboot magic ");
    puthex(magic);
    if (magic != 0x2BADB002) {
        puts(" is wrong\n");
        return 2;
    }
    puts(" ok\nhello: memory ");
    putdec(mbi->mem_lower);
    puts(" KiB low, ");
    putdec(mbi->mem_upper);
    puts(" KiB high\n");
    int status = 0;
    if (mbi->flags & (1 << 2)) {
        const char *c = (const char *)mbi->cmdline;
        puts("hello: cmdline '");
        puts(c);
        puts("'\n");
        for (; *c; c++) {
            if (!strncmp(c, "status=", 7)) {
                status = 0;
                for (c += 7; *c >= '0' && *c <= '9'; c++)
                    status = status * 10 + (*c - '0');
                break;
            }
        }
    }
    if ((mbi->flags & (1 << 3)) && mbi->mods_count) {
        struct multiboot_module *m = (struct multiboot_module *)mbi->mods_addr;
        puts("hello: initrd ");
        putdec(m->end - m->start);
        puts(" bytes at ");
        puthex(m->start);
        puts(": ");
        for (u32 a = m->start; a < m->end && a < m->start + 32; a++) {
            char ch = *(const char *)a;
            if (ch == '\n')
                break;
            putc(ch);
        }
        putc('\n');
    }
    puts("hello: exiting with ");
    putdec(status);
    putc('\n');
    return status;
}
