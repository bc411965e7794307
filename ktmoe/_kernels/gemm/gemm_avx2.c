/* gemm_avx2.c: the bf16 GEMMs of gemm.h with AVX2 + FMA (ymm, VEX encodings only: the avx2 target's
 * flags are -mavx2 -mfma, so nothing here can use AVX-512 or F16C). bf16 -> fp32 is a 16-bit shift
 * (exact); every product is an fp32 FMA. Blocked for the 16 ymm registers: a 6 x 16 tile of C is
 * 12 accumulators, the other 4 registers hold the W vectors and the A broadcast.
 *
 * nt (C = A W^T, W [N, K]): per block of KT_NC W rows x KT_KC k, W is converted once into an fp32
 *   panel Bp[k][n] (8 x 8 transposes in registers; zero-padded to whole 16-column strips), and the
 *   6 x KT_KC block of A into fp32 rows; the tile then needs per k two loads of Bp, six broadcasts
 *   of A (loads, no ALU op) and 12 FMAs. Bp (32 KiB) stays in L1 while the row blocks of A pass.
 * nn (C = A W, W [K, N]): axpy along N straight from W: per k one 256-bit load of 16 bf16 of a W
 *   row, split into its even columns (shift left 16) and odd columns (mask the high half), both
 *   exact fp32, against six broadcasts of A (converted to fp32 per block); 2 ALU ops per 12 FMAs.
 *   The even/odd order is undone once when C is written. W is walked in blocks of KT_KC rows x
 *   KT_NN_NC columns (L2) while the row blocks of A pass over it.
 * Tails: partial row blocks take the same tile with fewer rows; partial column strips go through a
 * zero-padded copy (nn: of the W strip; nt: Bp is padded anyway) and masked stores of C; K tails are
 * handled in the packing. No byte outside A [M x K], W's region or C [M x N] is read or written.
 */
#include "gemm.h"
#include <immintrin.h>
#include <string.h>

#define KT_INLINE static inline __attribute__((always_inline))
#define KT_UNROLL _Pragma("GCC unroll 16")
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)

enum { KT_MR = 6, KT_KC = 128, KT_NC = 64, KT_NN_NC = 256 };

KT_INLINE int kt_min(int a, int b) { return a < b ? a : b; }

static void kt_zero_c(int M, int N, float *C, long ldc) {
    for (int m = 0; m < M; m++) memset(C + (long)m * ldc, 0, sizeof(float) * (size_t)N);
}

/* lanes [0, n) of 8, as a maskload / maskstore mask */
KT_INLINE __m256i kt_mask8(int n) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx);
}

