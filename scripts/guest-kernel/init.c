/*
 * The guest's /init (and /sbin/init on the rootfs image): print a marker
 * on the console and power the VM off. Freestanding (no libc): raw
 * system calls, so it builds with gcc alone and the image stays tiny.
 * Under PVM guest user mode cannot make system calls, so there the
 * kernel's "Run /init as init process" is the last thing seen.
 */
#define SYS_write 1
#define SYS_open 2
#define SYS_reboot 169
#define O_WRONLY 1
#define LINUX_REBOOT_MAGIC1 0xfee1dead
#define LINUX_REBOOT_MAGIC2 672274793
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321fedc

static long sys3(long n, long a, long b, long c)
{
	long ret;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return ret;
}

static long sys4(long n, long a, long b, long c, long d)
{
	long ret;
	register long r10 __asm__("r10") = d;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10)
			 : "rcx", "r11", "memory");
	return ret;
}

void _start(void)
{
	static const char msg[] = "brisk-init: userspace reached\n";
	/* The kernel opens /dev/console as fds 0-2 when it exists. */
	if (sys3(SYS_write, 1, (long)msg, sizeof(msg) - 1) < 0) {
		long fd = sys3(SYS_open, (long)"/dev/console", O_WRONLY, 0);
		sys3(SYS_write, fd, (long)msg, sizeof(msg) - 1);
	}
	sys4(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
	     LINUX_REBOOT_CMD_POWER_OFF, 0);
	for (;;)
		;
}
