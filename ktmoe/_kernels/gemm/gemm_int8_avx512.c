/* gemm_int8_avx512.c: the int8 GEMMs of gemm_int8.h with AVX-512, built for two kernel targets
 * (meson.build), the inner loop picked at compile time (__AVX512VNNI__), the functions named after
 * the target (kt_igemm_nt_<KT_ISA>):
 *   - avx512 (VNNI flag): _mm512_dpbusd_epi32, four u8 x s8 products per int32 lane per instruction.
 *           The unsigned operand is W + 128 (W xor 0x80, exact as u8 since W >= -127); A stays
 *           signed, so each result is off by 128 * sum_k A[m, k], a per-row constant that is
 *           subtracted when C is written (row sums of A are computed once per block).
 *   - avx512f (no VNNI flag, so its objects cannot contain a VNNI instruction): int8 sign-extended
 *           to int16 (vpmovsxbw) and _mm512_madd_epi16 (two s16 x s16 products per int32 lane),
 *           exact, on any AVX-512BW CPU.
 * Serves small M (decode-like, memory bound: W is streamed once) on every AVX-512 CPU, and is the
 * whole int8 kernel on CPUs without AMX.
 * Products and sums are exact in int32 (|A|, |W| <= 127, K <= 65536).
 *
 * nt (C = A W^T, W [N, K]): dot products along K. A tile is up to 4 rows of A x 4 rows of W
 *   with 16 zmm accumulators, 64 k per step; W rows are read as 4 sequential streams and stay in
 *   L1 while the row blocks of A (in chunks of KT_NT_MCH rows) pass over them. The 16
 *   accumulators are transpose-reduced into one zmm (lane 4 r + c) at the end of K.
 * nn (C = A W, W [K, N]): axpy along N. A tile is up to 4 rows of A x 64 columns of C (16 zmm
 *   accumulators). VNNI: rows k..k+3 of W are interleaved bytewise in registers (unpack epi8 then
 *   epi16) into 4-byte k quads per column, against a 32-bit broadcast of A[m, k..k+3]; the
 *   128-bit-lane permutation this leaves is undone once per tile when C is written. BW: rows k
 *   and k+1 sign-extended and interleaved into int16 pairs, against a broadcast A pair. W is
 *   walked in blocks of NN_KC rows x NN_NC columns (L2 resident while the row blocks of A pass
 *   over it); the first row block prefetches two tiles ahead along the W rows.
 * Tails (M, N, K not multiples of the block) use masked loads and stores, so no byte outside
 * A [M x K], W's region or C [M x N] is read or written.
 */
#include "gemm_int8.h"
#include <immintrin.h>
#include <string.h>

#define KT_INLINE static inline __attribute__((always_inline))
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#if defined(__AVX512VNNI__)
#define KT_USE_VNNI 1
#else
#define KT_USE_VNNI 0
#endif
/* Fully unroll the short register-block loops early (else gcc keeps accumulators in memory). */
#define KT_UNROLL _Pragma("GCC unroll 16")

/* ---- shared helpers ------------------------------------------------------------------ */

KT_INLINE int kt_min(int a, int b) { return a < b ? a : b; }

/* lanes [0, n) set, n clamped to [0, 64] / [0, 32] */
KT_INLINE __mmask64 kt_mask64(int n) {
    return n >= 64 ? ~(__mmask64)0 : n <= 0 ? (__mmask64)0 : (((__mmask64)1 << n) - 1);
}
KT_INLINE __mmask32 kt_mask32(int n) {
    return n >= 32 ? (__mmask32)0xffffffffu : n <= 0 ? (__mmask32)0 : (__mmask32)((1u << n) - 1u);
}

/* 64 int8; full is a compile-time constant in every caller */
KT_INLINE __m512i kt_load64(const int8_t *p, const int full, __mmask64 m) {
    return full ? _mm512_loadu_si512((const void *)p) : _mm512_maskz_loadu_epi8(m, p);
}
/* 32 int8 sign-extended to int16 */
KT_INLINE __m512i kt_load32_s16(const int8_t *p, const int full, __mmask32 m) {
    __m256i v = full ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi8(m, p);
    return _mm512_cvtepi8_epi16(v);
}

static void kt_zero_c(int M, int N, int32_t *C, long ldc) {
    for (int m = 0; m < M; m++) memset(C + (long)m * ldc, 0, sizeof(int32_t) * (size_t)N);
}

