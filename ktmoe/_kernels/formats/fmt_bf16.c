/* fmt_bf16.c: the bf16 row (design.md 5): the weights as given (fp32 rounded to bf16 once, at
 * load), products straight on the bf16 GEMMs of gemm.h.
 *
 * Storage: w_gate_up [E, 2I, H] (chunk-interleaved rows, moe_internal.h) and w_down [E, H, I]
 * plain; on the amx path instead each expert's matrix in the AMX tile layout of gemm.h
 * (kt_prepack_amx, read in place by the forward and turned into the backward's tiles in
 * registers), made from a plain staging copy of one expert (L->stage). Opt-in (transposed):
 * copies [E, H, 2I] and [E, I, H] that the backward streams like the forward streams W. */
#include "layer/pass.h"
#include <stdlib.h>
#include <string.h>

#if defined(__AMX_BF16__)
enum { TILE_LAYOUT = 1 };
#else
enum { TILE_LAYOUT = 0 };
#endif

static int alloc(kt_layer *L, int transposed, int group_size) {
    int E = L->E, H = L->H, I = L->I, ok;
    size_t per = (size_t)I * H;
    (void)group_size;
    if (TILE_LAYOUT) {
        L->prepacked = 1;
        L->pre_gu = kt_prepacked_elems(2 * I, H);
        L->pre_dn = kt_prepacked_elems(H, I);
        L->w_gate_up = kt_weight_alloc(L, sizeof(kt_bf16) * L->pre_gu * E);
        L->w_down = kt_weight_alloc(L, sizeof(kt_bf16) * L->pre_dn * E);
    } else {
        L->w_gate_up = kt_weight_alloc(L, sizeof(kt_bf16) * 2 * per * E);
        L->w_down = kt_weight_alloc(L, sizeof(kt_bf16) * per * E);
    }
    ok = L->w_gate_up && L->w_down;
    if (ok && transposed) {
        L->wt_gate_up = kt_weight_alloc(L, sizeof(kt_bf16) * 2 * per * E);
        L->wt_down = kt_weight_alloc(L, sizeof(kt_bf16) * per * E);
        ok = L->wt_gate_up && L->wt_down;
    }
    return ok ? 0 : KT_ERR_NOMEM;
}

/* bf16 rows of expert e: into the layer's plain copies, or (prepacked) into the expert's
 * plain staging copy L->stage, made into the tile layout once the expert is complete */
static int pack_rows(kt_layer *L, int e, int dst_row0, int n, const void *src, long ld, int dtype) {
    (void)ld; /* rows are contiguous: ld == cols */
    size_t per = (size_t)L->H * L->I;
    kt_bf16 *gu = L->prepacked ? L->stage : L->w_gate_up + 2 * per * e;
    kt_bf16 *dn = L->prepacked ? L->stage + 2 * per : L->w_down + per * e;
    kt_bf16 *dst = dst_row0 < 0 ? dn : gu + (size_t)dst_row0 * L->H;
    size_t count = (size_t)n * (dst_row0 < 0 ? L->I : L->H);
    if (dtype == KT_BF16) {
        memcpy(dst, src, count * sizeof(kt_bf16));
        return 0;
    }
    const float *s = src;
    for (size_t i = 0; i < count; i++) dst[i] = kt_f32_to_bf16(s[i]);
    return 0;
}

/* dst [cols, rows] = src [rows, cols] transposed, in cache-sized blocks */
static void transpose_bf16(kt_bf16 *dst, const kt_bf16 *src, long rows, long cols) {
    enum { B = 32 };
    for (long r0 = 0; r0 < rows; r0 += B)
        for (long c0 = 0; c0 < cols; c0 += B)
            for (long r = r0; r < r0 + B && r < rows; r++)
                for (long c = c0; c < c0 + B && c < cols; c++) dst[c * rows + r] = src[r * cols + c];
}

