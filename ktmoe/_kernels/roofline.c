/* roofline.c: the two machine ceilings a layer benchmark is measured against (SPEC.md §10).
 *
 *   kt_rf_amx_peak:      AMX tile throughput from a register-only loop (no memory traffic):
 *                        bf16 TDPBF16PS (2*16*16*32 FLOP each) or int8 TDPBSSD (2*16*16*64 OP).
 *   kt_rf_read_bandwidth: streaming read of a large buffer (far bigger than the LLC), summed
 *                        with AVX-512 loads (or plain 64-bit loads on CPUs without AVX-512).
 *
 * Both run on N pthreads released together through a start gate; the rate is total work divided by
 * the wall time from the common start to the last thread's end (so a straggler counts).
 *
 * Build: this file is compiled twice (meson.build), like the kernel ISA libraries. With
 * KT_ROOFLINE_SIMD defined and the AMX/AVX-512 flags it provides only the tile and AVX-512
 * loops (kt_rf_simd_*); without it (portable flags) it provides the thread harness, the
 * portable read loop and the public functions. So nothing outside the two SIMD loops can
 * pick up AVX-512 instructions, and the caller (_roofline.pyx) decides from
 * ktmoe.available_isas() whether the SIMD loops may run. AMX needs the per-process tile
 * permission (arch_prctl), which ktmoe._cpu requests before "amx" is reported available.
 *
 * The tile configuration (and the gcc 12 _tile_loadconfig trap it avoids) is amx_tiles.h's,
 * shared with the GEMMs.
 */
#include <stdint.h>
#include <stddef.h>

/* Public functions (portable build; declared again in _roofline.pyx). Negative = -errno. */
/* FLOP/s (bf16) or OP/s (int8) of `threads` threads each running the tile loop `seconds`. */
double kt_rf_amx_peak(int threads, double seconds, int int8);
/* Best bytes/s over `passes` reads of an nbytes buffer split across threads (simd: AVX-512). */
double kt_rf_read_bandwidth(int threads, size_t nbytes, int passes, int simd, uint64_t *checksum);

/* SIMD loops, defined in the KT_ROOFLINE_SIMD build, called by the portable build. */
/* Runs the tile loop until `seconds` have passed; returns the instructions issued. */
uint64_t kt_rf_simd_amx_loop(int int8, double seconds);
/* Sums n bytes (n a multiple of 256, p 64-byte aligned) with AVX-512 loads. */
uint64_t kt_rf_simd_read(const void *p, size_t n);

#ifdef KT_ROOFLINE_SIMD
/* ------------------------------------------------------------------ SIMD build */
#include "amx_tiles.h"
#include <string.h>
#include <time.h>

static double kt_rf_now_simd(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#define KT_RF_STEPS 32
#define KT_RF_BODY(OP)                                                   \
    for (int s = 0; s < KT_RF_STEPS; s++) {                              \
        OP(0, 4, 6); OP(1, 4, 7); OP(2, 5, 6); OP(3, 5, 7);              \
    }

uint64_t kt_rf_simd_amx_loop(int int8, double seconds) {
    /* operands: small bf16 / int8 values, so the fp32 sums stay finite for any run length */
    _Alignas(64) uint8_t src[16 * 64];
    for (int i = 0; i < (int)sizeof src; i++)
        src[i] = int8 ? (uint8_t)(i % 7) : (uint8_t)((i & 1) ? 0x3c : 0x00); /* bf16 ~ 0.0078 */
    __asm__ __volatile__("" : : "r"(src) : "memory"); /* src is read by the tile loads below */
    kt_amx_configure();
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    _tile_loadd(4, src, 64); _tile_loadd(5, src, 64);
    _tile_loadd(6, src, 64); _tile_loadd(7, src, 64);

    uint64_t issued = 0;
    const double t_end = kt_rf_now_simd() + seconds;
    do {
        for (int rep = 0; rep < 64; rep++) {  /* 8192 instructions between clock reads */
            if (int8) {
                KT_RF_BODY(_tile_dpbssd)
            } else {
                KT_RF_BODY(_tile_dpbf16ps)
            }
        }
        issued += 64 * KT_RF_STEPS * 4;
    } while (kt_rf_now_simd() < t_end);

    /* keep the results observable, then give the tile state back */
    _Alignas(64) float sink[16 * 16];
    _tile_stored(0, sink, 64);
    __asm__ __volatile__("" : : "r"(sink) : "memory");
    _tile_release();
    return issued;
}

uint64_t kt_rf_simd_read(const void *p, size_t n) {
    const __m512i *v = (const __m512i *)p;
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    for (size_t i = 0; i < n / 64; i += 4) {
        s0 = _mm512_add_epi64(s0, _mm512_load_si512(v + i));
        s1 = _mm512_add_epi64(s1, _mm512_load_si512(v + i + 1));
        s2 = _mm512_add_epi64(s2, _mm512_load_si512(v + i + 2));
        s3 = _mm512_add_epi64(s3, _mm512_load_si512(v + i + 3));
    }
    s0 = _mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3));
    return (uint64_t)_mm512_reduce_add_epi64(s0);
}

#else
/* ------------------------------------------------------------------ portable build */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double kt_rf_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Runs fn(arg_i) on n threads (the caller is thread 0) released together through a start
 * gate; returns wall seconds from the first start to the last end, or a negative errno. */
typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int state; /* 0 wait, 1 go, -1 abort */
} kt_rf_gate;

typedef struct {
    kt_rf_gate *gate;
    void (*fn)(void *);
    void *arg;
    double begin, end;
} kt_rf_job;

