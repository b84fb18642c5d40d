/* Placeholder replaced below. */
#include "lib.h"
int kmain(u32 magic, struct multiboot_info *mbi) { (void)magic; (void)mbi; return 0; }
