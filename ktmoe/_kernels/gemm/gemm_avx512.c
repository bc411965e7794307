/* gemm_avx512.c: the bf16 GEMMs of gemm.h with AVX-512, built for two kernel targets (meson.build):
 *   - avx512f (F/BW/VL/DQ, no BF16 flag): the F inner loops below, plain AVX-512F. A 512-bit load of
 *     32 bf16 is split into its even elements (shift left 16) and odd elements (mask the high half):
 *     both are exact fp32 values, so a load costs two ALU ops instead of two zero-extends plus shifts.
 *   - avx512 (+ BF16 + VNNI flags): the bf16 inner loops, _mm512_dpbf16_ps, two bf16 products per
 *     fp32 lane per instruction.
 * The loop is picked at compile time (__AVX512BF16__), so the avx512f objects cannot contain a BF16
 * instruction; the functions are named after the target (kt_gemm_nt_<KT_ISA>). This path serves
 * small M (a few tokens per expert, decode-like) on every AVX-512 CPU and is the whole kernel on
 * CPUs without AMX, so it is built for both memory-bound M = 1..4 and compute-bound M = 64.
 *
 * nt (C = A W^T, W [N, K]): dot products along K. A tile is 4 rows of A x 4 rows of W with
 *   16 zmm accumulators, 32 k per step; each loaded vector is used 4 times and W rows are
 *   read as 4 sequential streams (prefetcher friendly). At the end of K the 16 accumulators
 *   are transpose-reduced into one zmm (lane 4 r + c). Loop order: 4 W rows outer (they
 *   stay in L1 for K up to a few thousand), row blocks of A inner.
 * nn (C = A W, W [K, N]): axpy along N. A tile is 4 rows of A x 64 columns of C, held as
 *   16 zmm accumulators; each W vector feeds 4 rows. bf16: rows k and k+1 of W are
 *   interleaved with unpacklo/hi_epi16 into (k, k+1) pairs and A[m, k..k+1] is one 32-bit
 *   broadcast; the lane permutation this leaves is undone once, when C is written. F: W is
 *   split into even/odd columns (re-interleaved at the store) and A is converted to fp32
 *   per block so its broadcasts are plain loads. W is walked in blocks of 64 rows x 2048
 *   columns: the block stays in L2 while every row block of A passes over it, and W rows
 *   are long forward streams; the first row block also prefetches two tiles ahead (without
 *   this, tall-and-narrow tiles on rows 4 KiB apart ran at a third of streaming bandwidth).
 *   C is read back once per 64 k.
 * Tails (M, N, K not multiples of the block) use AVX-512 masked loads and stores, so no
 * byte outside A [M x K], W's region or C [M x N] is read or written.
 */
#include "gemm.h"
#include <immintrin.h>
#include <string.h>

#define KT_INLINE static inline __attribute__((always_inline))
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
/* Fully unroll the short register-block loops early: without it gcc 12 keeps the
 * accumulator arrays in memory and stores them on every iteration. */
#define KT_UNROLL _Pragma("GCC unroll 16")

/* ---- shared helpers ------------------------------------------------------------------ */

KT_INLINE int kt_min(int a, int b) { return a < b ? a : b; }

/* lanes [0, n) set, n clamped to [0, 32] */
KT_INLINE __mmask32 kt_mask32(int n) {
    return n >= 32 ? (__mmask32)0xffffffffu : n <= 0 ? (__mmask32)0 : (__mmask32)((1u << n) - 1u);
}

/* 32 bf16; full is a compile-time constant in every caller */
KT_INLINE __m512i kt_load32(const kt_bf16 *p, const int full, __mmask32 m) {
    return full ? _mm512_loadu_si512((const void *)p) : _mm512_maskz_loadu_epi16(m, p);
}

