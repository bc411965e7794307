/* quantize.c: INT8 / INT4 expert weights, quantized once when a layer is created
 * (SPEC.md 5), and the export of the quantized values for tests and inspection.
 *
 * The rules match reference/quant.py bit for bit (all arithmetic in fp32):
 *   INT8: per row, scale = amax / 127, q = round-half-even(w / scale) clipped to +-127;
 *   INT4: per row and group of `group` columns, scale = amax / 7, q clipped to +-7
 *         (symmetric: -8 is never used);
 *   an all-zero row / group gets scale 0 and q 0.
 * Rounding uses the 1.5 * 2^23 trick (exact round-half-even for |v| < 2^22; here |v| <= 127
 * plus one rounding), so it needs no libm and vectorises. Division is a true fp32 division,
 * the same operation numpy's float32 divide performs.
 */
#include "moe_internal.h"
#include <stdlib.h>

static inline float round_even(float v) {
    const float shift = 12582912.f; /* 1.5 * 2^23 */
    return (v + shift) - shift;
}

/* one group: values v[0:n] -> q[0:n] in [-qmax, qmax], returns the scale */
static float quantize_group(const float *v, int n, float qmax, int8_t *q) {
    float amax = 0.f;
    for (int j = 0; j < n; j++) {
        float a = v[j] < 0 ? -v[j] : v[j];
        amax = a > amax ? a : amax;
    }
    float scale = amax / qmax;
    if (scale == 0.f) {
        memset(q, 0, (size_t)n);
        return 0.f;
    }
    for (int j = 0; j < n; j++) {
        float r = round_even(v[j] / scale);
        r = r > qmax ? qmax : r;
        r = r < -qmax ? -qmax : r;
        q[j] = (int8_t)r;
    }
    return scale;
}

int kt_quantize_rows(kt_qmat *W, int e, int dst_row0, int n, const void *src, long ld, int dtype) {
    int cols = W->cols, int4 = W->fmt == KT_W_INT4;
    float qmax = int4 ? 7.f : 127.f;
    float *v = malloc(sizeof(float) * (size_t)cols);
    int8_t *q = malloc((size_t)cols);
    int bad = 0;
    if (!v || !q) { free(v); free(q); return -2; }
    for (int i = 0; i < n; i++) {
        long row = (long)e * W->rows + dst_row0 + i;
        if (dtype == KT_BF16) {
            const kt_bf16 *s = (const kt_bf16 *)src + i * ld;
            for (int j = 0; j < cols; j++) v[j] = kt_bf16_to_f32(s[j]);
        } else {
            memcpy(v, (const float *)src + i * ld, sizeof(float) * (size_t)cols);
        }
        for (int j = 0; j < cols; j++) bad |= !(v[j] - v[j] == 0.f); /* NaN or Inf */
        for (int g = 0; g < W->ngroups; g++)
            W->scale[row * W->ngroups + g] = quantize_group(v + (long)g * W->group, W->group, qmax, q + (long)g * W->group);
        if (int4) {
            uint8_t *dst = (uint8_t *)W->q + row * (cols / 2);
            for (int j = 0; j < cols / 2; j++) dst[j] = (uint8_t)((q[2 * j] & 0xf) | ((unsigned)q[2 * j + 1] << 4));
        } else {
            memcpy(W->q + row * cols, q, (size_t)cols);
        }
    }
    free(v);
    free(q);
    return bad;
}

/* value (e, row, col) of W as an int8 */
static inline int8_t q_at(const kt_qmat *W, int e, long row, int col) {
    long r = (long)e * W->rows + row;
    if (W->fmt == KT_W_INT8) return W->q[r * W->cols + col];
    int8_t b = W->q[r * (W->cols / 2) + col / 2];
    return (int8_t)(col & 1 ? b >> 4 : (int8_t)(b << 4) >> 4);
}

int kt_layer_export_quantized(const kt_layer *L, int proj, int8_t *q, float *scale) {
    if (L->wformat == KT_W_BF16) return -1;
    const kt_qmat *W = proj == KT_DOWN ? &L->q_down : &L->q_gate_up;
    int rows = proj == KT_DOWN ? L->H : L->I, cols = W->cols, ng = W->ngroups;
    for (int e = 0; e < L->E; e++)
        for (int i = 0; i < rows; i++) {
            long src = i; /* gate / up rows sit chunk-interleaved in the packed matrix */
            if (proj != KT_DOWN) {
                int c = i / KT_CHUNK_I, n = kt_chunk_n(c, KT_CHUNK_I, L->I);
                src = 2L * c * KT_CHUNK_I + (proj == KT_UP ? n : 0) + i % KT_CHUNK_I;
            }
            long dst = (long)e * rows + i;
            for (int j = 0; j < cols; j++) q[dst * cols + j] = q_at(W, e, src, j);
            memcpy(scale + dst * ng, W->scale + ((long)e * W->rows + src) * ng, sizeof(float) * (size_t)ng);
        }
    return 0;
}