/* sum_k a[k] for k < K (exact): sad of a + 128 against 0, minus 128 per lane visited */
static int32_t kt_rowsum(const int8_t *a, int K) {
    const __m512i x80 = _mm512_set1_epi8((char)0x80), z = _mm512_setzero_si512();
    __m512i s = _mm512_setzero_si512();
    long lanes = 0;
    int k = 0;
    for (; k + 64 <= K; k += 64, lanes += 64)
        s = _mm512_add_epi64(s, _mm512_sad_epu8(_mm512_xor_si512(_mm512_loadu_si512((const void *)(a + k)), x80), z));
    if (k < K) {
        s = _mm512_add_epi64(s, _mm512_sad_epu8(_mm512_xor_si512(_mm512_maskz_loadu_epi8(kt_mask64(K - k), a + k), x80), z));
        lanes += 64;
    }
    return (int32_t)(_mm512_reduce_add_epi64(s) - 128 * lanes);
}

/* ---- nt ------------------------------------------------------------------------------ */

enum { NT_MR = 4, NT_NR = 4, KT_NT_MCH = 256 };

/* lane 4 r + c of the result = sum of the 16 lanes of acc[r][c] */
KT_INLINE __m512i kt_reduce4(__m512i v0, __m512i v1, __m512i v2, __m512i v3) {
    __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
    __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
}
KT_INLINE __m512i kt_reduce16(__m512i acc[NT_MR][NT_NR]) {
    __m512i u0 = kt_reduce4(acc[0][0], acc[0][1], acc[0][2], acc[0][3]);
    __m512i u1 = kt_reduce4(acc[1][0], acc[1][1], acc[1][2], acc[1][3]);
    __m512i u2 = kt_reduce4(acc[2][0], acc[2][1], acc[2][2], acc[2][3]);
    __m512i u3 = kt_reduce4(acc[3][0], acc[3][1], acc[3][2], acc[3][3]);
    __m512i x01 = _mm512_add_epi32(_mm512_shuffle_i32x4(u0, u1, 0x44), _mm512_shuffle_i32x4(u0, u1, 0xee));
    __m512i x23 = _mm512_add_epi32(_mm512_shuffle_i32x4(u2, u3, 0x44), _mm512_shuffle_i32x4(u2, u3, 0xee));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(x01, x23, 0x88), _mm512_shuffle_i32x4(x01, x23, 0xdd));
}

/* C[r, c] (+)= s[4 r + c] for r < mr, c < nr */
KT_INLINE void kt_nt_store(int32_t *c, long ldc, __m512i s, int mr, int nr, int accumulate) {
    int32_t t[16];
    _mm512_storeu_si512((void *)t, s);
    const __mmask8 mk = (__mmask8)((1u << nr) - 1u);
    for (int r = 0; r < mr; r++) {
        int32_t *cr = c + (long)r * ldc;
        __m128i x = _mm_loadu_si128((const __m128i *)(t + 4 * r));
        if (accumulate) x = _mm_add_epi32(x, _mm_maskz_loadu_epi32(mk, cr));
        _mm_mask_storeu_epi32(cr, mk, x);
    }
}

typedef __m512i (*kt_nt_tile_fn)(int mr, int K, const int8_t *a, long lda, const int8_t *const *w);

/* BW: 64 k as two halves of 32, sign-extended to int16, vpmaddwd */
KT_INLINE void kt_nt_step_bw(const int mr, __m512i acc[NT_MR][NT_NR], const int8_t *a, long lda,
                             const int8_t *const *w, int k, const int full, __mmask64 m) {
    KT_UNROLL for (int h = 0; h < 2; h++) {
        const __mmask32 mh = (__mmask32)(m >> (32 * h));
        __m512i av[NT_MR];
        KT_UNROLL for (int r = 0; r < mr; r++) av[r] = kt_load32_s16(a + (long)r * lda + k + 32 * h, full, mh);
        KT_UNROLL for (int c = 0; c < NT_NR; c++) {
            __m512i v = kt_load32_s16(w[c] + k + 32 * h, full, mh);
            KT_UNROLL for (int r = 0; r < mr; r++) acc[r][c] = _mm512_add_epi32(acc[r][c], _mm512_madd_epi16(av[r], v));
        }
    }
}