/* even / odd bf16 elements of a 32 x bf16 vector as 16 exact fp32 values */
KT_INLINE __m512 kt_bf16_even(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
KT_INLINE __m512 kt_bf16_odd(__m512i v) {
    return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
}

/* A[k], A[k+1] as one 32-bit lane, broadcast */
KT_INLINE __m512i kt_bcast_pair(const kt_bf16 *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32((int)v);
}

static void kt_zero_c(int M, int N, float *C, long ldc) {
    for (int m = 0; m < M; m++) memset(C + (long)m * ldc, 0, sizeof(float) * (size_t)N);
}

/* ---- nt ------------------------------------------------------------------------------ */

enum { NT_MR = 4, NT_NR = 4 };

/* Transpose-reduce acc[r][c] (r, c < 4) into one vector whose lane 4 r + c is the sum of
 * the 16 lanes of acc[r][c]. */
KT_INLINE __m512 kt_reduce4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
    /* per 128-bit block: [v0, v1, v2, v3] partial sums */
    __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));
    __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
}

KT_INLINE __m512 kt_reduce16(__m512 acc[NT_MR][NT_NR]) {
    __m512 u0 = kt_reduce4(acc[0][0], acc[0][1], acc[0][2], acc[0][3]);
    __m512 u1 = kt_reduce4(acc[1][0], acc[1][1], acc[1][2], acc[1][3]);
    __m512 u2 = kt_reduce4(acc[2][0], acc[2][1], acc[2][2], acc[2][3]);
    __m512 u3 = kt_reduce4(acc[3][0], acc[3][1], acc[3][2], acc[3][3]);
    /* sum the four 128-bit blocks of each u_r into block r */
    __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x44), _mm512_shuffle_f32x4(u0, u1, 0xee));
    __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(u2, u3, 0x44), _mm512_shuffle_f32x4(u2, u3, 0xee));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, 0x88), _mm512_shuffle_f32x4(x01, x23, 0xdd));
}

/* C[r, c] (+)= s[4 r + c] for r < mr, c < nr */
KT_INLINE void kt_nt_store(float *c, long ldc, __m512 s, int mr, int nr, int accumulate) {
    float t[16];
    _mm512_storeu_ps(t, s);
    __mmask8 mk = (__mmask8)((1u << nr) - 1u);
    for (int r = 0; r < mr; r++) {
        float *cr = c + (long)r * ldc;
        __m128 x = _mm_loadu_ps(t + 4 * r);
        if (accumulate) x = _mm_add_ps(x, _mm_maskz_loadu_ps(mk, cr));
        _mm_mask_storeu_ps(cr, mk, x);
    }
}

/* One tile: mr rows of A (from a, stride lda) x 4 rows of W (w[c]), all of K. */
typedef __m512 (*kt_nt_tile_fn)(int mr, int K, const kt_bf16 *a, long lda, const kt_bf16 *const *w);

KT_INLINE void kt_nt_step_f(const int mr, __m512 acc[NT_MR][NT_NR], const kt_bf16 *a, long lda,
                            const kt_bf16 *const *w, int k, const int full, __mmask32 m) {
    __m512 ae[NT_MR], ao[NT_MR];
    KT_UNROLL for (int r = 0; r < mr; r++) {
        __m512i v = kt_load32(a + (long)r * lda + k, full, m);
        ae[r] = kt_bf16_even(v);
        ao[r] = kt_bf16_odd(v);
    }
    KT_UNROLL for (int c = 0; c < NT_NR; c++) {
        __m512i v = kt_load32(w[c] + k, full, m);
        __m512 we = kt_bf16_even(v), wo = kt_bf16_odd(v);
        KT_UNROLL for (int r = 0; r < mr; r++) {
            acc[r][c] = _mm512_fmadd_ps(ae[r], we, acc[r][c]);
            acc[r][c] = _mm512_fmadd_ps(ao[r], wo, acc[r][c]);
        }
    }
}

#if defined(__AVX512BF16__)
KT_INLINE void kt_nt_step_bf16(const int mr, __m512 acc[NT_MR][NT_NR], const kt_bf16 *a,
                                              long lda, const kt_bf16 *const *w, int k, const int full,
                                              __mmask32 m) {
    __m512i av[NT_MR];
    KT_UNROLL for (int r = 0; r < mr; r++) av[r] = kt_load32(a + (long)r * lda + k, full, m);
    KT_UNROLL for (int c = 0; c < NT_NR; c++) {
        __m512i v = kt_load32(w[c] + k, full, m);
        KT_UNROLL for (int r = 0; r < mr; r++)
            acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)av[r], (__m512bh)v);
    }
}
#endif