/* the expert's plain bf16 copy is complete: the transposed copy, the tile layout */
static void pack_done(kt_layer *L, int e) {
    size_t per = (size_t)L->H * L->I;
    int H = L->H, I = L->I;
    const kt_bf16 *gu = L->prepacked ? L->stage : L->w_gate_up + 2 * per * e;
    const kt_bf16 *dn = L->prepacked ? L->stage + 2 * per : L->w_down + per * e;
    if (L->wt_gate_up) {
        transpose_bf16(L->wt_gate_up + 2 * per * e, gu, 2 * (long)I, H);
        transpose_bf16(L->wt_down + per * e, dn, H, I);
    }
#if defined(__AMX_BF16__)
    if (L->prepacked) {
        kt_prepack_amx(gu, H, 2 * I, H, L->w_gate_up + L->pre_gu * e);
        kt_prepack_amx(dn, I, H, I, L->w_down + L->pre_dn * e);
    }
#endif
}

static size_t weight_bytes(const kt_layer *L) {
    size_t plain = sizeof(kt_bf16) * 3 * (size_t)L->E * L->I * L->H;
    size_t packed = L->prepacked ? sizeof(kt_bf16) * (L->pre_gu + L->pre_dn) * L->E : plain;
    return packed + (L->wt_down ? plain : 0);
}

static void base_nt(const kt_pass *c, int which, int e, int m, int row0, int n, const kt_bf16 *A, long lda, long p0,
                    float *C, long ldc) {
    const kt_layer *L = c->L;
    int H = L->H, I = L->I, K = which ? I : H;
    (void)p0;
#if defined(__AMX_BF16__)
    if (L->prepacked) { /* the tile layout, read in place (row0 is a multiple of 32: chunk starts) */
        const kt_bf16 *Wp = which ? L->w_down + L->pre_dn * e : L->w_gate_up + L->pre_gu * e;
        if (kt_gemm_nt_pre_amx(m, n, A, lda, Wp, which ? H : 2 * I, K, row0, C, ldc)) c->L->oom = 1;
        return;
    }
#endif
    const kt_bf16 *W = which ? L->w_down + (long)e * H * I : L->w_gate_up + (long)e * 2 * I * H;
    GEMM_NT(m, n, K, A, lda, W + (long)row0 * K, K, C, ldc, 0);
}

static void base_nn(const kt_pass *c, int which, int e, int m, int col0, int n, const kt_bf16 *A, long lda, long p0,
                    float *C, long ldc) {
    const kt_layer *L = c->L;
    int H = L->H, I = L->I, K = which ? H : 2 * I, cols = which ? I : H;
    const kt_bf16 *WT = which ? L->wt_down : L->wt_gate_up;
    (void)p0;
    if (WT) /* A W as A (W^T)^T: the transposed copy streams like the forward */
        GEMM_NT(m, n, K, A, lda, WT + (long)e * K * cols + (long)col0 * K, K, C, ldc, 0);
#if defined(__AMX_BF16__)
    else if (L->prepacked) { /* tiles made from the tile layout (col0 is a multiple of 32) */
        const kt_bf16 *Wp = which ? L->w_down + L->pre_dn * e : L->w_gate_up + L->pre_gu * e;
        if (kt_gemm_nn_pre_amx(m, n, A, lda, Wp, K, cols, col0, C, ldc)) c->L->oom = 1;
    }
#endif
    else
        GEMM_NN(m, n, K, A, lda, (which ? L->w_down : L->w_gate_up) + (long)e * K * cols + col0, cols, C, ldc, 0);
}

const kt_fmt_ops KT_FN(kt_fmt_bf16) = {
    .name = "bf16", .wformat = KT_W_BF16, .act_int8 = 0,
    .alloc = alloc, .pack_rows = pack_rows, .pack_done = pack_done, .weight_bytes = weight_bytes,
    .base_nt = base_nt, .base_nn = base_nn, .small_m = KT_SMALL_M,
};
