/* test_igemm.c: standalone check and timing of the int8 GEMMs of gemm_int8.h (dev tooling).
 *
 * (pytest runs the same checks through ktmoe._kernels._gemm.igemm on every target: tests/test_isa.py.)
 * Build (each .c with its target's flags and -DKT_ISA, as meson.build does), from ktmoe/_kernels,
 * with kt_isas.h from a meson build directory (B=../../build/cp311/ktmoe/_kernels):
 *   F="-mavx2 -mfma -mavx512f -mavx512bw -mavx512vl -mavx512dq"; V="$F -mavx512bf16 -mavx512vnni"
 *   gcc -O2 -I$B -DKT_ISA=portable -c gemm/gemm_int8_portable.c -o /tmp/p.o
 *   gcc -O2 -I$B -DKT_ISA=avx2 -mavx2 -mfma -c gemm/gemm_int8_avx2.c -o /tmp/a.o
 *   gcc -O2 -I$B -DKT_ISA=avx512f $F -c gemm/gemm_int8_avx512.c -o /tmp/f.o
 *   gcc -O2 -I$B -DKT_ISA=avx512 $V -c gemm/gemm_int8_avx512.c -o /tmp/v.o
 *   gcc -O2 -I$B -DKT_ISA=amx $V -mamx-tile -mamx-bf16 -mamx-int8 -c gemm/gemm_int8_amx.c -o /tmp/x.o
 *   gcc -O2 -I$B -I. tests_c/test_igemm.c /tmp/[pafvx].o -o /tmp/test_igemm
 * Run:
 *   /tmp/test_igemm            correctness of every function against a naive loop
 *   /tmp/test_igemm bench [name]   single-thread GOP/s (2 M N K / time), to choose crossovers
 *                                  (only the functions whose name contains name; environment:
 *                                  KT_BENCH_M=1,3,12 other M values, KT_BENCH_PAD=p strides
 *                                  p elements longer than the widths)
 *   /tmp/test_igemm [name]         correctness, only the functions whose name contains name
 *
 * Correctness: random int8 in [-127, 127] (and a +-127-only pass for the largest K), every
 * shape of the M x N x K lists below, lda/ldw/ldc larger than the widths, both accumulate
 * modes. A and W are placed so that their last byte ends a mapping followed by a PROT_NONE
 * page (reading past the end faults), and on alternate runs so that they start right after a
 * PROT_NONE page (reading before the start faults); C likewise, with its gaps (ldc > N) and a
 * pad before it filled with a sentinel that must stay untouched.
 */
#define _GNU_SOURCE
#include "gemm/gemm_int8.h"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct { const char *name; kt_igemm_fn fn; int nn; } fn_case;

#define KT_FN_ROWS(name, NAME, needs, flags) {#name "_nt", kt_igemm_nt_##name, 0}, {#name "_nn", kt_igemm_nn_##name, 1},
static const fn_case FNS[] = {KT_ISA_LIST(KT_FN_ROWS)};
enum { NFN = sizeof FNS / sizeof FNS[0] };

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 11);
}
static int8_t rnd_i8(int extreme) { return extreme ? (rnd() & 1 ? 127 : -127) : (int8_t)((int)(rnd() % 255) - 127); }

static long page;

/* A mapping with PROT_NONE pages on both sides; returns a pointer to bytes bytes that end at
 * the upper guard (at_end) or start at the lower one. */
typedef struct { void *base; size_t len; } region;
static void *guarded(region *r, size_t bytes, int at_end) {
    size_t data = (bytes + (size_t)page - 1) / (size_t)page * (size_t)page;
    if (data == 0) data = (size_t)page;
    r->len = data + 2 * (size_t)page;
    r->base = mmap(NULL, r->len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r->base == MAP_FAILED) { perror("mmap"); exit(2); }
    mprotect(r->base, (size_t)page, PROT_NONE);
    mprotect((char *)r->base + page + data, (size_t)page, PROT_NONE);
    char *lo = (char *)r->base + page;
    return at_end ? lo + data - bytes : lo;
}
static void unguard(region *r) { munmap(r->base, r->len); }