/* The two tile bodies differ only in the step; a macro keeps them from drifting apart. */
#define KT_NT_TILE_BODY(step)                                                     \
    __m512 acc[NT_MR][NT_NR];                                                     \
    KT_UNROLL for (int r = 0; r < NT_MR; r++)                                     \
        KT_UNROLL for (int c = 0; c < NT_NR; c++) acc[r][c] = _mm512_setzero_ps(); \
    int k = 0;                                                                    \
    for (; k + 32 <= K; k += 32) step(mr, acc, a, lda, w, k, 1, (__mmask32)0);    \
    if (k < K) step(mr, acc, a, lda, w, k, 0, kt_mask32(K - k)); /* K tail */     \
    return kt_reduce16(acc);

#if defined(__AVX512BF16__)
KT_INLINE __m512 kt_nt_tile_mr(const int mr, int K, const kt_bf16 *a, long lda, const kt_bf16 *const *w) {
    KT_NT_TILE_BODY(kt_nt_step_bf16)
}
#else
KT_INLINE __m512 kt_nt_tile_mr(const int mr, int K, const kt_bf16 *a, long lda, const kt_bf16 *const *w) {
    KT_NT_TILE_BODY(kt_nt_step_f)
}
#endif
#undef KT_NT_TILE_BODY

static __m512 kt_nt_tile(int mr, int K, const kt_bf16 *a, long lda, const kt_bf16 *const *w) {
    switch (mr) {
    case 1: return kt_nt_tile_mr(1, K, a, lda, w);
    case 2: return kt_nt_tile_mr(2, K, a, lda, w);
    case 3: return kt_nt_tile_mr(3, K, a, lda, w);
    default: return kt_nt_tile_mr(4, K, a, lda, w);
    }
}

static void kt_nt_drive(KT_GEMM_ARGS, kt_nt_tile_fn tile) {
    for (int n0 = 0; n0 < N; n0 += NT_NR) {
        int nr = kt_min(NT_NR, N - n0);
        const kt_bf16 *w[NT_NR];
        /* past the N tail, repeat the last row: valid memory, result discarded */
        for (int c = 0; c < NT_NR; c++) w[c] = W + (long)(n0 + kt_min(c, nr - 1)) * ldw;
        for (int m0 = 0; m0 < M; m0 += NT_MR) {
            int mr = kt_min(NT_MR, M - m0);
            __m512 s = tile(mr, K, A + (long)m0 * lda, lda, w);
            kt_nt_store(C + (long)m0 * ldc + n0, ldc, s, mr, nr, accumulate);
        }
    }
}

void CAT(kt_gemm_nt_, KT_ISA)(KT_GEMM_ARGS) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accumulate) kt_zero_c(M, N, C, ldc);
        return;
    }
    kt_nt_drive(M, N, K, A, lda, W, ldw, C, ldc, accumulate, kt_nt_tile);
}

/* ---- nn ------------------------------------------------------------------------------ */

/* W blocks of NN_KC rows x NN_NC columns (256 KiB, L2); prefetch distance NN_PF columns */
enum { NN_MR = 4, NN_NB = 64, NN_KC = 64, NN_NC = 2048, NN_PF = 128 };

/* One tile: mr rows of A x nb (<= 64) columns of C over kc rows of W; C (+)= when load_c.
 * Accumulators come in pairs (x, y) per 32 columns; idx0/idx1 (permutex2var) map them back
 * to columns 0..15 and 16..31. apk: A as fp32, row r at apk + r * NN_KC (F variant only).
 * pf: same rows, NN_PF columns on, to prefetch (or NULL). */
typedef void (*kt_nn_tile_fn)(int mr, int nb, int kc, const kt_bf16 *a, long lda, const float *apk,
                              const kt_bf16 *w, long ldw, const kt_bf16 *pf, float *c, long ldc, int load_c);

