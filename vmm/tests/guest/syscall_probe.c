/*
 * Runs inside a podbox guest. Checks that the PVM syscall-completion patch
 * grants nothing to a process that jumps straight to the kernel's syscall
 * entry (which it can find in /proc/kallsyms) with a forged R11/RCX:
 *
 *   real:   a real getpid() for reference, and the IOPL it runs with
 *   forged: jump to entry_SYSCALL_64 with R11 = RFLAGS | IOPL 3, RCX = a
 *           user label: prints "returned pid=<n> iopl=<n>" or "signal=<n>"
 *   noncanonical: the same jump with a non-canonical RCX (SYSRET would
 *           refuse it): prints the signal that ended the child
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define IOPL_MASK 0x3000UL

static unsigned long find_symbol(const char *name)
{
	FILE *f = fopen("/proc/kallsyms", "r");
	char line[256], sym[128], type;
	unsigned long addr;

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%lx %c %127s", &addr, &type, sym) == 3 && !strcmp(sym, name)) {
			fclose(f);
			return addr;
		}
	}
	fclose(f);
	return 0;
}

static unsigned long flags_now(void)
{
	unsigned long fl;
	asm volatile("pushfq; popq %0" : "=r"(fl));
	return fl;
}

/* In a child: jump to `entry` as if SYSCALL had, with forged R11/RCX. */
static void forged_jump(unsigned long entry, int noncanonical)
{
	register unsigned long r11 asm("r11") = flags_now() | IOPL_MASK;
	unsigned long ret, fl;

	if (noncanonical)
		asm volatile("movabs $0x8000000000000000, %%rcx\n\t"
			     "jmp *%[entry]\n\t"
			     : "+r"(r11)
			     : "a"((long)SYS_getpid), [entry] "r"(entry)
			     : "rcx", "memory");
	asm volatile("lea 1f(%%rip), %%rcx\n\t"
		     "jmp *%[entry]\n\t"
		     "1:\n\t"
		     "pushfq\n\t"
		     "popq %[fl]\n\t"
		     : "=a"(ret), [fl] "=r"(fl), "+r"(r11)
		     : "a"((long)SYS_getpid), [entry] "r"(entry)
		     : "rcx", "memory");
	printf("probe forged: returned pid=%lu iopl=%lu\n", ret, (fl & IOPL_MASK) >> 12);
	fflush(stdout);
	_exit(0);
}

static void run_child(const char *what, unsigned long entry, int noncanonical)
{
	int status;
	pid_t pid = fork();

	if (pid == 0)
		forged_jump(entry, noncanonical);
	waitpid(pid, &status, 0);
	if (WIFSIGNALED(status))
		printf("probe %s: signal=%d\n", what, WTERMSIG(status));
	fflush(stdout);
}

int main(void)
{
	unsigned long entry = find_symbol("entry_SYSCALL_64");

	printf("probe real: pid=%ld iopl=%lu\n", syscall(SYS_getpid), (flags_now() & IOPL_MASK) >> 12);
	if (!entry) {
		printf("probe entry: not found\n");
		return 1;
	}
	printf("probe entry: %#lx\n", entry);
	fflush(stdout);
	run_child("forged", entry, 0);
	run_child("noncanonical", entry, 1);
	return 0;
}
