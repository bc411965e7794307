/* fmt_fp8.c: the fp8 row (e4m3fn codes, weight-only; design.md 5): one byte per code, block
 * scales copied to every row of their block (group = the block's columns, a multiple of 32),
 * stored by qmat.c (kt_qmat, 8-bit codes) from pre-quantized checkpoints only (no
 * quantizer: pack_rows NULL; no W8A8 row). Codes decode exactly (fp8.h). Its products are the
 * weight-only ones (fmt_weight_only.h); the FP8 small-M and panel-expansion kernels live here. */
#include "fmt_weight_only.h"
#include "fp8.h"

/* blocks are multiples of 32 columns */
#if defined(__AVX512BF16__)
/* avx512 and amx builds (AVX512-BF16): VCVTNEPS2BF16 rounds to nearest even like
 * kt_f32_to_bf16 for the finite values met here, one instruction per 16 values */
KT_AI void expand_seg(const kt_qmat *W, long row, float sc, int j0, int j1, kt_bf16 *d) {
    __m512 s = _mm512_set1_ps(sc * 256.f); /* times code / 256: the same product, one multiply */
    const uint8_t *q = (const uint8_t *)W->q + row * W->cols;
    for (int j = j0; j < j1; j += 16) {
        __m512 w = _mm512_mul_ps(kt_fp8x16_to_ps_div256(_mm_loadu_si128((const __m128i *)(q + j))), s);
        _mm256_storeu_si256((__m256i *)(d + j), (__m256i)_mm512_cvtneps_pbh(w));
    }
}
#else
KT_AI void expand_seg(const kt_qmat *W, long row, float s, int j0, int j1, kt_bf16 *d) {
    const uint8_t *q = (const uint8_t *)W->q + row * W->cols;
#if defined(__AVX512F__)
    __m512 sv = _mm512_set1_ps(s * 256.f); /* times code / 256: the same product, one multiply */
    for (int j = j0; j < j1; j += 16)
        _mm256_storeu_si256((__m256i *)(d + j),
                            kt_ps_to_bf16x16(_mm512_mul_ps(kt_fp8x16_to_ps_div256(_mm_loadu_si128((const __m128i *)(q + j))), sv)));
#else
    for (int j = j0; j < j1; j++) d[j] = kt_f32_to_bf16(kt_fp8_to_f32(q[j]) * s);
#endif
}
#endif

/* out[i] = sum_k a[i * lda + k] * value(code k), n a multiple of 32 */
#if defined(__AVX512F__)
KT_AI void qdot(int M, const float *a, long lda, const int8_t *q, int n, float *out) {
    __m512 p[QSMALL][2];
    for (int i = 0; i < QSMALL; i++) p[i][0] = p[i][1] = _mm512_setzero_ps();
    for (int k = 0; k + 32 <= n; k += 32) {
        __m512 w0 = kt_fp8x16_to_ps_div256(_mm_loadu_si128((const __m128i *)(q + k)));
        __m512 w1 = kt_fp8x16_to_ps_div256(_mm_loadu_si128((const __m128i *)(q + k + 16)));
        for (int i = 0; i < M; i++) {
            p[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(a + i * lda + k), w0, p[i][0]);
            p[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(a + i * lda + k + 16), w1, p[i][1]);
        }
    }
    float unit = 256.f; /* fp8: the decoded values were code / 256 (exact) */
    for (int i = 0; i < M; i++) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(p[i][0], p[i][1])) * unit;
}

/* columns j0 .. j1 of one block (scale s; blocks are multiples of 32 columns) */
KT_AI void nn_row(int M, const kt_qmat *W, long row, float s, const float *ak, int col0, int j0, int j1, int nv,
                  float *acc) {
    const uint8_t *q = (const uint8_t *)W->q + row * W->cols + col0;
    __m512 as[QSMALL];
    for (int i = 0; i < M; i++) as[i] = _mm512_set1_ps(ak[i] * (s * 256.f)); /* w is code / 256: exact */
    for (int j = j0; j < j1; j += 16) {
        __m512 w = kt_fp8x16_to_ps_div256(_mm_loadu_si128((const __m128i *)(q + j)));
        for (int i = 0; i < M; i++) {
            float *c = acc + (long)i * nv * 16 + j;
            _mm512_storeu_ps(c, _mm512_fmadd_ps(as[i], w, _mm512_loadu_ps(c)));
        }
    }
}
#else
KT_AI void qdot(int M, const float *a, long lda, const int8_t *q, int n, float *out) {
    for (int i = 0; i < M; i++) {
        float part[16] = {0}, t = 0.f;
        const float *ai = a + i * lda;
        for (int k = 0; k + 16 <= n; k += 16)
            for (int l = 0; l < 16; l++) part[l] += ai[k + l] * kt_fp8_to_f32((uint8_t)q[k + l]);
        for (int l = 0; l < 16; l++) t += part[l];
        out[i] = t;
    }
}

KT_AI void nn_row(const kt_qmat *W, long row, float s, float ak, int col0, int j0, int j1, float *c) {
    const uint8_t *q = (const uint8_t *)W->q + row * W->cols + col0;
    float as = ak * s;
    for (int j = j0; j < j1; j++) c[j] += as * kt_fp8_to_f32(q[j]);
}
#endif

KT_WO_KERNELS(kernels, 8, 0) /* from expand_seg, qdot and nn_row above */

const kt_fmt_ops KT_FN(kt_fmt_fp8) = {
    .name = "fp8", .wformat = KT_W_FP8, .act_int8 = 0,
    .code_bits = 8, .qmax = 0.f, .per_row_scale = 0,
    .alloc = kt_qmat_alloc, .pack_rows = NULL, .weight_bytes = kt_qmat_weight_bytes,
    .base_nt = wo_base_nt, .base_nn = wo_base_nn, .wo = &kernels, .small_m = QSMALL,
};