/* C[0..31] (+)= columns held in the pair (x, y) */
KT_INLINE void kt_nn_store32(float *c, __m512 x, __m512 y, __m512i idx0, __m512i idx1, __mmask32 m, int load_c) {
    __mmask16 m0 = (__mmask16)(m & 0xffffu), m1 = (__mmask16)(m >> 16);
    __m512 o0 = _mm512_permutex2var_ps(x, idx0, y), o1 = _mm512_permutex2var_ps(x, idx1, y);
    if (load_c) {
        o0 = _mm512_add_ps(o0, _mm512_maskz_loadu_ps(m0, c));
        o1 = _mm512_add_ps(o1, _mm512_maskz_loadu_ps(m1, c + 16));
    }
    _mm512_mask_storeu_ps(c, m0, o0);
    _mm512_mask_storeu_ps(c + 16, m1, o1);
}

#if !defined(__AVX512BF16__)
/* F: x = even columns, y = odd columns */
KT_INLINE __m512i kt_nn_idx0_f(void) {
    return _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
}
KT_INLINE __m512i kt_nn_idx1_f(void) {
    return _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
}
#else
/* bf16: x = unpacklo (columns 0-3, 8-11, 16-19, 24-27), y = unpackhi (the others) */
KT_INLINE __m512i kt_nn_idx0_bf16(void) {
    return _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
}
KT_INLINE __m512i kt_nn_idx1_bf16(void) {
    return _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
}
#endif

#if !defined(__AVX512BF16__)
KT_INLINE void kt_nn_tile_f_mr(const int mr, const int full, int nb, int kc, const float *apk,
                               const kt_bf16 *w, long ldw, const kt_bf16 *pf, float *c, long ldc, int load_c) {
    __m512 acc[NN_MR][2][2];
    KT_UNROLL for (int r = 0; r < NN_MR; r++)
        KT_UNROLL for (int v = 0; v < 2; v++) acc[r][v][0] = acc[r][v][1] = _mm512_setzero_ps();
    __mmask32 mv[2] = {kt_mask32(nb), kt_mask32(nb - 32)};
    for (int k = 0; k < kc; k++) {
        __m512 we[2], wo[2];
        if (pf) {
            _mm_prefetch((const char *)(pf + (long)k * ldw), _MM_HINT_T0);
            _mm_prefetch((const char *)(pf + (long)k * ldw + 32), _MM_HINT_T0);
        }
        KT_UNROLL for (int v = 0; v < 2; v++) {
            __m512i x = kt_load32(w + (long)k * ldw + 32 * v, full, mv[v]);
            we[v] = kt_bf16_even(x);
            wo[v] = kt_bf16_odd(x);
        }
        KT_UNROLL for (int r = 0; r < mr; r++) {
            __m512 a = _mm512_set1_ps(apk[r * NN_KC + k]);
            KT_UNROLL for (int v = 0; v < 2; v++) {
                acc[r][v][0] = _mm512_fmadd_ps(a, we[v], acc[r][v][0]);
                acc[r][v][1] = _mm512_fmadd_ps(a, wo[v], acc[r][v][1]);
            }
        }
    }
    __m512i i0 = kt_nn_idx0_f(), i1 = kt_nn_idx1_f();
    KT_UNROLL for (int r = 0; r < mr; r++)
        KT_UNROLL for (int v = 0; v < 2; v++)
            kt_nn_store32(c + (long)r * ldc + 32 * v, acc[r][v][0], acc[r][v][1], i0, i1, mv[v], load_c);
}

