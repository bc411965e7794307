/* fmt_int8.c: the int8 row with bf16 activations (weight-only; design.md 5): symmetric int8
 * codes, one fp32 scale per row, stored by qmat.c (kt_qmat, 8-bit codes). Its products are
 * the weight-only ones (fmt_weight_only.h) with int8 decoding: the code's value as fp32. */
#include "fmt_weight_only.h"

#if defined(__AVX512BF16__)
/* avx512 and amx builds (AVX512-BF16): VCVTNEPS2BF16 rounds to nearest even like
 * kt_f32_to_bf16 for the finite values met here, one instruction per 16 values */
KT_AI void expand_seg(const kt_qmat *W, long row, float sc, int j0, int j1, kt_bf16 *d) {
    __m512 s = _mm512_set1_ps(sc);
    const int8_t *q = W->q + row * W->cols;
    for (int j = j0; j < j1; j += 16) {
        __mmask16 mk = (__mmask16)(j1 - j >= 16 ? 0xffff : (1u << (j1 - j)) - 1);
        __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, q + j))), s);
        _mm256_mask_storeu_epi16(d + j, mk, (__m256i)_mm512_cvtneps_pbh(w));
    }
}
#else
KT_AI void expand_seg(const kt_qmat *W, long row, float s, int j0, int j1, kt_bf16 *d) {
    const int8_t *q = W->q + row * W->cols;
    for (int j = j0; j < j1; j++) d[j] = kt_f32_to_bf16((float)q[j] * s);
}
#endif

#if defined(__AVX512F__)
KT_AI void qdot(int M, const float *a, long lda, const int8_t *q, int n, float *out) {
    __m512 p[QSMALL][2];
    for (int i = 0; i < QSMALL; i++) p[i][0] = p[i][1] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 <= n; k += 32) {
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + k))));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + k + 16))));
        for (int i = 0; i < M; i++) {
            p[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(a + i * lda + k), w0, p[i][0]);
            p[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(a + i * lda + k + 16), w1, p[i][1]);
        }
    }
    for (; k < n; k += 16) {
        __mmask16 mk = (__mmask16)(n - k >= 16 ? 0xffff : (1u << (n - k)) - 1);
        __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, q + k)));
        for (int i = 0; i < M; i++)
            p[i][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, a + i * lda + k), w, p[i][0]);
    }
    for (int i = 0; i < M; i++) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(p[i][0], p[i][1]));
}

/* one scale per row: the segment is all of the block's columns, j0 = 0 .. j1 = n */
KT_AI void nn_row(int M, const kt_qmat *W, long row, float s, const float *ak, int col0, int j0, int j1, int nv,
                  float *acc) {
    const int8_t *q = W->q + row * W->cols + col0;
    __m512 av[QSMALL];
    for (int i = 0; i < M; i++) av[i] = _mm512_set1_ps(ak[i] * s);
    for (int j = j0; j < j1; j += 16) {
        __mmask16 mk = (__mmask16)(j1 - j >= 16 ? 0xffff : (1u << (j1 - j)) - 1);
        __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, q + j)));
        for (int i = 0; i < M; i++) {
            float *c = acc + (long)i * nv * 16 + j;
            _mm512_storeu_ps(c, _mm512_fmadd_ps(av[i], w, _mm512_loadu_ps(c)));
        }
    }
}
#else
KT_AI void qdot(int M, const float *a, long lda, const int8_t *q, int n, float *out) {
    for (int i = 0; i < M; i++) {
        float part[16] = {0}, t = 0.f;
        const float *ai = a + i * lda;
        int k = 0;
        for (; k + 16 <= n; k += 16)
            for (int l = 0; l < 16; l++) part[l] += ai[k + l] * (float)q[k + l];
        for (; k < n; k++) t += ai[k] * (float)q[k];
        for (int l = 0; l < 16; l++) t += part[l];
        out[i] = t;
    }
}

KT_AI void nn_row(const kt_qmat *W, long row, float s, float ak, int col0, int j0, int j1, float *c) {
    const int8_t *q = W->q + row * W->cols + col0;
    float as = ak * s;
    for (int j = j0; j < j1; j++) c[j] += as * (float)q[j];
}
#endif

KT_WO_KERNELS(kernels, 8, 0) /* from expand_seg, qdot and nn_row above */

const kt_fmt_ops KT_FN(kt_fmt_int8) = {
    .name = "int8", .wformat = KT_W_INT8, .act_int8 = 0,
    .code_bits = 8, .qmax = 127.f, .per_row_scale = 1,
    .alloc = kt_qmat_alloc, .pack_rows = kt_qmat_pack_rows, .weight_bytes = kt_qmat_weight_bytes,
    .base_nt = wo_base_nt, .base_nn = wo_base_nn, .wo = &kernels, .small_m = QSMALL,
};