/* 8 bf16 -> 8 fp32 */
KT_INLINE __m256 kt_cvt8(const kt_bf16 *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

/* apk[r * KT_KC + k] = fp32(a[r * lda + k]) for r < mr, k < kc */
static void kt_pack_a(float *apk, const kt_bf16 *a, long lda, int mr, int kc) {
    for (int r = 0; r < mr; r++) {
        const kt_bf16 *ar = a + (long)r * lda;
        float *d = apk + r * KT_KC;
        int k = 0;
        for (; k + 8 <= kc; k += 8) _mm256_storeu_ps(d + k, kt_cvt8(ar + k));
        for (; k < kc; k++) d[k] = kt_bf16_to_f32(ar[k]);
    }
}

/* C[r, 0..nb) (+)= the 16 columns held as (lo, hi) */
KT_INLINE void kt_store16(float *c, __m256 lo, __m256 hi, int nb, int load_c) {
    if (nb >= 16) {
        if (load_c) {
            lo = _mm256_add_ps(lo, _mm256_loadu_ps(c));
            hi = _mm256_add_ps(hi, _mm256_loadu_ps(c + 8));
        }
        _mm256_storeu_ps(c, lo);
        _mm256_storeu_ps(c + 8, hi);
        return;
    }
    __m256i m0 = kt_mask8(nb), m1 = kt_mask8(nb - 8);
    if (load_c) {
        lo = _mm256_add_ps(lo, _mm256_maskload_ps(c, m0));
        hi = _mm256_add_ps(hi, _mm256_maskload_ps(c + 8, m1));
    }
    _mm256_maskstore_ps(c, m0, lo);
    _mm256_maskstore_ps(c + 8, m1, hi);
}

/* ---- nt ------------------------------------------------------------------------------ */

/* mr rows of A (apk) x 16 columns of the fp32 panel bp (row stride ldb) over kc */
KT_INLINE void kt_nt_tile_mr(const int mr, int kc, const float *apk, const float *bp, long ldb, float *c,
                             long ldc, int nb, int load_c) {
    __m256 acc[KT_MR][2];
    KT_UNROLL for (int r = 0; r < KT_MR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int k = 0; k < kc; k++) {
        __m256 b0 = _mm256_loadu_ps(bp + (long)k * ldb), b1 = _mm256_loadu_ps(bp + (long)k * ldb + 8);
        KT_UNROLL for (int r = 0; r < mr; r++) {
            __m256 a = _mm256_broadcast_ss(apk + r * KT_KC + k);
            acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
        }
    }
    KT_UNROLL for (int r = 0; r < mr; r++) kt_store16(c + (long)r * ldc, acc[r][0], acc[r][1], nb, load_c);
}

static void kt_nt_tile(int mr, int kc, const float *apk, const float *bp, long ldb, float *c, long ldc, int nb,
                       int load_c) {
    switch (mr) {
    case 1: kt_nt_tile_mr(1, kc, apk, bp, ldb, c, ldc, nb, load_c); break;
    case 2: kt_nt_tile_mr(2, kc, apk, bp, ldb, c, ldc, nb, load_c); break;
    case 3: kt_nt_tile_mr(3, kc, apk, bp, ldb, c, ldc, nb, load_c); break;
    case 4: kt_nt_tile_mr(4, kc, apk, bp, ldb, c, ldc, nb, load_c); break;
    case 5: kt_nt_tile_mr(5, kc, apk, bp, ldb, c, ldc, nb, load_c); break;
    default: kt_nt_tile_mr(6, kc, apk, bp, ldb, c, ldc, nb, load_c); break;
    }
}

/* 8 x 8 fp32 transpose: r[i] lane j -> o[j] lane i */
KT_INLINE void kt_transpose8(__m256 r[8]) {
    __m256 t[8], s[8];
    KT_UNROLL for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    KT_UNROLL for (int i = 0; i < 2; i++) {
        s[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
        s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
    }
    KT_UNROLL for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
    }
}

/* bp[k * ldb + j] = fp32(W[j * ldw + k]) for j < nc, k < kc; zero for j in [nc, ldb) */
static void kt_pack_bt(float *bp, long ldb, const kt_bf16 *W, long ldw, int nc, int kc) {
    int j = 0;
    for (; j + 8 <= nc; j += 8) {
        int k = 0;
        for (; k + 8 <= kc; k += 8) {
            __m256 r[8];
            KT_UNROLL for (int i = 0; i < 8; i++) r[i] = kt_cvt8(W + (long)(j + i) * ldw + k);
            kt_transpose8(r);
            KT_UNROLL for (int i = 0; i < 8; i++) _mm256_storeu_ps(bp + (long)(k + i) * ldb + j, r[i]);
        }
        for (; k < kc; k++)
            for (int i = 0; i < 8; i++) bp[(long)k * ldb + j + i] = kt_bf16_to_f32(W[(long)(j + i) * ldw + k]);
    }
    for (int k = 0; k < kc; k++) {
        for (int i = j; i < nc; i++) bp[(long)k * ldb + i] = kt_bf16_to_f32(W[(long)i * ldw + k]);
        for (int i = nc; i < ldb; i++) bp[(long)k * ldb + i] = 0.f;
    }
}

void CAT(kt_gemm_nt_, KT_ISA)(KT_GEMM_ARGS) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accumulate) kt_zero_c(M, N, C, ldc);
        return;
    }
    _Alignas(32) float bp[KT_KC * KT_NC];
    _Alignas(32) float apk[KT_MR * KT_KC];
    for (int n0 = 0; n0 < N; n0 += KT_NC) {
        const int nc = kt_min(KT_NC, N - n0), ldb = (nc + 15) & ~15;
        for (int k0 = 0; k0 < K; k0 += KT_KC) {
            const int kc = kt_min(KT_KC, K - k0), load_c = accumulate || k0 > 0;
            kt_pack_bt(bp, ldb, W + (long)n0 * ldw + k0, ldw, nc, kc);
            for (int m0 = 0; m0 < M; m0 += KT_MR) {
                const int mr = kt_min(KT_MR, M - m0);
                kt_pack_a(apk, A + (long)m0 * lda + k0, lda, mr, kc);
                for (int j = 0; j < nc; j += 16)
                    kt_nt_tile(mr, kc, apk, bp + j, ldb, C + (long)m0 * ldc + n0 + j, ldc, nc - j, load_c);
            }
        }
    }
}

