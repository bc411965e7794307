/* fmt_weight_only.h: the weight-only products with quantized weights (int8, int4, fp8, int4bs:
 * the rows of fmt_int8.c, fmt_int4.c, fmt_fp8.c, fmt_int4bs.c), as loops a format fills in with
 * its own code decoding (design.md 5). The loops read every scale through kt_qscale (fp32 or
 * bf16 storage) and hand the decoders fp32 scales. A format gives three kernels (kt_wo_kernels); fmt_weight_only.c
 * turns them into the row's base_nt / base_nn:
 *  - more than QSMALL rows: the block of W is expanded, one K panel at a time, into bf16
 *    values bf16(q * scale) in per-thread scratch, then the bf16 GEMMs run on it (fp8: q is
 *    the code's exact value, fp8.h; its scale the row's copy of the block scale). The forward
 *    and the backward expand the same stored values, so the backward multiplies by exactly
 *    the weights the forward used.
 *  - at most QSMALL rows (decode-like, memory bound): the expansion costs more than the
 *    product, so the small-M loops read each stored code once, convert it in registers and
 *    multiply in fp32:
 *      nt: C[i, j] = sum_g scale[j, g] * sum_{k in g} A[i, k] q[j, k]
 *      nn: C[i, j] = sum_k (A[i, k] scale[k, g(j)]) q[k, j]
 *    i.e. the weights q * scale without the bf16 rounding of the panel path (a difference
 *    below 2^-9 of each weight; an expert has the same rows in forward and backward, so both
 *    use the same path). The loops below are always inlined with the format's decoding
 *    function and a constant row count, so that they vectorise per format and M.
 * These loops are ISA code: their AVX-512 forms hold intrinsics (prefetches, vectors). */
#ifndef KTMOE_FMT_WEIGHT_ONLY_H
#define KTMOE_FMT_WEIGHT_ONLY_H
#include "layer/pass.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

enum { QKP = 512 };   /* K panel of expanded weights: a multiple of every int4 group size */
enum { QSMALL = KT_SMALL_M, QPREFETCH_NT = 2, QPREFETCH = 6 };

struct kt_wo_kernels {
    /* dst[i, j] = bf16(q * scale) of W_e[r0 + i, c0 + j] for i < nr, j < nc (c0, nc even for int4) */
    void (*expand_bf16)(const kt_qmat *W, int e, int r0, int nr, int c0, int nc, kt_bf16 *dst, long ldd);
    /* the small-M products (m <= QSMALL): nt C = A W_e[row0 : row0 + n, :]^T, nn C = A W_e[:, col0 : col0 + n] */
    void (*small_nt)(const kt_qmat *W, int e, int m, int row0, int n, const kt_bf16 *A, long lda, float *C, long ldc);
    void (*small_nn)(const kt_qmat *W, int e, int m, int col0, int n, const kt_bf16 *A, long lda, float *C, long ldc);
};

/* the weight-only rows' base_nt / base_nn (fmt_weight_only.c), through L->fmt->wo */
#define wo_base_nt KT_FN(kt_wo_base_nt)
#define wo_base_nn KT_FN(kt_wo_base_nn)
void wo_base_nt(const kt_pass *c, int which, int e, int m, int row0, int n, const kt_bf16 *A, long lda, long p0,
                float *C, long ldc);
void wo_base_nn(const kt_pass *c, int which, int e, int m, int col0, int n, const kt_bf16 *A, long lda, long p0,
                float *C, long ldc);

/* expand_bf16 of a format from its segment decoder: seg writes d[j0 .. j1) for one stored row
 * whose codes j0 .. j1 share the scale s (one group) */
typedef void (*kt_expand_seg_fn)(const kt_qmat *W, long row, float s, int j0, int j1, kt_bf16 *d);
KT_AI void wo_expand(const kt_qmat *W, int e, int r0, int nr, int c0, int nc, kt_bf16 *dst, long ldd,
                     kt_expand_seg_fn seg) {
    for (int i = 0; i < nr; i++) {
        long row = (long)e * W->rows + r0 + i;
        kt_bf16 *d = dst + i * ldd - c0;
        for (int j0 = c0; j0 < c0 + nc;) {
            int g = j0 / W->group, j1 = (g + 1) * W->group < c0 + nc ? (g + 1) * W->group : c0 + nc;
            seg(W, row, kt_qscale(W, row * W->ngroups + g), j0, j1, d);
            j0 = j1;
        }
    }
}