#else
/* rows k (and k + 1 when pair) of W against A[r, k..k+1]; pair is a compile-time constant */
KT_INLINE void kt_nn_step_bf16(const int mr, const int full, const int pair,
                                              __m512 acc[NN_MR][2][2], const __mmask32 *mv, const kt_bf16 *a,
                                              long lda, const kt_bf16 *w, long ldw, int k, const kt_bf16 *pf) {
    if (pf) {
        KT_UNROLL for (int j = 0; j < 1 + pair; j++) {
            _mm_prefetch((const char *)(pf + (long)(k + j) * ldw), _MM_HINT_T0);
            _mm_prefetch((const char *)(pf + (long)(k + j) * ldw + 32), _MM_HINT_T0);
        }
    }
    __m512i lo[2], hi[2];
    KT_UNROLL for (int v = 0; v < 2; v++) {
        __m512i x0 = kt_load32(w + (long)k * ldw + 32 * v, full, mv[v]);
        __m512i x1 = pair ? kt_load32(w + (long)(k + 1) * ldw + 32 * v, full, mv[v]) : _mm512_setzero_si512();
        lo[v] = _mm512_unpacklo_epi16(x0, x1);
        hi[v] = _mm512_unpackhi_epi16(x0, x1);
    }
    KT_UNROLL for (int r = 0; r < mr; r++) {
        const kt_bf16 *ar = a + (long)r * lda + k;
        __m512bh ap = (__m512bh)(pair ? kt_bcast_pair(ar) : _mm512_set1_epi32((int)ar[0]));
        KT_UNROLL for (int v = 0; v < 2; v++) {
            acc[r][v][0] = _mm512_dpbf16_ps(acc[r][v][0], ap, (__m512bh)lo[v]);
            acc[r][v][1] = _mm512_dpbf16_ps(acc[r][v][1], ap, (__m512bh)hi[v]);
        }
    }
}

KT_INLINE void kt_nn_tile_bf16_mr(const int mr, const int full, int nb, int kc,
                                                 const kt_bf16 *a, long lda, const kt_bf16 *w, long ldw,
                                                 const kt_bf16 *pf, float *c, long ldc, int load_c) {
    __m512 acc[NN_MR][2][2];
    KT_UNROLL for (int r = 0; r < NN_MR; r++)
        KT_UNROLL for (int v = 0; v < 2; v++) acc[r][v][0] = acc[r][v][1] = _mm512_setzero_ps();
    __mmask32 mv[2] = {kt_mask32(nb), kt_mask32(nb - 32)};
    int k = 0;
    for (; k + 1 < kc; k += 2) kt_nn_step_bf16(mr, full, 1, acc, mv, a, lda, w, ldw, k, pf);
    if (k < kc) kt_nn_step_bf16(mr, full, 0, acc, mv, a, lda, w, ldw, k, pf); /* odd K: last row alone */
    __m512i i0 = kt_nn_idx0_bf16(), i1 = kt_nn_idx1_bf16();
    KT_UNROLL for (int r = 0; r < mr; r++)
        KT_UNROLL for (int v = 0; v < 2; v++)
            kt_nn_store32(c + (long)r * ldc + 32 * v, acc[r][v][0], acc[r][v][1], i0, i1, mv[v], load_c);
}

#endif

#if !defined(__AVX512BF16__)
static void kt_nn_tile_f(int mr, int nb, int kc, const kt_bf16 *a, long lda, const float *apk,
                         const kt_bf16 *w, long ldw, const kt_bf16 *pf, float *c, long ldc, int load_c) {
    (void)a, (void)lda;
    const int full = nb == NN_NB;
    switch (mr) {
    case 1: full ? kt_nn_tile_f_mr(1, 1, nb, kc, apk, w, ldw, pf, c, ldc, load_c)
                 : kt_nn_tile_f_mr(1, 0, nb, kc, apk, w, ldw, pf, c, ldc, load_c); break;
    case 2: full ? kt_nn_tile_f_mr(2, 1, nb, kc, apk, w, ldw, pf, c, ldc, load_c)
                 : kt_nn_tile_f_mr(2, 0, nb, kc, apk, w, ldw, pf, c, ldc, load_c); break;
    case 3: full ? kt_nn_tile_f_mr(3, 1, nb, kc, apk, w, ldw, pf, c, ldc, load_c)
                 : kt_nn_tile_f_mr(3, 0, nb, kc, apk, w, ldw, pf, c, ldc, load_c); break;
    default: full ? kt_nn_tile_f_mr(4, 1, nb, kc, apk, w, ldw, pf, c, ldc, load_c)
                  : kt_nn_tile_f_mr(4, 0, nb, kc, apk, w, ldw, pf, c, ldc, load_c); break;
    }
}