static void *kt_rf_thread(void *p) {
    kt_rf_job *j = (kt_rf_job *)p;
    pthread_mutex_lock(&j->gate->lock);
    while (j->gate->state == 0) pthread_cond_wait(&j->gate->cond, &j->gate->lock);
    int go = j->gate->state == 1;
    pthread_mutex_unlock(&j->gate->lock);
    if (!go) return NULL;
    j->begin = kt_rf_now();
    j->fn(j->arg);
    j->end = kt_rf_now();
    return NULL;
}

static void kt_rf_open(kt_rf_gate *g, int state) {
    pthread_mutex_lock(&g->lock);
    g->state = state;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
}

static double kt_rf_run(int n, void (*fn)(void *), void *args, size_t arg_size) {
    kt_rf_gate gate = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};
    pthread_t *tid = calloc((size_t)n, sizeof *tid);
    kt_rf_job *jobs = calloc((size_t)n, sizeof *jobs);
    if (!tid || !jobs) {
        free(tid);
        free(jobs);
        return -ENOMEM;
    }
    int started = 0, err = 0;
    for (int i = 0; i < n; i++) {
        jobs[i] = (kt_rf_job){&gate, fn, (char *)args + (size_t)i * arg_size, 0, 0};
        if (i == 0) continue;
        if ((err = pthread_create(&tid[i], NULL, kt_rf_thread, &jobs[i])) != 0) break;
        started++;
    }
    double wall = -err;
    kt_rf_open(&gate, err ? -1 : 1);
    if (!err) kt_rf_thread(&jobs[0]);
    for (int i = 1; i <= started; i++) pthread_join(tid[i], NULL);
    if (!err) {
        double begin = jobs[0].begin, end = jobs[0].end;
        for (int i = 1; i < n; i++) {
            if (jobs[i].begin < begin) begin = jobs[i].begin;
            if (jobs[i].end > end) end = jobs[i].end;
        }
        wall = end - begin;
    }
    free(tid);
    free(jobs);
    return wall;
}

/* ---- AMX peak ---- */
typedef struct {
    int int8;
    double seconds;
    uint64_t issued;
} kt_rf_amx_arg;

static void kt_rf_amx_job(void *p) {
    kt_rf_amx_arg *a = (kt_rf_amx_arg *)p;
    a->issued = kt_rf_simd_amx_loop(a->int8, a->seconds);
}

double kt_rf_amx_peak(int threads, double seconds, int int8) {
    if (threads < 1 || threads > 1024 || !(seconds > 0)) return -EINVAL;
    kt_rf_amx_arg *args = calloc((size_t)threads, sizeof *args);
    if (!args) return -ENOMEM;
    for (int i = 0; i < threads; i++) args[i] = (kt_rf_amx_arg){int8, seconds, 0};
    double wall = kt_rf_run(threads, kt_rf_amx_job, args, sizeof *args);
    double rate = wall;
    if (wall > 0) {
        double total = 0;
        for (int i = 0; i < threads; i++) total += (double)args[i].issued;
        const double per_op = int8 ? 2.0 * 16 * 16 * 64 : 2.0 * 16 * 16 * 32;
        rate = total * per_op / wall;
    }
    free(args);
    return rate;
}

/* ---- streaming read ---- */
typedef struct {
    const char *p;
    size_t n;
    int simd;
    uint64_t sum;
} kt_rf_read_arg;

static uint64_t kt_rf_portable_read(const void *p, size_t n) {
    const uint64_t *v = (const uint64_t *)p;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i < n / 8; i += 4) {
        s0 += v[i];
        s1 += v[i + 1];
        s2 += v[i + 2];
        s3 += v[i + 3];
    }
    return s0 + s1 + s2 + s3;
}

static void kt_rf_read_job(void *p) {
    kt_rf_read_arg *a = (kt_rf_read_arg *)p;
    a->sum = a->simd ? kt_rf_simd_read(a->p, a->n) : kt_rf_portable_read(a->p, a->n);
}

static void kt_rf_touch_job(void *p) {
    kt_rf_read_arg *a = (kt_rf_read_arg *)p;
    /* first touch by the thread that will read it (page placement), nonzero content */
    memset((void *)a->p, 1, a->n);
}

double kt_rf_read_bandwidth(int threads, size_t nbytes, int passes, int simd, uint64_t *checksum) {
    if (threads < 1 || threads > 1024 || passes < 1) return -EINVAL;
    const size_t align = 2u << 20;
    size_t chunk = nbytes / (size_t)threads / 256 * 256; /* whole 256-byte steps per thread */
    if (chunk == 0) return -EINVAL;
    size_t total = chunk * (size_t)threads;
    void *buf = NULL;
    if (posix_memalign(&buf, align, total) != 0) return -ENOMEM;
#ifdef MADV_HUGEPAGE
    madvise(buf, total, MADV_HUGEPAGE); /* fewer TLB misses; harmless if refused */
#endif
    kt_rf_read_arg *args = calloc((size_t)threads, sizeof *args);
    if (!args) {
        free(buf);
        return -ENOMEM;
    }
    for (int i = 0; i < threads; i++) args[i] = (kt_rf_read_arg){(char *)buf + (size_t)i * chunk, chunk, simd, 0};
    double best = kt_rf_run(threads, kt_rf_touch_job, args, sizeof *args);
    if (best > 0) {
        best = 0; /* the best pass: the others were slowed by something else on the machine */
        for (int p = 0; p < passes; p++) {
            double wall = kt_rf_run(threads, kt_rf_read_job, args, sizeof *args);
            if (wall <= 0) {
                best = wall < 0 ? wall : best;
                break;
            }
            double rate = (double)total / wall;
            if (rate > best) best = rate;
        }
        uint64_t sum = 0;
        for (int i = 0; i < threads; i++) sum += args[i].sum;
        if (checksum) *checksum = sum;
    }
    free(args);
    free(buf);
    return best;
}
#endif