/* C[M, n] of nt: qdot(M, a, lda, q, n, out) is out[i] = sum_k a[i * lda + k] * code(k) over n
 * values of one stored row; rows of `bits`-bit codes */
typedef void (*kt_qdot_fn)(int M, const float *a, long lda, const int8_t *q, int n, float *out);
KT_AI void wo_small_nt_m(int M, const kt_qmat *W, int e, int row0, int n, const float *a, long lda, float *C,
                         long ldc, int bits, kt_qdot_fn qdot) {
    int cols = W->cols;
    for (int j = 0; j < n; j++) {
        long row = (long)e * W->rows + row0 + j;
        const int8_t *q = W->q + row * (cols * bits / 8);
#if defined(__AVX512F__)
        if (j + QPREFETCH_NT < n) { /* a row a few rows ahead: keeps more misses in flight */
            long bytes = cols * bits / 8;
            for (long b = 0; b < bytes; b += 64) _mm_prefetch((const char *)q + QPREFETCH_NT * bytes + b, _MM_HINT_T0);
        }
#endif
        float acc[QSMALL] = {0}, part[QSMALL];
        for (int g = 0; g < W->ngroups; g++) {
            int k0 = g * W->group;
            qdot(M, a + k0, lda, q + k0 * bits / 8, W->group, part);
            float s = kt_qscale(W, row * W->ngroups + g);
            for (int i = 0; i < M; i++) acc[i] += s * part[i];
        }
        for (int i = 0; i < M; i++) C[i * ldc + j] = acc[i];
    }
}

/* small_nt of a format: A's rows as fp32 (even_odd: per 32 values the 16 even ones, then the
 * 16 odd ones, the order int4's qdot reads them in), then wo_small_nt_m per row count */
KT_AI void wo_small_nt(const kt_qmat *W, int e, int m, int row0, int n, const kt_bf16 *A, long lda, float *C,
                       long ldc, int bits, int even_odd, kt_qdot_fn qdot) {
    int K = W->cols;
    float *a = kt_scratch(KT_SCR_SMALL, sizeof(float) * (size_t)QSMALL * K);
    for (int i = 0; i < m; i++) {
        if (even_odd)
            for (int k = 0; k < K; k += 32)
                for (int l = 0; l < 16; l++) {
                    a[(long)i * K + k + l] = kt_bf16_to_f32(A[i * lda + k + 2 * l]);
                    a[(long)i * K + k + 16 + l] = kt_bf16_to_f32(A[i * lda + k + 2 * l + 1]);
                }
        else
            row_to_f32(a + (long)i * K, A + i * lda, K);
    }
    switch (m) {
    case 1: wo_small_nt_m(1, W, e, row0, n, a, K, C, ldc, bits, qdot); break;
    case 2: wo_small_nt_m(2, W, e, row0, n, a, K, C, ldc, bits, qdot); break;
    case 3: wo_small_nt_m(3, W, e, row0, n, a, K, C, ldc, bits, qdot); break;
    default: wo_small_nt_m(4, W, e, row0, n, a, K, C, ldc, bits, qdot); break;
    }
}

/* C [M, n] of nn = sum over the K stored rows k of (A[i, k] * scale[k, g(j)]) * code[k, col0 + j]:
 * for each stored row, the loop below walks the groups of columns col0 .. col0 + n and the
 * format's nn_row adds the columns j0 .. j1 (relative to col0; one group, scale s, read once
 * through kt_qscale) of stored row `row` into the accumulators acc.
 *  AVX-512: ak[i] = A[i, k] for all M rows; acc is [M][16 nv] (even_odd: per 32 columns, the 16
 *           even ones then the 16 odd ones);
 *  portable: called per row i of A with ak = A[i, k], acc = that row's [n] accumulators. */
#if defined(__AVX512F__)
typedef void (*kt_nn_row_fn)(int M, const kt_qmat *W, long row, float s, const float *ak, int col0, int j0, int j1,
                             int nv, float *acc);
#else
typedef void (*kt_nn_row_fn)(const kt_qmat *W, long row, float s, float ak, int col0, int j0, int j1, float *acc);
#endif
/* where group g of the columns ends, relative to col0, at most n */
KT_AI int wo_group_end(const kt_qmat *W, int g, int col0, int n) {
    int end = (g + 1) * W->group - col0;
    return end < n ? end : n;
}

