/* fmt_int4.c: the int4 row with bf16 activations (weight-only; design.md 5): signed 4-bit
 * codes, two per byte (column 2j in the low nibble, 2j + 1 in the high one), one fp32 scale
 * per row and group of `group` columns (a multiple of 32), stored by qmat.c (kt_qmat,
 * 4-bit codes). fmt_int4bs.c's row (bf16 scales) shares these kernels (kt_wo_int4). Its products are the weight-only ones (fmt_weight_only.h) with nibble
 * decoding; the small-M loops read a byte's two codes into an even and an odd vector. */
#include "fmt_weight_only.h"

#if defined(__AVX512BF16__)
/* avx512 and amx builds (AVX512-BF16): VCVTNEPS2BF16 rounds to nearest even like
 * kt_f32_to_bf16 for the finite values met here; groups and chunk edges are multiples of 32 columns */
KT_AI void expand_seg(const kt_qmat *W, long row, float sc, int j0, int j1, kt_bf16 *d) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __m512 s = _mm512_set1_ps(sc);
    const int8_t *q = W->q + row * (W->cols / 2);
    for (int j = j0; j < j1; j += 32) {
        __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + j / 2)));
        __m512 even = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28)), s);
        __m512 odd = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 24), 28)), s);
        __m512i both = (__m512i)_mm512_cvtne2ps_pbh(odd, even); /* [even 0..15, odd 0..15] */
        _mm512_storeu_si512(d + j, _mm512_permutexvar_epi16(interleave, both));
    }
}
#else
KT_AI void expand_seg(const kt_qmat *W, long row, float s, int j0, int j1, kt_bf16 *d) {
    const int8_t *q = W->q + row * (W->cols / 2);
    for (int j = j0 / 2; j < j1 / 2; j++) {
        int8_t b = q[j];
        d[2 * j] = kt_f32_to_bf16((float)((int8_t)(b << 4) >> 4) * s);
        d[2 * j + 1] = kt_f32_to_bf16((float)(b >> 4) * s);
    }
}
#endif

/* qdot's a is stored per 32 values as 16 even then 16 odd ones (wo_small_nt's even_odd); n is a
 * multiple of 32 */
#if defined(__AVX512F__)
KT_AI void qdot(int M, const float *a, long lda, const int8_t *q, int n, float *out) {
    __m512 p[QSMALL][2];
    for (int i = 0; i < QSMALL; i++) p[i][0] = p[i][1] = _mm512_setzero_ps();
    for (int k = 0; k + 32 <= n; k += 32) {
        __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + k / 2)));
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 24), 28));
        for (int i = 0; i < M; i++) {
            p[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(a + i * lda + k), w0, p[i][0]);
            p[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(a + i * lda + k + 16), w1, p[i][1]);
        }
    }
    for (int i = 0; i < M; i++) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(p[i][0], p[i][1]));
}

/* columns j0 .. j1 of one group (scale s); acc per 32 columns: 16 even then 16 odd ones; groups
 * are multiples of 32 columns */
KT_AI void nn_row(int M, const kt_qmat *W, long row, float s, const float *ak, int col0, int j0, int j1, int nv,
                  float *acc) {
    const int8_t *q = W->q + row * (W->cols / 2) + col0 / 2;
    __m512 as[QSMALL];
    for (int i = 0; i < M; i++) as[i] = _mm512_set1_ps(ak[i] * s);
    for (int j = j0; j < j1; j += 32) {
        __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + j / 2)));
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 24), 28));
        for (int i = 0; i < M; i++) {
            float *c = acc + (long)i * nv * 16 + j;
            _mm512_storeu_ps(c, _mm512_fmadd_ps(as[i], w0, _mm512_loadu_ps(c)));
            _mm512_storeu_ps(c + 16, _mm512_fmadd_ps(as[i], w1, _mm512_loadu_ps(c + 16)));
        }
    }
}
#else
KT_AI void qdot(int M, const float *a, long lda, const int8_t *q, int n, float *out) {
    for (int i = 0; i < M; i++) {
        float part[16] = {0}, t = 0.f;
        const float *ai = a + i * lda;
        for (int k = 0; k + 32 <= n; k += 32)
            for (int l = 0; l < 16; l++) {
                int8_t b = q[k / 2 + l];
                part[l] += ai[k + l] * (float)(int8_t)((int8_t)(b << 4) >> 4) + ai[k + 16 + l] * (float)(int8_t)(b >> 4);
            }
        for (int l = 0; l < 16; l++) t += part[l];
        out[i] = t;
    }
}

KT_AI void nn_row(const kt_qmat *W, long row, float s, float ak, int col0, int j0, int j1, float *c) {
    const int8_t *q = W->q + row * (W->cols / 2) + col0 / 2;
    float as = ak * s;
    for (int j = j0; j < j1; j += 2) {
        c[j] += as * (float)(int8_t)((int8_t)(q[j / 2] << 4) >> 4);
        c[j + 1] += as * (float)(int8_t)(q[j / 2] >> 4);
    }
}
#endif

KT_WO_KERNELS(kernels, 4, 1) /* from expand_seg, qdot and nn_row above */
/* the same kernels for int4bs (fmt_int4bs.c): the codes decode alike, the loops read either scale dtype */
const kt_wo_kernels KT_FN(kt_wo_int4) = {kernels_expand, kernels_nt, kernels_nn};

const kt_fmt_ops KT_FN(kt_fmt_int4) = {
    .name = "int4", .wformat = KT_W_INT4, .act_int8 = 0,
    .code_bits = 4, .qmax = 7.f, .per_row_scale = 0,
    .alloc = kt_qmat_alloc, .pack_rows = kt_qmat_pack_rows, .weight_bytes = kt_qmat_weight_bytes,
    .base_nt = wo_base_nt, .base_nn = wo_base_nn, .wo = &kernels, .small_m = QSMALL,
};