#if KT_USE_VNNI
/* VNNI: (W + 128) as u8 against signed A; the caller subtracts 128 * rowsum(A) */
KT_INLINE void kt_nt_step_vnni(const int mr, __m512i acc[NT_MR][NT_NR], const int8_t *a, long lda,
                                              const int8_t *const *w, int k, const int full, __mmask64 m) {
    const __m512i x80 = _mm512_set1_epi8((char)0x80);
    __m512i av[NT_MR];
    KT_UNROLL for (int r = 0; r < mr; r++) av[r] = kt_load64(a + (long)r * lda + k, full, m);
    KT_UNROLL for (int c = 0; c < NT_NR; c++) {
        __m512i v = _mm512_xor_si512(kt_load64(w[c] + k, full, m), x80); /* masked lanes: 128 x 0 */
        KT_UNROLL for (int r = 0; r < mr; r++) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], v, av[r]);
    }
}
#endif

#define KT_NT_TILE_BODY(step)                                                        \
    __m512i acc[NT_MR][NT_NR];                                                       \
    KT_UNROLL for (int r = 0; r < NT_MR; r++)                                        \
        KT_UNROLL for (int c = 0; c < NT_NR; c++) acc[r][c] = _mm512_setzero_si512(); \
    int k = 0;                                                                       \
    for (; k + 64 <= K; k += 64) step(mr, acc, a, lda, w, k, 1, (__mmask64)0);       \
    if (k < K) step(mr, acc, a, lda, w, k, 0, kt_mask64(K - k)); /* K tail */        \
    return kt_reduce16(acc);

KT_INLINE __m512i kt_nt_tile_bw_mr(const int mr, int K, const int8_t *a, long lda, const int8_t *const *w) {
    KT_NT_TILE_BODY(kt_nt_step_bw)
}
#if KT_USE_VNNI
KT_INLINE __m512i kt_nt_tile_vnni_mr(const int mr, int K, const int8_t *a, long lda, const int8_t *const *w) {
    KT_NT_TILE_BODY(kt_nt_step_vnni)
}
#endif
#undef KT_NT_TILE_BODY

static __m512i kt_nt_tile_bw(int mr, int K, const int8_t *a, long lda, const int8_t *const *w) {
    switch (mr) {
    case 1: return kt_nt_tile_bw_mr(1, K, a, lda, w);
    case 2: return kt_nt_tile_bw_mr(2, K, a, lda, w);
    case 3: return kt_nt_tile_bw_mr(3, K, a, lda, w);
    default: return kt_nt_tile_bw_mr(4, K, a, lda, w);
    }
}
#if KT_USE_VNNI
static __m512i kt_nt_tile_vnni(int mr, int K, const int8_t *a, long lda, const int8_t *const *w) {
    switch (mr) {
    case 1: return kt_nt_tile_vnni_mr(1, K, a, lda, w);
    case 2: return kt_nt_tile_vnni_mr(2, K, a, lda, w);
    case 3: return kt_nt_tile_vnni_mr(3, K, a, lda, w);
    default: return kt_nt_tile_vnni_mr(4, K, a, lda, w);
    }
}
#else
#define kt_nt_tile_vnni kt_nt_tile_bw /* never called: vnni is 0 */
#endif

static void kt_nt_drive(KT_IGEMM_ARGS, int vnni) {
    kt_nt_tile_fn tile = vnni ? kt_nt_tile_vnni : kt_nt_tile_bw;
    int32_t corr[KT_NT_MCH * 4]; /* per row block of 4: lane 4 r + c = 128 * rowsum(A[m0 + r]) */
    for (int mc = 0; mc < M; mc += KT_NT_MCH) {
        const int mch = kt_min(KT_NT_MCH, M - mc);
        if (vnni)
            for (int m = 0; m < mch; m++) {
                const int32_t s = 128 * kt_rowsum(A + (long)(mc + m) * lda, K);
                for (int c = 0; c < 4; c++) corr[4 * m + c] = s;
            }
        for (int n0 = 0; n0 < N; n0 += NT_NR) {
            const int nr = kt_min(NT_NR, N - n0);
            const int8_t *w[NT_NR];
            /* past the N tail, repeat the last row: valid memory, result discarded */
            for (int c = 0; c < NT_NR; c++) w[c] = W + (long)(n0 + kt_min(c, nr - 1)) * ldw;
            for (int m0 = 0; m0 < mch; m0 += NT_MR) {
                const int mr = kt_min(NT_MR, mch - m0);
                __m512i s = tile(mr, K, A + (long)(mc + m0) * lda, lda, w);
                /* rows past mr read corr of the next block or garbage lanes: never stored */
                if (vnni) s = _mm512_sub_epi32(s, _mm512_maskz_loadu_epi32(kt_mask32(4 * mr) & 0xffff, corr + 4 * m0));
                kt_nt_store(C + (long)(mc + m0) * ldc + n0, ldc, s, mr, nr, accumulate);
            }
        }
    }
}