KT_AI void wo_small_nn_m(int M, const kt_qmat *W, int e, int col0, int n, const kt_bf16 *A, long lda, float *C,
                         long ldc, int bits, int even_odd, kt_nn_row_fn nn_row) {
    int cols = W->cols, K = W->rows, g0 = col0 / W->group;
    float *acc = kt_scratch(KT_SCR_SMALL, sizeof(float) * (size_t)QSMALL * (n + 32));
#if defined(__AVX512F__)
    int nv = (n + 15) / 16;
    for (int i = 0; i < M * nv * 16; i++) acc[i] = 0.f;
    for (int k = 0; k < K; k++) {
        long row = (long)e * K + k;
        float ak[QSMALL];
        for (int i = 0; i < M; i++) ak[i] = kt_bf16_to_f32(A[i * lda + k]);
        if (k + QPREFETCH < K) { /* the same columns QPREFETCH rows ahead: keeps more misses in flight */
            const char *ahead = (const char *)W->q + (row + QPREFETCH) * (cols * bits / 8) + col0 * bits / 8;
            for (int b = 0; b < n * bits / 8; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
        }
        for (int g = g0, j0 = 0; j0 < n; g++) {
            int j1 = wo_group_end(W, g, col0, n);
            nn_row(M, W, row, kt_qscale(W, row * W->ngroups + g), ak, col0, j0, j1, nv, acc);
            j0 = j1;
        }
    }
    for (int i = 0; i < M; i++) {
        const float *a = acc + (long)i * nv * 16;
        for (int j = 0; j < n; j++)
            C[i * ldc + j] = even_odd ? a[(j & ~31) + (j & 1) * 16 + (j & 31) / 2] : a[j];
    }
#else
    (void)cols, (void)bits, (void)even_odd;
    for (int i = 0; i < M * n; i++) acc[i] = 0.f;
    for (int k = 0; k < K; k++) {
        long row = (long)e * K + k;
        for (int g = g0, j0 = 0; j0 < n; g++) {
            int j1 = wo_group_end(W, g, col0, n);
            float s = kt_qscale(W, row * W->ngroups + g);
            for (int i = 0; i < M; i++)
                nn_row(W, row, s, kt_bf16_to_f32(A[i * lda + k]), col0, j0, j1, acc + (long)i * n);
            j0 = j1;
        }
    }
    for (int i = 0; i < M; i++)
        for (int j = 0; j < n; j++) C[i * ldc + j] = acc[(long)i * n + j];
#endif
}

KT_AI void wo_small_nn(const kt_qmat *W, int e, int m, int col0, int n, const kt_bf16 *A, long lda, float *C,
                       long ldc, int bits, int even_odd, kt_nn_row_fn nn_row) {
    switch (m) {
    case 1: wo_small_nn_m(1, W, e, col0, n, A, lda, C, ldc, bits, even_odd, nn_row); break;
    case 2: wo_small_nn_m(2, W, e, col0, n, A, lda, C, ldc, bits, even_odd, nn_row); break;
    case 3: wo_small_nn_m(3, W, e, col0, n, A, lda, C, ldc, bits, even_odd, nn_row); break;
    default: wo_small_nn_m(4, W, e, col0, n, A, lda, C, ldc, bits, even_odd, nn_row); break;
    }
}
/* `static const kt_wo_kernels name` of a format from its expand_seg, qdot and nn_row (defined
 * above the use; bits per code, even_odd as in wo_small_nt), each inlined into its loop */
#define KT_WO_KERNELS(name, bits, even_odd)                                                                    \
    static void name##_expand(const kt_qmat *W, int e, int r0, int nr, int c0, int nc, kt_bf16 *dst, long ldd) { \
        wo_expand(W, e, r0, nr, c0, nc, dst, ldd, expand_seg);                                                \
    }                                                                                                         \
    static void name##_nt(const kt_qmat *W, int e, int m, int row0, int n, const kt_bf16 *A, long lda, float *C, \
                          long ldc) {                                                                         \
        wo_small_nt(W, e, m, row0, n, A, lda, C, ldc, bits, even_odd, qdot);                                  \
    }                                                                                                         \
    static void name##_nn(const kt_qmat *W, int e, int m, int col0, int n, const kt_bf16 *A, long lda, float *C, \
                          long ldc) {                                                                         \
        wo_small_nn(W, e, m, col0, n, A, lda, C, ldc, bits, even_odd, nn_row);                                \
    }                                                                                                         \
    static const kt_wo_kernels name = {name##_expand, name##_nt, name##_nn};
#endif
