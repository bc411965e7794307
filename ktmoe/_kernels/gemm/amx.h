/* amx.h: what the AMX GEMMs (gemm_amx.c for bf16, gemm_int8_amx.c for
 * int8) share: the tile configuration (amx_tiles.h), masks and small integer helpers, the
 * in-register 16x16 transpose of 32-bit words (a bf16 pair and an int8 quad are both one word),
 * loading / storing the C accumulator tiles, and the per-thread scratch area.
 *
 * Compiler notes (gcc 12): _tile_loadd / _tile_stored are volatile asm with the address as a
 * plain register operand, declaring no memory access, so KT_MEM_BARRIER (an empty asm that
 * takes the buffer's address and clobbers memory) sits between filling any buffer and the tile
 * load that reads it, and between a tile store and plain reads of what it wrote. */
#ifndef KTMOE_AMX_H
#define KTMOE_AMX_H
#include "amx_tiles.h"
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Tuning of the AMX GEMMs (each may be overridden with -D): bf16 (gemm_amx.c) */
#ifndef KT_AMX_KP
#define KT_AMX_KP 512   /* K panel, a multiple of 32 */
#endif
#ifndef KT_AMX_NC
#define KT_AMX_NC 128   /* columns of W packed at once, a multiple of 32 */
#endif
#ifndef KT_AMX_MSMALL_NT
#define KT_AMX_MSMALL_NT 2 /* nt with M below this: AVX-512 */
#endif
#ifndef KT_AMX_MSMALL_NN
#define KT_AMX_MSMALL_NN 6 /* nn with M below this: AVX-512 */
#endif
#ifndef KT_AMX_PFB
#define KT_AMX_PFB 2    /* packed path: K steps ahead whose B tiles are prefetched into L1 (0: none) */
#endif
#ifndef KT_AMX_PFB_MEM
#define KT_AMX_PFB_MEM 8 /* the same for B tiles read from a prepacked W in memory */
#endif
#ifndef KT_AMX_PFA
#define KT_AMX_PFA 0    /* packed path: K steps ahead whose A rows are prefetched on a block's first pass */
#endif
#ifndef KT_AMX_MCT
#define KT_AMX_MCT 64   /* nt with M up to this: transposed-output path (no W packing) */
#endif
/* int8 (gemm_int8_amx.c) */
#ifndef KT_IAMX_KP
#define KT_IAMX_KP 1024 /* K panel, a multiple of 64 */
#endif
#ifndef KT_IAMX_NC
#define KT_IAMX_NC 128  /* columns of W packed at once, a multiple of 64 */
#endif
#ifndef KT_IAMX_MSMALL_NT
#define KT_IAMX_MSMALL_NT 4  /* nt with M below this: AVX-512 */
#endif
#ifndef KT_IAMX_MSMALL_NN
#define KT_IAMX_MSMALL_NN 12 /* nn with M below this: AVX-512 */
#endif
#ifndef KT_IAMX_MCT
#define KT_IAMX_MCT 64  /* nt with M up to this: transposed-output path (no W packing) */
#endif

#define KT_AI static inline __attribute__((always_inline))

/* Compiler-only barrier: the buffer at p (and all memory) must be up to date here. */
#define KT_MEM_BARRIER(p) __asm__ __volatile__("" : : "r"(p) : "memory")

static inline __mmask16 kt_mask16(int n) { return (__mmask16)(n >= 16 ? 0xffffu : n <= 0 ? 0u : ((1u << n) - 1u)); }
static inline int kt_min(int a, int b) { return a < b ? a : b; }
static inline int kt_cdiv(int a, int b) { return (a + b - 1) / b; }

/* The degenerate shapes of a GEMM call (C of 32-bit values, fp32 or int32): nothing to do
 * (M or N <= 0), or K <= 0 (C zeroed unless accumulating). 1 if the call is thereby done. */
static inline int kt_gemm_degenerate(int M, int N, int K, void *C, long ldc, int accumulate) {
    if (M <= 0 || N <= 0) return 1;
    if (K > 0) return 0;
    if (!accumulate)
        for (int m = 0; m < M; m++) memset((int32_t *)C + (long)m * ldc, 0, 4 * (size_t)N);
    return 1;
}

/* `static type *getter(void)`: this thread's scratch area of `type`, allocated (64-byte aligned)
 * on first use and freed at thread exit; NULL if it cannot be allocated. */