void CAT(kt_igemm_nt_, KT_ISA)(KT_IGEMM_ARGS) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accumulate) kt_zero_c(M, N, C, ldc);
        return;
    }
    kt_nt_drive(M, N, K, A, lda, W, ldw, C, ldc, accumulate, KT_USE_VNNI);
}

/* ---- nn ------------------------------------------------------------------------------ */

/* W blocks of NN_KC rows x NN_NC columns (256 KiB, L2); prefetch distance NN_PF columns */
enum { NN_MR = 4, NN_NB = 64, NN_KC = 128, NN_NC = 2048, NN_PF = 128 };

/* One tile: mr rows of A x nb (<= 64) columns of C over kc rows of W; C (+)= when load_c.
 * corr[r]: subtracted from every result of row r (VNNI offset). pf: same W rows, NN_PF
 * columns on, to prefetch (or NULL). */
typedef void (*kt_nn_tile_fn)(int mr, int nb, int kc, const int8_t *a, long lda, const int8_t *w, long ldw,
                              const int8_t *pf, int32_t *c, long ldc, int load_c, const int32_t *corr);

KT_INLINE void kt_nn_out16(int32_t *c, __m512i v, __mmask16 m, int load_c) {
    if (load_c) v = _mm512_add_epi32(v, _mm512_maskz_loadu_epi32(m, c));
    _mm512_mask_storeu_epi32(c, m, v);
}

KT_INLINE void kt_nn_prefetch(const int8_t *pf, long ldw, int k, const int nrows) {
    if (pf)
        KT_UNROLL for (int j = 0; j < nrows; j++) _mm_prefetch((const char *)(pf + (long)(k + j) * ldw), _MM_HINT_T0);
}

/* A[k..k+nq-1] as one 32-bit lane (zero past nq) */
KT_INLINE int kt_quad(const int8_t *p, const int nq) {
    uint32_t v = 0;
    if (nq == 4) memcpy(&v, p, 4);
    else
        for (int j = 0; j < nq; j++) v |= (uint32_t)(uint8_t)p[j] << (8 * j);
    return (int)v;
}

#if KT_USE_VNNI
/* VNNI step: rows k..k+nq-1 of W (nq in 1..4, compile-time). acc[r][j], lane L, element e:
 * column 16 L + 4 j + e. */
KT_INLINE void kt_nn_step_vnni(const int mr, const int full, const int nq, __m512i acc[NN_MR][4],
                                              __mmask64 nm, const int8_t *a, long lda, const int8_t *w, long ldw,
                                              int k, const int8_t *pf) {
    const __m512i x80 = _mm512_set1_epi8((char)0x80);
    kt_nn_prefetch(pf, ldw, k, nq);
    __m512i x[4];
    KT_UNROLL for (int j = 0; j < 4; j++)
        x[j] = _mm512_xor_si512(j < nq ? kt_load64(w + (long)(k + j) * ldw, full, nm) : _mm512_setzero_si512(), x80);
    const __m512i t0 = _mm512_unpacklo_epi8(x[0], x[1]), t1 = _mm512_unpackhi_epi8(x[0], x[1]);
    const __m512i t2 = _mm512_unpacklo_epi8(x[2], x[3]), t3 = _mm512_unpackhi_epi8(x[2], x[3]);
    const __m512i q0 = _mm512_unpacklo_epi16(t0, t2), q1 = _mm512_unpackhi_epi16(t0, t2);
    const __m512i q2 = _mm512_unpacklo_epi16(t1, t3), q3 = _mm512_unpackhi_epi16(t1, t3);
    KT_UNROLL for (int r = 0; r < mr; r++) {
        const __m512i ab = _mm512_set1_epi32(kt_quad(a + (long)r * lda + k, nq));
        acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], q0, ab);
        acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], q1, ab);
        acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], q2, ab);
        acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], q3, ab);
    }
}