#define SENT ((int32_t)0x5a5a1234)
enum { CPAD = 16 };

static int check_one(const fn_case *f, int M, int N, int K, int acc, int at_end, int extreme) {
    const long lda = K + 5, ldw = (f->nn ? N : K) + 3, ldc = N + 7;
    const long wrows = f->nn ? K : N, wcols = f->nn ? N : K;
    size_t abytes = M > 0 && K > 0 ? (size_t)((M - 1) * lda + K) : 0;
    size_t wbytes = wrows > 0 && wcols > 0 ? (size_t)((wrows - 1) * ldw + wcols) : 0;
    size_t cn = M > 0 ? (size_t)((M - 1) * ldc + N) : 0;
    size_t cpad = at_end ? CPAD : 0;
    region ra, rw, rc;
    int8_t *A = guarded(&ra, abytes, at_end);
    int8_t *W = guarded(&rw, wbytes, at_end);
    int32_t *Cb = guarded(&rc, (cpad + cn) * sizeof(int32_t), at_end);
    int32_t *C = Cb + cpad;
    for (size_t i = 0; i < abytes; i++) A[i] = rnd_i8(extreme);
    for (size_t i = 0; i < wbytes; i++) W[i] = rnd_i8(extreme);
    for (size_t i = 0; i < cpad + cn; i++) Cb[i] = SENT;
    int32_t *ref = malloc(sizeof(int32_t) * ((size_t)M * N + 1));
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            int32_t c0 = (int32_t)(rnd() % 2000001) - 1000000;
            C[m * ldc + n] = c0;
            int32_t s = acc ? c0 : 0;
            ref[m * N + n] = s;
        }
    /* reference: int32 sums, k outer for nn so the inner loop is unit stride */
    for (int m = 0; m < M; m++) {
        int32_t *r = ref + (long)m * N;
        const int8_t *a = A + m * lda;
        if (f->nn) {
            for (int k = 0; k < K; k++) {
                const int32_t av = a[k];
                const int8_t *w = W + k * ldw;
                for (int n = 0; n < N; n++) r[n] += av * w[n];
            }
        } else {
            for (int n = 0; n < N; n++) {
                const int8_t *w = W + n * ldw;
                int32_t s = 0;
                for (int k = 0; k < K; k++) s += (int32_t)a[k] * w[k];
                r[n] += s;
            }
        }
    }
    f->fn(M, N, K, A, lda, W, ldw, C, ldc, acc);
    int bad = 0;
    for (size_t i = 0; i < cpad && bad < 5; i++)
        if (Cb[i] != SENT) bad++, printf("  pad before C touched at %zu\n", i);
    for (int m = 0; m < M && bad < 5; m++)
        for (long j = 0; j < (m == M - 1 ? N : ldc) && bad < 5; j++) {
            int32_t got = C[m * ldc + j];
            int32_t want = j < N ? ref[m * N + j] : SENT;
            if (got != want) bad++, printf("  C[%d,%ld] = %d, want %d\n", m, j, got, want);
        }
    if (bad)
        printf("FAIL %s M=%d N=%d K=%d acc=%d at_end=%d extreme=%d\n", f->name, M, N, K, acc, at_end, extreme);
    free(ref);
    unguard(&ra), unguard(&rw), unguard(&rc);
    return bad != 0;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static double bench_one(const fn_case *f, int M, int N, int K) {
    /* KT_BENCH_PAD=p: strides p elements longer than the widths (default 0: packed) */
    const long pad = getenv("KT_BENCH_PAD") ? atol(getenv("KT_BENCH_PAD")) : 0;
    const long lda = K + pad, ldw = (f->nn ? N : K) + pad, ldc = N + pad;
    const size_t an = (size_t)(M * lda), wn = (size_t)((f->nn ? K : N) * ldw), cn = (size_t)(M * ldc);
    int8_t *A = aligned_alloc(64, an + 64), *W = aligned_alloc(64, wn + 64);
    int32_t *C = aligned_alloc(64, sizeof(int32_t) * cn + 64);
    for (size_t i = 0; i < an; i++) A[i] = rnd_i8(0);
    for (size_t i = 0; i < wn; i++) W[i] = rnd_i8(0);
    memset(C, 0, sizeof(int32_t) * cn);
    f->fn(M, N, K, A, lda, W, ldw, C, ldc, 0); /* warm-up */
    double best = 1e30;
    for (int rep = 0; rep < 25; rep++) { /* best of 25 short runs: robust to a busy machine */
        int iters = 0;
        double t0 = now(), t;
        do {
            f->fn(M, N, K, A, lda, W, ldw, C, ldc, 0);
            iters++;
        } while ((t = now() - t0) < 0.01);
        if (t / iters < best) best = t / iters;
    }
    free(A), free(W), free(C);
    return 2.0 * M * N * K / best * 1e-9;
}