/* ---- nn ------------------------------------------------------------------------------ */

/* mr rows of A (apk) x 16 columns of W (w, row stride ldw) over kc rows of W */
KT_INLINE void kt_nn_tile_mr(const int mr, int kc, const float *apk, const kt_bf16 *w, long ldw, float *c,
                             long ldc, int nb, int load_c) {
    const __m256i hi16 = _mm256_set1_epi32((int)0xffff0000u);
    __m256 acc[KT_MR][2];
    KT_UNROLL for (int r = 0; r < KT_MR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int k = 0; k < kc; k++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(w + (long)k * ldw));
        __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, hi16));
        KT_UNROLL for (int r = 0; r < mr; r++) {
            __m256 a = _mm256_broadcast_ss(apk + r * KT_KC + k);
            acc[r][0] = _mm256_fmadd_ps(a, we, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a, wo, acc[r][1]);
        }
    }
    /* (even, odd) columns -> columns 0..7, 8..15 */
    KT_UNROLL for (int r = 0; r < mr; r++) {
        __m256 lo = _mm256_unpacklo_ps(acc[r][0], acc[r][1]), hi = _mm256_unpackhi_ps(acc[r][0], acc[r][1]);
        kt_store16(c + (long)r * ldc, _mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31), nb,
                   load_c);
    }
}

static void kt_nn_tile(int mr, int kc, const float *apk, const kt_bf16 *w, long ldw, float *c, long ldc, int nb,
                       int load_c) {
    switch (mr) {
    case 1: kt_nn_tile_mr(1, kc, apk, w, ldw, c, ldc, nb, load_c); break;
    case 2: kt_nn_tile_mr(2, kc, apk, w, ldw, c, ldc, nb, load_c); break;
    case 3: kt_nn_tile_mr(3, kc, apk, w, ldw, c, ldc, nb, load_c); break;
    case 4: kt_nn_tile_mr(4, kc, apk, w, ldw, c, ldc, nb, load_c); break;
    case 5: kt_nn_tile_mr(5, kc, apk, w, ldw, c, ldc, nb, load_c); break;
    default: kt_nn_tile_mr(6, kc, apk, w, ldw, c, ldc, nb, load_c); break;
    }
}

void CAT(kt_gemm_nn_, KT_ISA)(KT_GEMM_ARGS) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accumulate) kt_zero_c(M, N, C, ldc);
        return;
    }
    _Alignas(32) float apk[KT_MR * KT_KC];
    _Alignas(32) kt_bf16 tail[KT_KC * 16]; /* the last, partial 16-column strip of a W block, zero-padded */
    for (int n0 = 0; n0 < N; n0 += KT_NN_NC) {
        const int n1 = kt_min(N, n0 + KT_NN_NC), full_end = n0 + ((n1 - n0) & ~15);
        for (int k0 = 0; k0 < K; k0 += KT_KC) {
            const int kc = kt_min(KT_KC, K - k0), load_c = accumulate || k0 > 0;
            const kt_bf16 *wk = W + (long)k0 * ldw;
            if (full_end < n1) {
                int nb = n1 - full_end;
                for (int k = 0; k < kc; k++) {
                    memcpy(tail + k * 16, wk + (long)k * ldw + full_end, sizeof(kt_bf16) * (size_t)nb);
                    memset(tail + k * 16 + nb, 0, sizeof(kt_bf16) * (size_t)(16 - nb));
                }
            }
            for (int m0 = 0; m0 < M; m0 += KT_MR) {
                const int mr = kt_min(KT_MR, M - m0);
                kt_pack_a(apk, A + (long)m0 * lda + k0, lda, mr, kc);
                float *cm = C + (long)m0 * ldc;
                for (int n = n0; n < full_end; n += 16) kt_nn_tile(mr, kc, apk, wk + n, ldw, cm + n, ldc, 16, load_c);
                if (full_end < n1) kt_nn_tile(mr, kc, apk, tail, 16, cm + full_end, ldc, n1 - full_end, load_c);
            }
        }
    }
}