KT_INLINE void kt_nn_tile_vnni_mr(const int mr, const int full, int nb, int kc, const int8_t *a,
                                                 long lda, const int8_t *w, long ldw, const int8_t *pf, int32_t *c,
                                                 long ldc, int load_c, const int32_t *corr) {
    __m512i acc[NN_MR][4];
    KT_UNROLL for (int r = 0; r < NN_MR; r++)
        KT_UNROLL for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_si512();
    const __mmask64 nm = kt_mask64(nb);
    int k = 0;
    for (; k + 4 <= kc; k += 4) kt_nn_step_vnni(mr, full, 4, acc, nm, a, lda, w, ldw, k, pf);
    switch (kc - k) {
    case 1: kt_nn_step_vnni(mr, full, 1, acc, nm, a, lda, w, ldw, k, pf); break;
    case 2: kt_nn_step_vnni(mr, full, 2, acc, nm, a, lda, w, ldw, k, pf); break;
    case 3: kt_nn_step_vnni(mr, full, 3, acc, nm, a, lda, w, ldw, k, pf); break;
    default: break;
    }
    KT_UNROLL for (int r = 0; r < mr; r++) {
        const __m512i cr = _mm512_set1_epi32(corr[r]);
        /* 4x4 transpose of 128-bit lanes: output L = [acc0.L, acc1.L, acc2.L, acc3.L] */
        const __m512i u0 = _mm512_shuffle_i32x4(acc[r][0], acc[r][1], 0x44); /* a0L0 a0L1 a1L0 a1L1 */
        const __m512i u1 = _mm512_shuffle_i32x4(acc[r][2], acc[r][3], 0x44);
        const __m512i u2 = _mm512_shuffle_i32x4(acc[r][0], acc[r][1], 0xee); /* a0L2 a0L3 a1L2 a1L3 */
        const __m512i u3 = _mm512_shuffle_i32x4(acc[r][2], acc[r][3], 0xee);
        __m512i o[4] = {_mm512_shuffle_i32x4(u0, u1, 0x88), _mm512_shuffle_i32x4(u0, u1, 0xdd),
                        _mm512_shuffle_i32x4(u2, u3, 0x88), _mm512_shuffle_i32x4(u2, u3, 0xdd)};
        int32_t *cr_ = c + (long)r * ldc;
        KT_UNROLL for (int j = 0; j < 4; j++)
            kt_nn_out16(cr_ + 16 * j, _mm512_sub_epi32(o[j], cr), (__mmask16)(nm >> (16 * j)), load_c);
    }
}
#endif

/* BW step: rows k (and k + 1 when pair) of W sign-extended to int16 and interleaved with
 * unpacklo/hi_epi16: acc[r][2h + p], lane L: columns 32 h + 8 L + 4 p + 0..3. */
KT_INLINE void kt_nn_step_bw(const int mr, const int full, const int pair, __m512i acc[NN_MR][4], __mmask64 nm,
                             const int8_t *a, long lda, const int8_t *w, long ldw, int k, const int8_t *pf) {
    kt_nn_prefetch(pf, ldw, k, 1 + pair);
    __m512i p[4];
    KT_UNROLL for (int h = 0; h < 2; h++) {
        const __mmask32 mh = (__mmask32)(nm >> (32 * h));
        const __m512i x0 = kt_load32_s16(w + (long)k * ldw + 32 * h, full, mh);
        const __m512i x1 = pair ? kt_load32_s16(w + (long)(k + 1) * ldw + 32 * h, full, mh) : _mm512_setzero_si512();
        p[2 * h] = _mm512_unpacklo_epi16(x0, x1);
        p[2 * h + 1] = _mm512_unpackhi_epi16(x0, x1);
    }
    KT_UNROLL for (int r = 0; r < mr; r++) {
        const int8_t *ar = a + (long)r * lda + k;
        const uint32_t lo = (uint16_t)(int16_t)ar[0], hi = pair ? (uint16_t)(int16_t)ar[1] : 0;
        const __m512i ab = _mm512_set1_epi32((int)(lo | hi << 16));
        KT_UNROLL for (int j = 0; j < 4; j++) acc[r][j] = _mm512_add_epi32(acc[r][j], _mm512_madd_epi16(p[j], ab));
    }
}

