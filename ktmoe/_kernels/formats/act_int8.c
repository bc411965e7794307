/* act_int8.c: int8 activations for the W8A8 rows (fmt_w8a8.c, fmt_w4a8.c; design.md 5):
 * rows of a base product's A quantized to int8 with one scale per row (amax / 127), either
 * by the task that multiplies them or once per call into the pass's cache (pass.h: c->aq),
 * optionally folded first with the weights' per-row scales (the nn products of the backward,
 * where those scales multiply A's columns). */
#include "layer/pass.h"
#include <string.h>

/* Rows of A [m, K] (bf16, times fold[k * fstride] when fold is given) -> int8 aq [m, K] and
 * per-row scales sa (amax / 127; 0 for an all-zero row). NaN / Inf give a NaN / Inf scale,
 * so they propagate into the products. */
void quantize_act(int m, int K, const kt_bf16 *A, long lda, const float *fold, long fstride,
                         int8_t *aq, long ldq, float *sa) {
    float *v = kt_scratch(KT_SCR_ACT_F32, sizeof(float) * (size_t)(K + 16));
    for (int i = 0; i < m; i++) {
        const kt_bf16 *a = A + i * lda;
        /* one pass: the values (times the fold), their amax and a finiteness check (v * 0 is
         * NaN for NaN and Inf), in 16 lanes so that it vectorises */
        float lane[16] = {0}, chk[16] = {0}, amax = 0.f, bad = 0.f;
        int k = 0;
        for (; k + 16 <= K; k += 16)
            for (int l = 0; l < 16; l++) {
                float x = kt_bf16_to_f32(a[k + l]) * (fold ? fold[(k + l) * fstride] : 1.f);
                v[k + l] = x;
                float ax = x < 0 ? -x : x;
                lane[l] = ax > lane[l] ? ax : lane[l];
                chk[l] += x * 0.f;
            }
        for (; k < K; k++) {
            float x = kt_bf16_to_f32(a[k]) * (fold ? fold[k * fstride] : 1.f);
            v[k] = x;
            float ax = x < 0 ? -x : x;
            amax = ax > amax ? ax : amax;
            bad += x * 0.f;
        }
        for (int l = 0; l < 16; l++) {
            amax = lane[l] > amax ? lane[l] : amax;
            bad += chk[l];
        }
        float s = bad == 0.f ? amax / 127.f : bad; /* NaN / Inf in the row: a NaN scale */
        sa[i] = s;
        int8_t *q = aq + (long)i * ldq;
        if (!(s > 0.f)) { /* zero row, or NaN: the scale carries it */
            memset(q, 0, (size_t)K);
            continue;
        }
        /* times 1 / s rather than a division per value (4x fewer cycles): a code may differ
         * by one from reference/quant.py's v / s where that lands within an ulp of a half */
        float inv = 1.f / s;
        for (k = 0; k < K; k++) {
            float r = round_even(v[k] * inv);
            r = r > 127.f ? 127.f : r;
            r = r < -127.f ? -127.f : r;
            q[k] = (int8_t)r;
        }
    }
}

/* W8A8: A's m rows as int8 codes and scales, from the call's cache (c->aq, rows quantized
 * once for every column chunk) or quantized here (times fold[k * fstride] when given).
 * Returns the codes' row stride. */
long act_rows(const kt_pass *c, int m, int K, const kt_bf16 *A, long lda, long p0, const float *fold,
                     long fstride, const int8_t **aq, const float **sa) {
    if (c->aq) {
        *aq = c->aq + p0 * c->ldq;
        *sa = c->sa + p0;
        return c->ldq;
    }
    int8_t *t = kt_scratch(KT_SCR_ACT_Q, (size_t)(m ? m : 1) * K);
    float *ts = kt_scratch(KT_SCR_ACT_SCALE, sizeof(float) * (size_t)(m ? m : 1));
    quantize_act(m, K, A, lda, fold, fstride, t, K, ts);
    *aq = t;
    *sa = ts;
    return K;
}

/* W8A8: c->aq / c->sa rows p0 .. p0 + m of expert e = A's rows quantized (times the W row
 * scales of `which` when fold). Used where every column chunk would repeat the same work. */
void act_cache_rows(kt_pass *c, int which, int e, int m, long p0, const kt_bf16 *A, long lda, int K, int fold) {
    const kt_qmat *W = qmat(c->L, which);
    quantize_act(m, K, A, lda, fold ? W->scale + (long)e * W->rows * W->ngroups : NULL, W->ngroups,
                 c->aq + p0 * c->ldq, c->ldq, c->sa + p0);
}