#define KT_AMX_THREAD_SCRATCH(type, getter)                                                            \
    static pthread_key_t getter##_key;                                                                 \
    static pthread_once_t getter##_once = PTHREAD_ONCE_INIT;                                           \
    static int getter##_key_ok;                                                                        \
    static __thread type *getter##_tls;                                                                \
    static void getter##_free(void *p) { free(p); }                                                    \
    static void getter##_key_init(void) { getter##_key_ok = pthread_key_create(&getter##_key, getter##_free) == 0; } \
    static type *getter(void) {                                                                        \
        type *s = getter##_tls;                                                                        \
        if (s) return s;                                                                               \
        pthread_once(&getter##_once, getter##_key_init);                                               \
        void *p = NULL;                                                                                \
        if (posix_memalign(&p, 64, sizeof(type)) != 0) return NULL;                                    \
        if (getter##_key_ok) pthread_setspecific(getter##_key, p); /* freed at thread exit */          \
        getter##_tls = p;                                                                              \
        return p;                                                                                      \
    }

/* In-register transpose of a 16x16 matrix of 32-bit words: r[i] word j -> r[j] word i. */
KT_AI void kt_transpose16x16_epi32(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    /* u[4q + c], lane l: rows 4q..4q+3 of column 4l + c */
    for (int q = 0; q < 4; q++) {
        u[4 * q + 0] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
        u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
        u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
        u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
    }
    for (int c = 0; c < 4; c++) {
        t[c] = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88);      /* cols c, c+8 of rows 0-7 */
        t[c + 4] = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);  /* cols c+4, c+12 */
        t[c + 8] = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
        t[c + 12] = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
    }
    for (int c = 0; c < 8; c++) {
        r[c] = _mm512_shuffle_i32x4(t[c], t[c + 8], 0x88);
        r[c + 8] = _mm512_shuffle_i32x4(t[c], t[c + 8], 0xdd);
    }
}

/* A partial C tile (rows x cols valid, 32-bit values: fp32 or int32, row stride ldc) <-> a
 * zero-padded 16x16 staging tile. */
KT_AI void kt_stage_c(void *buf, const void *C, long ldc, int rows, int cols) {
    const __mmask16 m = kt_mask16(cols);
    for (int r = 0; r < 16; r++)
        _mm512_store_si512((char *)buf + 64 * r,
                           r < rows ? _mm512_maskz_loadu_epi32(m, (const int32_t *)C + (long)r * ldc) : _mm512_setzero_si512());
}
KT_AI void kt_unstage_c(void *C, long ldc, const void *buf, int rows, int cols) {
    const __mmask16 m = kt_mask16(cols);
    for (int r = 0; r < rows; r++)
        _mm512_mask_storeu_epi32((int32_t *)C + (long)r * ldc, m, _mm512_load_si512((const char *)buf + 64 * r));
}

/* The C accumulator tiles of a kernel (its locals: acc, the C row stride ldc and its bytes sc,
 * cst the staging tiles). */
/* C tile t (rows x cols valid, at c): start from zero or from C; full tiles go straight. */
#define KT_C_BEGIN(t, c, rows, cols)                                                    \
    do {                                                                                \
        if (!acc) {                                                                     \
            _tile_zero(t);                                                              \
        } else if ((rows) == 16 && (cols) == 16) {                                      \
            _tile_loadd(t, (c), sc);                                                    \
        } else {                                                                        \
            kt_stage_c(cst[t], (c), ldc, (rows), (cols));                               \
            KT_MEM_BARRIER(cst[t]);                                                     \
            _tile_loadd(t, cst[t], 64);                                                 \
        }                                                                               \
    } while (0)
#define KT_C_END(t, c, rows, cols)                                                      \
    do {                                                                                \
        if ((rows) == 16 && (cols) == 16) {                                             \
            _tile_stored(t, (c), sc);                                                   \
        } else {                                                                        \
            _tile_stored(t, cst[t], 64);                                                \
            KT_MEM_BARRIER(cst[t]);                                                     \
            kt_unstage_c((c), ldc, cst[t], (rows), (cols));                             \
        }                                                                               \
    } while (0)

/* Tile t := the 16 rows at X (row stride sx bytes) when `direct` (all 16 rows and the whole K
 * step valid), else those rows first copied by stage(buf, X, ld, rows, kv) into the
 * zero-padded staging tile buf (its padding rows zeroed by the caller). */
#define KT_LOAD_OPERAND(t, direct, X, sx, stage, buf, ld, rows, kv)                     \
    do {                                                                                \
        if (direct) {                                                                   \
            _tile_loadd(t, X, sx);                                                      \
        } else {                                                                        \
            stage(buf, X, ld, rows, kv);                                                \
            KT_MEM_BARRIER(buf);                                                        \
            _tile_loadd(t, buf, 64);                                                    \
        }                                                                               \
    } while (0)

/* One K step on the 2x2 block of accumulator tiles 0..3 = (4 or 5) x (6 or 7): load4 / load5
 * fill operand tiles 4 and 5 (statements), b is the step's packed pair of tiles 6 and 7, tdp
 * _tile_dpbf16ps or _tile_dpbssd; two45 / two67: tile 5 / tile 7 in use (constants). */
#define KT_STEP_2X2(tdp, two45, two67, b, load4, load5)                                \
    do {                                                                                \
        load4;                                                                          \
        _tile_loadd(6, (b), 64);                                                        \
        tdp(0, 4, 6);                                                                   \
        if (two67) {                                                                    \
            _tile_loadd(7, (b) + KT_TILE, 64);                                          \
            tdp(1, 4, 7);                                                               \
        }                                                                               \
        if (two45) {                                                                    \
            load5;                                                                      \
            tdp(2, 5, 6);                                                               \
            if (two67) tdp(3, 5, 7);                                                    \
        }                                                                               \
    } while (0)
#endif
