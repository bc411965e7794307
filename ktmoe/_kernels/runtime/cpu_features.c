/* cpu_features.c: what this CPU and OS allow (CPUID + XGETBV), detected once per process, and the
 * Linux request for AMX tile state. The targets' needs (kt_isas.h) are checked against these bits
 * by ktmoe/_cpu.py, which picks the target; no kernel file asks the CPU anything itself. */
#define _GNU_SOURCE
#include "ktmoe.h"
#include <cpuid.h>
#include <errno.h>
#include <unistd.h>
#include <sys/syscall.h>

#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static const char *const feature_names[KT_NFEATURE] = {
    "avx2", "fma", "f16c", "avx_vnni", "avx512", "avx512_bf16", "avx512_vnni",
    "amx_tile", "amx_bf16", "amx_int8", "amx_os", "amx_perm"};

const char *kt_feature_name(int i) { return i >= 0 && i < KT_NFEATURE ? feature_names[i] : "?"; }

static uint64_t read_xcr0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static unsigned detect(void) {
    unsigned a, b, c, d, f = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    uint64_t xcr0 = osxsave ? read_xcr0() : 0;
    int os_ymm = (xcr0 & 0x6) == 0x6;                /* SSE, AVX */
    int os_zmm = (xcr0 & 0xe6) == 0xe6;              /* SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM */
    int os_tile = ((xcr0 >> 17) & 3) == 3;           /* XTILECFG + XTILEDATA */
    if (os_ymm && avx && fma) f |= KT_F_FMA;
    if (os_ymm && avx && f16c) f |= KT_F_F16C;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
    unsigned max7 = a;
    if (os_ymm && avx && ((b >> 5) & 1)) f |= KT_F_AVX2;
    int f512 = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
    int avx512 = os_zmm && f512 && dq && bw && vl;
    if (avx512) f |= KT_F_AVX512;
    if (avx512 && ((c >> 11) & 1)) f |= KT_F_AVX512_VNNI;
    if ((d >> 24) & 1) f |= KT_F_AMX_TILE;
    if ((d >> 22) & 1) f |= KT_F_AMX_BF16;
    if ((d >> 25) & 1) f |= KT_F_AMX_INT8;
    if (os_tile) f |= KT_F_AMX_OS;
    if (max7 >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) {
        if (avx512 && ((a >> 5) & 1)) f |= KT_F_AVX512_BF16;
        if (os_ymm && ((a >> 4) & 1)) f |= KT_F_AVX_VNNI;
    }
    unsigned amx = KT_F_AMX_TILE | KT_F_AMX_OS;
    if ((f & amx) == amx && kt_amx_request_permission() == 0) f |= KT_F_AMX_PERM;
    return f;
}

unsigned kt_cpu_features(void) {
    static int done = 0;
    static unsigned bits = 0;
    if (!__atomic_load_n(&done, __ATOMIC_ACQUIRE)) { /* racing first calls compute the same bits */
        bits = detect();
        __atomic_store_n(&done, 1, __ATOMIC_RELEASE);
    }
    return bits;
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
