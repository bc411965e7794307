/* qmat.c: the storage every quantized format row shares (kt_qmat, fmt.h: int8, int4, fp8
 * and the W8A8 rows): the arrays of codes and scales sized by the row's code_bits and scale
 * rule, and expert weights quantized into them once when a layer is created (design.md 5; the
 * row's qmax). Pre-quantized codes and the export of the stored values: layer/quantized.c.
 *
 * The rules match reference/quant.py bit for bit (all arithmetic in fp32):
 *   INT8: per row, scale = amax / 127, q = round-half-even(w / scale) clipped to +-127;
 *   INT4: per row and group of `group` columns, scale = amax / 7, q clipped to +-7
 *         (symmetric: -8 is never used);
 *   INT4BS (bf16 scales): as INT4 with the scale rounded to bf16 (nearest even) first, and
 *         q = round-half-even(w / that scale) clipped to +-7;
 *   an all-zero row / group gets scale 0 and q 0.
 * Rounding uses the 1.5 * 2^23 trick (exact round-half-even for |v| < 2^22; here |v| <= 127
 * plus one rounding), so it needs no libm and vectorises. Division is a true fp32 division,
 * the same operation numpy's float32 divide performs.
 */
#include "layer/moe_internal.h"
#include "layer/vec.h"
#include <stdlib.h>

static int qmat_init(kt_layer *L, kt_qmat *W, int E, int rows, int cols, int group) {
    W->bits = L->fmt->code_bits;
    W->qmax = L->fmt->qmax;
    W->rows = rows;
    W->cols = cols;
    W->group = L->fmt->per_row_scale ? cols : group; /* int4 groups, fp8 column blocks */
    W->ngroups = cols / W->group;
    W->q = kt_weight_alloc(L, (size_t)E * rows * kt_qmat_row_bytes(W));
    size_t nscales = (size_t)E * rows * W->ngroups;
    W->scale = NULL;
    W->scale_bf16 = NULL;
    if (L->fmt->scale_bf16)
        W->scale_bf16 = kt_weight_alloc(L, sizeof(kt_bf16) * nscales);
    else
        W->scale = kt_weight_alloc(L, sizeof(float) * nscales);
    return W->q && (W->scale || W->scale_bf16) ? 0 : KT_ERR_NOMEM;
}

int kt_qmat_alloc(kt_layer *L, int transposed, int group_size) {
    (void)transposed; /* bf16 only (refused by the caller for quantized formats) */
    int a = qmat_init(L, &L->q_gate_up, L->E, 2 * L->I, L->H, group_size);
    int b = qmat_init(L, &L->q_down, L->E, L->H, L->I, group_size);
    return a || b ? KT_ERR_NOMEM : 0;
}

static size_t qmat_bytes(const kt_qmat *W, int E) {
    size_t scale_bytes = W->scale_bf16 ? sizeof(kt_bf16) : sizeof(float);
    return (size_t)E * W->rows * (kt_qmat_row_bytes(W) + scale_bytes * W->ngroups);
}

size_t kt_qmat_weight_bytes(const kt_layer *L) { return qmat_bytes(&L->q_gate_up, L->E) + qmat_bytes(&L->q_down, L->E); }

static int quantize_rows(kt_qmat *W, int e, int dst_row0, int n, const void *src, long ld, int dtype);

int kt_qmat_pack_rows(kt_layer *L, int e, int dst_row0, int n, const void *src, long ld, int dtype) {
    if (dst_row0 < 0) return quantize_rows(&L->q_down, e, 0, n, src, ld, dtype);
    return quantize_rows(&L->q_gate_up, e, dst_row0, n, src, ld, dtype);
}

/* one group: values v[0:n] -> q[0:n] in [-qmax, qmax], returns the scale (bf16: rounded to
 * bf16 before the codes are made, so that it is exactly representable) */
static float quantize_group(const float *v, int n, float qmax, int bf16, int8_t *q) {
    float amax = 0.f;
    for (int j = 0; j < n; j++) {
        float a = v[j] < 0 ? -v[j] : v[j];
        amax = a > amax ? a : amax;
    }
    float scale = amax / qmax;
    if (bf16) scale = kt_bf16_to_f32(kt_f32_to_bf16(scale));
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

/* Quantizes n rows of `cols` values (src rows `ld` elements apart, dtype KT_F32/KT_BF16)
 * into rows dst_row0.. of expert e of W. Returns 0, 1 if a value is NaN or Inf, KT_ERR_NOMEM. */
static int quantize_rows(kt_qmat *W, int e, int dst_row0, int n, const void *src, long ld, int dtype) {
    int cols = W->cols, int4 = W->bits == 4;
    float qmax = W->qmax;
    float *v = malloc(sizeof(float) * (size_t)cols);
    int8_t *q = malloc((size_t)cols);
    int bad = 0;
    if (!v || !q) { free(v); free(q); return KT_ERR_NOMEM; }
    for (int i = 0; i < n; i++) {
        long row = (long)e * W->rows + dst_row0 + i;
        if (dtype == KT_BF16) {
            const kt_bf16 *s = (const kt_bf16 *)src + i * ld;
            for (int j = 0; j < cols; j++) v[j] = kt_bf16_to_f32(s[j]);
        } else {
            memcpy(v, (const float *)src + i * ld, sizeof(float) * (size_t)cols);
        }
        for (int j = 0; j < cols; j++) bad |= !(v[j] - v[j] == 0.f); /* NaN or Inf */
        for (int g = 0; g < W->ngroups; g++) {
            long at = row * W->ngroups + g;
            float s = quantize_group(v + (long)g * W->group, W->group, qmax, W->scale_bf16 != NULL, q + (long)g * W->group);
            if (W->scale_bf16)
                W->scale_bf16[at] = kt_f32_to_bf16(s); /* exact: s is a bf16 value */
            else
                W->scale[at] = s;
        }
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