int main(int argc, char **argv) {
    page = sysconf(_SC_PAGESIZE);
    int amx_ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    if (!amx_ok) perror("arch_prctl(ARCH_REQ_XCOMP_PERM): the amx functions are skipped");
    /* the caller picks only functions this CPU can run (name filter) */
    if (argc > 1 && !strcmp(argv[1], "bench")) {
        static int Ms[16] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512};
        unsigned nms = 10;
        if (getenv("KT_BENCH_M")) { /* KT_BENCH_M=1,3,12: other M values */
            char *e = getenv("KT_BENCH_M");
            for (nms = 0; nms < 16 && *e; nms++) {
                Ms[nms] = (int)strtol(e, &e, 10);
                if (*e == ',') e++;
            }
        }
        for (int nn = 0; nn < 2; nn++) {
            const int N = 256, K = nn ? 1536 : 2048;
            printf("%s N=%d K=%d: GOP/s\n%-12s", nn ? "nn" : "nt", N, K, "M");
            for (unsigned i = 0; i < nms; i++) printf("%8d", Ms[i]);
            printf("\n");
            for (int j = 0; j < NFN; j++) {
                if (FNS[j].nn != nn || (argc > 2 && !strstr(FNS[j].name, argv[2]))) continue;
                if (!amx_ok && !strncmp(FNS[j].name, "amx", 3)) continue;
                printf("%-12s", FNS[j].name);
                for (unsigned i = 0; i < nms; i++) {
                    printf("%8.1f", bench_one(&FNS[j], Ms[i], N, K));
                    fflush(stdout);
                }
                printf("\n");
            }
        }
        return 0;
    }
    static const int Ms[] = {0, 1, 2, 3, 5, 15, 16, 17, 31, 33, 64, 65, 200, 513};
    static const int Ns[] = {1, 15, 16, 17, 64, 100, 128, 256};
    static const int Ks[] = {0, 1, 3, 4, 63, 64, 65, 128, 768, 2048};
    const char *only = argc > 1 ? argv[1] : NULL;
    int fails = 0, runs = 0;
    for (int j = 0; j < NFN; j++) {
        if (only && !strstr(FNS[j].name, only)) continue;
        if (!amx_ok && !strncmp(FNS[j].name, "amx", 3)) continue;
        int f0 = fails;
        double t0 = now();
        for (unsigned im = 0; im < sizeof Ms / sizeof Ms[0]; im++)
            for (unsigned in = 0; in < sizeof Ns / sizeof Ns[0]; in++)
                for (unsigned ik = 0; ik < sizeof Ks / sizeof Ks[0]; ik++)
                    for (int acc = 0; acc < 2; acc++) {
                        const int M = Ms[im], N = Ns[in], K = Ks[ik];
                        const int at_end = (int)((im + in + ik + acc) & 1);
                        fails += check_one(&FNS[j], M, N, K, acc, at_end, 0);
                        runs++;
                        if (K == 2048 && (N == 17 || N == 256) && (M == 33 || M == 3)) {
                            fails += check_one(&FNS[j], M, N, K, acc, !at_end, 1);
                            runs++;
                        }
                    }
        printf("%-12s %s (%.1f s)\n", FNS[j].name, fails == f0 ? "ok" : "FAILED", now() - t0);
        fflush(stdout);
    }
    printf("%d runs, %d failures\n", runs, fails);
    return fails != 0;
}
