/* gemm_int8_avx2.c: the int8 GEMMs of gemm_int8.h with AVX2 (ymm, VEX only; no VNNI of any kind).
 *
 * int8 is sign-extended to int16 (vpmovsxbw) and multiplied with vpmaddwd: two s16 x s16 products
 * summed into each int32 lane, exact (|A|, |W| <= 127, K <= 65536, so every sum fits int32). No
 * vpmaddubsw: its u8 x s8 pair sums saturate at int16.
 *
 * nt (C = A W^T, W [N, K]): dot products along K, a tile of 4 rows of A x 2 rows of W (8
 *   accumulators), 16 k per step; W rows stay in L1 while the row blocks of A pass over them. The
 *   K tail goes through zero-padded 16-byte copies; the 8 lanes are summed at the end.
 * nn (C = A W, W [K, N]): axpy along N, a tile of 4 rows of A x 16 columns of C (8 accumulators):
 *   rows k and k + 1 of W sign-extended and interleaved into int16 pairs (unpacklo/hi_epi16),
 *   against a broadcast of the pair A[m, k..k+1]; the lane order this leaves is undone at the
 *   store. A partial column strip is copied into a zero-padded block first; C tails use masked
 *   stores. No byte outside A [M x K], W's region or C [M x N] is read or written.
 */
#include "gemm_int8.h"
#include <immintrin.h>
#include <string.h>

#define KT_INLINE static inline __attribute__((always_inline))
#define KT_UNROLL _Pragma("GCC unroll 16")
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)

enum { NT_MR = 4, NT_NR = 2, NN_MR = 4, NN_KC = 128, NN_NC = 512 };

KT_INLINE int kt_min(int a, int b) { return a < b ? a : b; }

static void kt_zero_c(int M, int N, int32_t *C, long ldc) {
    for (int m = 0; m < M; m++) memset(C + (long)m * ldc, 0, sizeof(int32_t) * (size_t)N);
}

KT_INLINE __m256i kt_mask8(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* 16 int8 -> 16 int16 */
KT_INLINE __m256i kt_s16(const int8_t *p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)); }

KT_INLINE int32_t kt_hsum(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* ---- nt ------------------------------------------------------------------------------ */

/* mr rows of A x nr rows of W (w[c]) over all of K; res[r][c] = the dot products */
KT_INLINE void kt_nt_tile_mr(const int mr, int K, const int8_t *a, long lda, const int8_t *const *w,
                             int32_t res[NT_MR][NT_NR]) {
    __m256i acc[NT_MR][NT_NR];
    KT_UNROLL for (int r = 0; r < NT_MR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256i av[NT_MR];
        KT_UNROLL for (int r = 0; r < mr; r++) av[r] = kt_s16(a + (long)r * lda + k);
        KT_UNROLL for (int c = 0; c < NT_NR; c++) {
            __m256i v = kt_s16(w[c] + k);
            KT_UNROLL for (int r = 0; r < mr; r++) acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(av[r], v));
        }
    }
    if (k < K) { /* K tail through zero-padded copies */
        int8_t buf[NT_MR + NT_NR][16];
        memset(buf, 0, sizeof buf);
        for (int r = 0; r < mr; r++) memcpy(buf[r], a + (long)r * lda + k, (size_t)(K - k));
        for (int c = 0; c < NT_NR; c++) memcpy(buf[NT_MR + c], w[c] + k, (size_t)(K - k));
        KT_UNROLL for (int c = 0; c < NT_NR; c++) {
            __m256i v = kt_s16(buf[NT_MR + c]);
            KT_UNROLL for (int r = 0; r < mr; r++)
                acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(kt_s16(buf[r]), v));
        }
    }
    KT_UNROLL for (int r = 0; r < mr; r++)
        KT_UNROLL for (int c = 0; c < NT_NR; c++) res[r][c] = kt_hsum(acc[r][c]);
}

static void kt_nt_tile(int mr, int K, const int8_t *a, long lda, const int8_t *const *w, int32_t res[NT_MR][NT_NR]) {
    switch (mr) {
    case 1: kt_nt_tile_mr(1, K, a, lda, w, res); break;
    case 2: kt_nt_tile_mr(2, K, a, lda, w, res); break;
    case 3: kt_nt_tile_mr(3, K, a, lda, w, res); break;
    default: kt_nt_tile_mr(4, K, a, lda, w, res); break;
    }
}

void CAT(kt_igemm_nt_, KT_ISA)(KT_IGEMM_ARGS) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accumulate) kt_zero_c(M, N, C, ldc);
        return;
    }
    for (int n0 = 0; n0 < N; n0 += NT_NR) {
        const int nr = kt_min(NT_NR, N - n0);
        const int8_t *w[NT_NR];
        for (int c = 0; c < NT_NR; c++) w[c] = W + (long)(n0 + kt_min(c, nr - 1)) * ldw; /* past N: repeat */
        for (int m0 = 0; m0 < M; m0 += NT_MR) {
            const int mr = kt_min(NT_MR, M - m0);
            int32_t res[NT_MR][NT_NR];
            kt_nt_tile(mr, K, A + (long)m0 * lda, lda, w, res);
            for (int r = 0; r < mr; r++) {
                int32_t *cr = C + (long)(m0 + r) * ldc + n0;
                for (int c = 0; c < nr; c++) cr[c] = accumulate ? cr[c] + res[r][c] : res[r][c];
            }
        }
    }
}

