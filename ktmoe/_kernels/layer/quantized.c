/* quantized.c: layers made from pre-quantized codes (kt_layer_create_quantized: INT8 / INT4 /
 * INT4BS / FP8 codes and scales taken as they are, design.md 5) and the export of a layer's stored
 * codes and scales (kt_layer_export_quantized), with the checks _core.pyx runs on given codes and
 * scales first (kt_find_byte, kt_find_bad_scale). The storage itself is formats/qmat.c's. */
#include "moe_internal.h"
#include <stdlib.h>
#include <string.h>

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
    long rb = kt_qmat_row_bytes(W), ng = W->ngroups;
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
