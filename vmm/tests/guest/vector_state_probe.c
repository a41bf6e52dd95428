/*
 * Runs inside a podbox guest. Two processes share one CPU and each keeps
 * its own pattern in the vector registers across sched_yield(): the upper
 * halves of ymm0-15 (AVX) and all of zmm16-31 (AVX-512, what glibc's
 * memcpy uses on such CPUs). The guest kernel must save and restore that
 * state when it switches between them; a guest kernel that saves only the
 * FXSAVE part (x87 and xmm) leaks one process's registers into the other.
 *
 * Prints one line per register set:
 *   vector probe avx: bad=<n> of <iterations>
 *   vector probe avx512: bad=<n> of <iterations>
 * or "vector probe <set>: not supported" when the CPU lacks it.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define ITERATIONS 1000

static void fill(uint64_t *words, int n, uint64_t tag)
{
	for (int i = 0; i < n; i++)
		words[i] = tag * 0x0101010101010101ull + i;
}

/* ymm0-15 loaded, a syscall (sched_yield), ymm0-15 stored. */
__attribute__((target("avx"))) static int avx_round(const uint64_t *in, uint64_t *out)
{
	__asm__ volatile(
		"vmovdqu 0(%0), %%ymm0\n vmovdqu 32(%0), %%ymm1\n vmovdqu 64(%0), %%ymm2\n vmovdqu 96(%0), %%ymm3\n"
		"vmovdqu 128(%0), %%ymm4\n vmovdqu 160(%0), %%ymm5\n vmovdqu 192(%0), %%ymm6\n vmovdqu 224(%0), %%ymm7\n"
		"vmovdqu 256(%0), %%ymm8\n vmovdqu 288(%0), %%ymm9\n vmovdqu 320(%0), %%ymm10\n vmovdqu 352(%0), %%ymm11\n"
		"vmovdqu 384(%0), %%ymm12\n vmovdqu 416(%0), %%ymm13\n vmovdqu 448(%0), %%ymm14\n vmovdqu 480(%0), %%ymm15\n"
		"mov $24, %%eax\n syscall\n"
		"vmovdqu %%ymm0, 0(%1)\n vmovdqu %%ymm1, 32(%1)\n vmovdqu %%ymm2, 64(%1)\n vmovdqu %%ymm3, 96(%1)\n"
		"vmovdqu %%ymm4, 128(%1)\n vmovdqu %%ymm5, 160(%1)\n vmovdqu %%ymm6, 192(%1)\n vmovdqu %%ymm7, 224(%1)\n"
		"vmovdqu %%ymm8, 256(%1)\n vmovdqu %%ymm9, 288(%1)\n vmovdqu %%ymm10, 320(%1)\n vmovdqu %%ymm11, 352(%1)\n"
		"vmovdqu %%ymm12, 384(%1)\n vmovdqu %%ymm13, 416(%1)\n vmovdqu %%ymm14, 448(%1)\n vmovdqu %%ymm15, 480(%1)\n"
		"vzeroupper\n"
		:
		: "r"(in), "r"(out)
		: "rax", "rcx", "r11", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
		  "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
	return 512;
}

/* zmm16-31 loaded, a syscall, zmm16-31 stored (64 bytes each). */
__attribute__((target("avx512f"))) static int avx512_round(const uint64_t *in, uint64_t *out)
{
	__asm__ volatile(
		"vmovdqu64 0(%0), %%zmm16\n vmovdqu64 64(%0), %%zmm17\n vmovdqu64 128(%0), %%zmm18\n vmovdqu64 192(%0), %%zmm19\n"
		"vmovdqu64 256(%0), %%zmm20\n vmovdqu64 320(%0), %%zmm21\n vmovdqu64 384(%0), %%zmm22\n vmovdqu64 448(%0), %%zmm23\n"
		"vmovdqu64 512(%0), %%zmm24\n vmovdqu64 576(%0), %%zmm25\n vmovdqu64 640(%0), %%zmm26\n vmovdqu64 704(%0), %%zmm27\n"
		"vmovdqu64 768(%0), %%zmm28\n vmovdqu64 832(%0), %%zmm29\n vmovdqu64 896(%0), %%zmm30\n vmovdqu64 960(%0), %%zmm31\n"
		"mov $24, %%eax\n syscall\n"
		"vmovdqu64 %%zmm16, 0(%1)\n vmovdqu64 %%zmm17, 64(%1)\n vmovdqu64 %%zmm18, 128(%1)\n vmovdqu64 %%zmm19, 192(%1)\n"
		"vmovdqu64 %%zmm20, 256(%1)\n vmovdqu64 %%zmm21, 320(%1)\n vmovdqu64 %%zmm22, 384(%1)\n vmovdqu64 %%zmm23, 448(%1)\n"
		"vmovdqu64 %%zmm24, 512(%1)\n vmovdqu64 %%zmm25, 576(%1)\n vmovdqu64 %%zmm26, 640(%1)\n vmovdqu64 %%zmm27, 704(%1)\n"
		"vmovdqu64 %%zmm28, 768(%1)\n vmovdqu64 %%zmm29, 832(%1)\n vmovdqu64 %%zmm30, 896(%1)\n vmovdqu64 %%zmm31, 960(%1)\n"
		:
		: "r"(in), "r"(out)
		: "rax", "rcx", "r11", "memory", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21",
		  "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31");
	return 1024;
}

/* Rounds of `round` with this process's pattern; returns mismatches. */
static int run(int (*round)(const uint64_t *, uint64_t *), uint64_t tag)
{
	static uint64_t in[128] __attribute__((aligned(64)));
	static uint64_t out[128] __attribute__((aligned(64)));
	int bad = 0;

	fill(in, 128, tag);
	for (int i = 0; i < ITERATIONS; i++) {
		memset(out, 0, sizeof(out));
		int bytes = round(in, out);
		if (memcmp(in, out, bytes) != 0)
			bad++;
	}
	return bad;
}

/* Parent and child on CPU 0, each with its own pattern. */
static void probe(const char *name, int (*round)(const uint64_t *, uint64_t *))
{
	int status = 0;
	pid_t child = fork();

	if (child == 0) {
		int bad = run(round, 0xa5);
		_exit(bad > 255 ? 255 : bad);
	}
	int bad = run(round, 0x3c);
	waitpid(child, &status, 0);
	if (WIFEXITED(status))
		bad += WEXITSTATUS(status);
	else
		bad += ITERATIONS;
	printf("vector probe %s: bad=%d of %d\n", name, bad, 2 * ITERATIONS);
}

int main(void)
{
	cpu_set_t cpu0;

	CPU_ZERO(&cpu0);
	CPU_SET(0, &cpu0);
	sched_setaffinity(0, sizeof(cpu0), &cpu0);
	__builtin_cpu_init();
	if (__builtin_cpu_supports("avx"))
		probe("avx", avx_round);
	else
		printf("vector probe avx: not supported\n");
	if (__builtin_cpu_supports("avx512f"))
		probe("avx512", avx512_round);
	else
		printf("vector probe avx512: not supported\n");
	fflush(stdout);
	return 0;
}