KT_INLINE void kt_nn_tile_bw_mr(const int mr, const int full, int nb, int kc, const int8_t *a, long lda,
                                const int8_t *w, long ldw, const int8_t *pf, int32_t *c, long ldc, int load_c) {
    __m512i acc[NN_MR][4];
    KT_UNROLL for (int r = 0; r < NN_MR; r++)
        KT_UNROLL for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_si512();
    const __mmask64 nm = kt_mask64(nb);
    int k = 0;
    for (; k + 1 < kc; k += 2) kt_nn_step_bw(mr, full, 1, acc, nm, a, lda, w, ldw, k, pf);
    if (k < kc) kt_nn_step_bw(mr, full, 0, acc, nm, a, lda, w, ldw, k, pf);
    /* (x, y) = unpacklo / unpackhi: columns 0..15 = x.L0 y.L0 x.L1 y.L1, 16..31 = x.L2 y.L2 x.L3 y.L3 */
    const __m512i i0 = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i i1 = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
    KT_UNROLL for (int r = 0; r < mr; r++) {
        int32_t *cr = c + (long)r * ldc;
        KT_UNROLL for (int h = 0; h < 2; h++) {
            kt_nn_out16(cr + 32 * h, _mm512_permutex2var_epi32(acc[r][2 * h], i0, acc[r][2 * h + 1]),
                        (__mmask16)(nm >> (32 * h)), load_c);
            kt_nn_out16(cr + 32 * h + 16, _mm512_permutex2var_epi32(acc[r][2 * h], i1, acc[r][2 * h + 1]),
                        (__mmask16)(nm >> (32 * h + 16)), load_c);
        }
    }
}

#define KT_NN_SWITCH(fn, ...)                                                              \
    switch (mr) {                                                                          \
    case 1: full ? fn(1, 1, __VA_ARGS__) : fn(1, 0, __VA_ARGS__); break;                   \
    case 2: full ? fn(2, 1, __VA_ARGS__) : fn(2, 0, __VA_ARGS__); break;                   \
    case 3: full ? fn(3, 1, __VA_ARGS__) : fn(3, 0, __VA_ARGS__); break;                   \
    default: full ? fn(4, 1, __VA_ARGS__) : fn(4, 0, __VA_ARGS__); break;                  \
    }

static void kt_nn_tile_bw(int mr, int nb, int kc, const int8_t *a, long lda, const int8_t *w, long ldw,
                          const int8_t *pf, int32_t *c, long ldc, int load_c, const int32_t *corr) {
    (void)corr;
    const int full = nb == NN_NB;
    KT_NN_SWITCH(kt_nn_tile_bw_mr, nb, kc, a, lda, w, ldw, pf, c, ldc, load_c)
}
#if KT_USE_VNNI
static void kt_nn_tile_vnni(int mr, int nb, int kc, const int8_t *a, long lda, const int8_t *w, long ldw,
                            const int8_t *pf, int32_t *c, long ldc, int load_c, const int32_t *corr) {
    const int full = nb == NN_NB;
    KT_NN_SWITCH(kt_nn_tile_vnni_mr, nb, kc, a, lda, w, ldw, pf, c, ldc, load_c, corr)
}
#else
#define kt_nn_tile_vnni kt_nn_tile_bw /* never called: vnni is 0 */
#endif
#undef KT_NN_SWITCH

static void kt_nn_drive(KT_IGEMM_ARGS, int vnni) {
    kt_nn_tile_fn tile = vnni ? kt_nn_tile_vnni : kt_nn_tile_bw;
    int32_t corr[NN_MR] = {0, 0, 0, 0};
    for (int n0 = 0; n0 < N; n0 += NN_NC) {
        const int n1 = kt_min(N, n0 + NN_NC);
        for (int k0 = 0; k0 < K; k0 += NN_KC) {
            const int kc = kt_min(NN_KC, K - k0);
            const int load_c = accumulate || k0 > 0;
            for (int m0 = 0; m0 < M; m0 += NN_MR) {
                const int mr = kt_min(NN_MR, M - m0);
                const int8_t *a = A + (long)m0 * lda + k0;
                if (vnni)
                    for (int r = 0; r < mr; r++) corr[r] = 128 * kt_rowsum(a + (long)r * lda, kc);
                for (int n = n0; n < n1; n += NN_NB) {
                    const int8_t *wt = W + (long)k0 * ldw + n;
                    const int8_t *pf = m0 == 0 && n + NN_PF + NN_NB <= n1 ? wt + NN_PF : NULL;
                    tile(mr, kt_min(NN_NB, n1 - n), kc, a, lda, wt, ldw, pf, C + (long)m0 * ldc + n, ldc, load_c,
                         corr);
                }
            }
        }
    }
}

void CAT(kt_igemm_nn_, KT_ISA)(KT_IGEMM_ARGS) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accumulate) kt_zero_c(M, N, C, ldc);
        return;
    }
    kt_nn_drive(M, N, K, A, lda, W, ldw, C, ldc, accumulate, KT_USE_VNNI);
}