/* ---- nn ------------------------------------------------------------------------------ */

KT_INLINE void kt_out8(int32_t *c, __m256i v, int nb, int load_c) {
    if (nb >= 8) {
        if (load_c) v = _mm256_add_epi32(v, _mm256_loadu_si256((const __m256i *)c));
        _mm256_storeu_si256((__m256i *)c, v);
        return;
    }
    if (nb <= 0) return;
    __m256i m = kt_mask8(nb);
    if (load_c) v = _mm256_add_epi32(v, _mm256_maskload_epi32(c, m));
    _mm256_maskstore_epi32(c, m, v);
}

/* mr rows of A x 16 columns of W (w, row stride ldw) over kc rows */
KT_INLINE void kt_nn_tile_mr(const int mr, int kc, const int8_t *a, long lda, const int8_t *w, long ldw,
                             int32_t *c, long ldc, int nb, int load_c) {
    __m256i acc[NN_MR][2];
    KT_UNROLL for (int r = 0; r < NN_MR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    int k = 0;
    for (; k < kc; k += 2) {
        const int pair = k + 1 < kc;
        __m256i x0 = kt_s16(w + (long)k * ldw);
        __m256i x1 = pair ? kt_s16(w + (long)(k + 1) * ldw) : _mm256_setzero_si256();
        __m256i lo = _mm256_unpacklo_epi16(x0, x1), hi = _mm256_unpackhi_epi16(x0, x1);
        KT_UNROLL for (int r = 0; r < mr; r++) {
            const int8_t *ar = a + (long)r * lda + k;
            uint32_t p = (uint16_t)(int16_t)ar[0] | (pair ? (uint32_t)(uint16_t)(int16_t)ar[1] << 16 : 0u);
            __m256i ab = _mm256_set1_epi32((int)p);
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(lo, ab));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(hi, ab));
        }
    }
    /* lo: columns 0-3 | 8-11, hi: 4-7 | 12-15 */
    KT_UNROLL for (int r = 0; r < mr; r++) {
        int32_t *cr = c + (long)r * ldc;
        kt_out8(cr, _mm256_permute2x128_si256(acc[r][0], acc[r][1], 0x20), nb, load_c);
        kt_out8(cr + 8, _mm256_permute2x128_si256(acc[r][0], acc[r][1], 0x31), nb - 8, load_c);
    }
}

static void kt_nn_tile(int mr, int kc, const int8_t *a, long lda, const int8_t *w, long ldw, int32_t *c, long ldc,
                       int nb, int load_c) {
    switch (mr) {
    case 1: kt_nn_tile_mr(1, kc, a, lda, w, ldw, c, ldc, nb, load_c); break;
    case 2: kt_nn_tile_mr(2, kc, a, lda, w, ldw, c, ldc, nb, load_c); break;
    case 3: kt_nn_tile_mr(3, kc, a, lda, w, ldw, c, ldc, nb, load_c); break;
    default: kt_nn_tile_mr(4, kc, a, lda, w, ldw, c, ldc, nb, load_c); break;
    }
}

void CAT(kt_igemm_nn_, KT_ISA)(KT_IGEMM_ARGS) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accumulate) kt_zero_c(M, N, C, ldc);
        return;
    }
    int8_t tail[NN_KC * 16]; /* the last, partial 16-column strip of a W block, zero-padded */
    for (int n0 = 0; n0 < N; n0 += NN_NC) {
        const int n1 = kt_min(N, n0 + NN_NC), full_end = n0 + ((n1 - n0) & ~15);
        for (int k0 = 0; k0 < K; k0 += NN_KC) {
            const int kc = kt_min(NN_KC, K - k0), load_c = accumulate || k0 > 0;
            const int8_t *wk = W + (long)k0 * ldw;
            if (full_end < n1) {
                int nb = n1 - full_end;
                for (int k = 0; k < kc; k++) {
                    memcpy(tail + k * 16, wk + (long)k * ldw + full_end, (size_t)nb);
                    memset(tail + k * 16 + nb, 0, (size_t)(16 - nb));
                }
            }
            for (int m0 = 0; m0 < M; m0 += NN_MR) {
                const int mr = kt_min(NN_MR, M - m0);
                const int8_t *a = A + (long)m0 * lda + k0;
                int32_t *cm = C + (long)m0 * ldc;
                for (int n = n0; n < full_end; n += 16) kt_nn_tile(mr, kc, a, lda, wk + n, ldw, cm + n, ldc, 16, load_c);
                if (full_end < n1) kt_nn_tile(mr, kc, a, lda, tail, 16, cm + full_end, ldc, n1 - full_end, load_c);
            }
        }
    }
}
