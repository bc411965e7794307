/* quantize.c: the storage every quantized format row shares (kt_qmat, fmt.h: int8, int4, fp8
 * and the W8A8 rows): the arrays of codes and scales sized by the row's code_bits and scale
 * rule, expert weights quantized once when a layer is created (design.md 5; the row's qmax),
 * pre-quantized INT8 / INT4 / INT4BS / FP8 codes and scales taken as they are
 * (kt_layer_create_quantized), and the export of the stored values for tests and inspection.
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
#include "moe_internal.h"
#include "vec.h"
#include <stdlib.h>

/* bytes of one stored row of `cols` codes */
static long row_bytes(const kt_qmat *W) { return (long)W->cols * W->bits / 8; }

static int qmat_init(kt_layer *L, kt_qmat *W, int E, int rows, int cols, int group) {
    W->bits = L->fmt->code_bits;
    W->qmax = L->fmt->qmax;
    W->rows = rows;
    W->cols = cols;
    W->group = L->fmt->per_row_scale ? cols : group; /* int4 groups, fp8 column blocks */
    W->ngroups = cols / W->group;
    W->q = kt_weight_alloc(L, (size_t)E * rows * row_bytes(W));
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
    return (size_t)E * W->rows * (row_bytes(W) + scale_bytes * W->ngroups);
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

/* value (e, row, col) of W as an int8 */
static inline int8_t q_at(const kt_qmat *W, int e, long row, int col) {
    long r = (long)e * W->rows + row;
    if (W->bits == 8) return W->q[r * W->cols + col]; /* int8 value or fp8 code */
    int8_t b = W->q[r * (W->cols / 2) + col / 2];
    return (int8_t)(col & 1 ? b >> 4 : (int8_t)(b << 4) >> 4);
}

int kt_layer_export_quantized(const kt_layer *L, int proj, int8_t *q, float *scale) {
    if (!L->fmt->code_bits) return -1; /* bf16 */
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
            for (int g = 0; g < ng; g++) scale[dst * ng + g] = kt_qscale(W, ((long)e * W->rows + src) * ng + g);
        }
    return 0;
}

/* ---- pre-quantized weights (ktmoe.h: kt_layer_create_quantized) ---- */

static float scale_at(const void *s, int dtype, long i) {
    return dtype == KT_BF16 ? kt_bf16_to_f32(((const kt_bf16 *)s)[i]) : ((const float *)s)[i];
}

/* Rows r0 .. r0 + n of expert e of one source matrix into rows dst0 .. of W: the code bytes
 * as they are (XORed with code_xor), the scale of each row's block (bf16 storage: the bf16
 * scales' bits as they are; the caller gives bf16 scales for it, an fp32 one would be rounded). */
static void copy_rows(kt_qmat *W, int e, int dst0, const kt_qsource *src, int r0, int n, int scale_dtype,
                      int block_rows, int code_xor) {
    long rb = row_bytes(W), ng = W->ngroups;
    const uint8_t *codes = (const uint8_t *)src->codes + (size_t)e * src->codes_stride;
    long s0 = (long)e * src->scales_stride;
    for (int i = 0; i < n; i++) {
        long r = r0 + i, drow = (long)e * W->rows + dst0 + i;
        uint8_t *d = (uint8_t *)W->q + drow * rb;
        const uint8_t *c = codes + r * rb;
        if (code_xor)
            for (long j = 0; j < rb; j++) d[j] = (uint8_t)(c[j] ^ code_xor);
        else
            memcpy(d, c, (size_t)rb);
        long s = s0 + (r / block_rows) * ng;
        if (W->scale_bf16 && scale_dtype == KT_BF16)
            memcpy(W->scale_bf16 + drow * ng, (const kt_bf16 *)src->scales + s, sizeof(kt_bf16) * (size_t)ng);
        else if (W->scale_bf16)
            for (long g = 0; g < ng; g++) W->scale_bf16[drow * ng + g] = kt_f32_to_bf16(scale_at(src->scales, scale_dtype, s + g));
        else
            for (long g = 0; g < ng; g++) W->scale[drow * ng + g] = scale_at(src->scales, scale_dtype, s + g);
    }
}

kt_layer *kt_layer_create_quantized(int E, int H, int I, int isa, int num_threads, int wformat,
                                    const kt_qsource *gate, const kt_qsource *up, const kt_qsource *down,
                                    int scale_dtype, int block_rows, int group, int code_xor, int act_int8,
                                    int *status) {
    kt_layer *L = kt_layer_new_quantized(E, H, I, isa, num_threads, wformat, group, act_int8, status);
    if (!L) return NULL;
    for (int e = 0; e < E; e++) {
        for (int c = 0; c * KT_CHUNK_I < I; c++) { /* gate/up rows chunk-interleaved (moe_internal.h) */
            int i0 = c * KT_CHUNK_I, n = kt_chunk_n(c, KT_CHUNK_I, I);
            copy_rows(&L->q_gate_up, e, 2 * i0, gate, i0, n, scale_dtype, block_rows, code_xor);
            copy_rows(&L->q_gate_up, e, 2 * i0 + n, up, i0, n, scale_dtype, block_rows, code_xor);
        }
        copy_rows(&L->q_down, e, 0, down, 0, H, scale_dtype, block_rows, code_xor);
    }
    *status = KT_OK;
    return L;
}

long kt_find_byte(const void *p, long n, int mask, int value) {
    const uint8_t *b = p;
    uint8_t m = (uint8_t)mask, v = (uint8_t)value;
    for (long i0 = 0; i0 < n; i0 += 256) { /* a branch-free test per block (vectorises), then the position */
        long i1 = i0 + 256 < n ? i0 + 256 : n;
        int hit = 0;
        for (long i = i0; i < i1; i++) hit |= (uint8_t)(b[i] & m) == v;
        if (!hit) continue;
        for (long i = i0; i < i1; i++)
            if ((uint8_t)(b[i] & m) == v) return i;
    }
    return -1;
}

long kt_find_bad_scale(const void *p, int dtype, long n) {
    for (long i = 0; i < n; i++) {
        float v = scale_at(p, dtype, i);
        if (!(v >= 0.f && v - v == 0.f)) return i; /* NaN, Inf or negative */
    }
    return -1;
}
