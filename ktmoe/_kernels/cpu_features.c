/* cpu_features.c: what this CPU and OS allow (CPUID + XGETBV), and the Linux request for
 * AMX tile state. The dispatch decision itself lives in ktmoe/_cpu.py, which reads these. */
#define _GNU_SOURCE
#include "ktmoe.h"
#include <cpuid.h>
#include <errno.h>
#include <unistd.h>
#include <sys/syscall.h>

#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static uint64_t read_xcr0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

void kt_cpu_detect(kt_cpu_features *f) {
    unsigned a, b, c, d;
    *f = (kt_cpu_features){0};
    if (!__get_cpuid(1, &a, &b, &c, &d)) return;
    int osxsave = (c >> 27) & 1;
    uint64_t xcr0 = osxsave ? read_xcr0() : 0;
    int os_zmm = (xcr0 & 0xe6) == 0xe6;             /* SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM */
    int os_tile = ((xcr0 >> 17) & 3) == 3;           /* XTILECFG + XTILEDATA */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return;
    int f512 = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
    f->avx512 = os_zmm && f512 && dq && bw && vl;
    f->avx512_vnni = f->avx512 && ((c >> 11) & 1);
    f->amx_bf16 = (d >> 22) & 1;
    f->amx_tile = (d >> 24) & 1;
    f->amx_int8 = (d >> 25) & 1;
    f->amx_os = os_tile;
    if (a >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d))
        f->avx512_bf16 = f->avx512 && ((a >> 5) & 1);
}

int kt_amx_request_permission(void) {
    static int result = 1; /* 1 = not asked yet */
    if (result != 1) return result;
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) {
        result = errno ? errno : EPERM;
        return result;
    }
    unsigned long bitmask = 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &bitmask) != 0 ||
        !(bitmask & (1ul << XFEATURE_XTILEDATA)))
        result = EPERM;
    else
        result = 0;
    return result;
}