#else
static void kt_nn_tile_bf16(int mr, int nb, int kc, const kt_bf16 *a, long lda,
                                           const float *apk, const kt_bf16 *w, long ldw, const kt_bf16 *pf,
                                           float *c, long ldc, int load_c) {
    (void)apk;
    const int full = nb == NN_NB;
    switch (mr) {
    case 1: full ? kt_nn_tile_bf16_mr(1, 1, nb, kc, a, lda, w, ldw, pf, c, ldc, load_c)
                 : kt_nn_tile_bf16_mr(1, 0, nb, kc, a, lda, w, ldw, pf, c, ldc, load_c); break;
    case 2: full ? kt_nn_tile_bf16_mr(2, 1, nb, kc, a, lda, w, ldw, pf, c, ldc, load_c)
                 : kt_nn_tile_bf16_mr(2, 0, nb, kc, a, lda, w, ldw, pf, c, ldc, load_c); break;
    case 3: full ? kt_nn_tile_bf16_mr(3, 1, nb, kc, a, lda, w, ldw, pf, c, ldc, load_c)
                 : kt_nn_tile_bf16_mr(3, 0, nb, kc, a, lda, w, ldw, pf, c, ldc, load_c); break;
    default: full ? kt_nn_tile_bf16_mr(4, 1, nb, kc, a, lda, w, ldw, pf, c, ldc, load_c)
                  : kt_nn_tile_bf16_mr(4, 0, nb, kc, a, lda, w, ldw, pf, c, ldc, load_c); break;
    }
}

#endif

/* apk[r * NN_KC + k] = fp32(a[r * lda + k]) for r < mr, k < kc */
static void kt_pack_a_f32(float *apk, const kt_bf16 *a, long lda, int mr, int kc) {
    for (int r = 0; r < mr; r++)
        for (int k = 0; k < kc; k += 16) {
            __mmask16 m = (__mmask16)kt_mask32(kc - k);
            __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, a + (long)r * lda + k));
            _mm512_mask_storeu_ps(apk + r * NN_KC + k, m, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
        }
}

static void kt_nn_drive(KT_GEMM_ARGS, kt_nn_tile_fn tile, int pack_a) {
    float apk[NN_MR * NN_KC];
    for (int n0 = 0; n0 < N; n0 += NN_NC) {
        int n1 = kt_min(N, n0 + NN_NC);
        for (int k0 = 0; k0 < K; k0 += NN_KC) {
            int kc = kt_min(NN_KC, K - k0);
            int load_c = accumulate || k0 > 0;
            for (int m0 = 0; m0 < M; m0 += NN_MR) {
                int mr = kt_min(NN_MR, M - m0);
                const kt_bf16 *a = A + (long)m0 * lda + k0;
                if (pack_a) kt_pack_a_f32(apk, a, lda, mr, kc);
                for (int n = n0; n < n1; n += NN_NB) {
                    const kt_bf16 *wt = W + (long)k0 * ldw + n;
                    const kt_bf16 *pf = m0 == 0 && n + NN_PF + NN_NB <= n1 ? wt + NN_PF : NULL;
                    tile(mr, kt_min(NN_NB, n1 - n), kc, a, lda, apk, wt, ldw, pf, C + (long)m0 * ldc + n, ldc,
                         load_c);
                }
            }
        }
    }
}

void CAT(kt_gemm_nn_, KT_ISA)(KT_GEMM_ARGS) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accumulate) kt_zero_c(M, N, C, ldc);
        return;
    }
#if defined(__AVX512BF16__)
    kt_nn_drive(M, N, K, A, lda, W, ldw, C, ldc, accumulate, kt_nn_tile_bf16, 0);
#else
    kt_nn_drive(M, N, K, A, lda, W, ldw, C, ldc, accumulate, kt_nn_tile_f, 1);
#endif
}
