/*
 * /idle: keep a Linux guest up, doing nothing, for as long as a test
 * needs it (rdinit=/idle or init=/idle). It spins with PAUSE and makes no
 * system call, so it runs where guest user mode cannot make one (PVM),
 * and the kernel underneath still serves interrupts: its network stack
 * answers a ping, its drivers complete I/O.
 */
void _start(void)
{
	for (;;)
		__asm__ volatile("pause");
}
