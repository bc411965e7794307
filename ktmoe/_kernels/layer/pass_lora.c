/* pass_lora.c: LoRA in the passes (design.md 2-4): the split-bf16 machinery, moving the
 * caller's factors in and the gradients out, and the LoRA gradient tasks of the backward.
 *
 * LoRA runs through the same bf16 GEMMs as the base weights, at near-fp32 precision:
 * every fp32 LoRA quantity v (the factors, copied once per call for the experts that got
 * tokens, and the rank-r products like s X A^T) is split into two bf16 numbers
 * v = hi + lo. A factor block is stored as rows [hi; hi; lo] and a product row as
 * [hi, lo, hi], so one GEMM with K = 3r computes P_hi F_hi + P_lo F_hi + P_hi F_lo, and
 * a product X F^T is one GEMM against the [hi; lo] rows (N = 2r) summed pairwise. The
 * gradients are GEMMs too (contraction over the expert's tokens), accumulated in fp32
 * buffers and added to the caller's gradients at the end. No W + BA is ever formed.
 */
#include "pass.h"
#include <string.h>

/* dst[i * dst_step] = v[start + i * step] as fp32, for i < n. */
static void load_row(float *dst, long dst_step, const kt_view3 *v, long start, long step, int n) {
    if (v->dtype == KT_BF16) {
        const kt_bf16 *p = (const kt_bf16 *)v->data + start;
        for (int i = 0; i < n; i++) dst[i * dst_step] = kt_bf16_to_f32(p[i * step]);
    } else {
        const float *p = (const float *)v->data + start;
        for (int i = 0; i < n; i++) dst[i * dst_step] = p[i * step];
    }
}

/* v[start + i * step] += src[i * src_step] in v's dtype, for i < n. */
static void add_row(const kt_view3 *v, long start, long step, const float *src, long src_step, int n) {
    if (v->dtype == KT_BF16) {
        kt_bf16 *p = (kt_bf16 *)v->data + start;
        for (int i = 0; i < n; i++)
            p[i * step] = kt_f32_to_bf16(kt_bf16_to_f32(p[i * step]) + src[i * src_step]);
    } else {
        float *p = (float *)v->data + start;
        for (int i = 0; i < n; i++) p[i * step] += src[i * src_step];
    }
}

int same_view(const kt_view3 *a, const kt_view3 *b) {
    return a->data == b->data && a->dtype == b->dtype && a->stride[0] == b->stride[0] && a->stride[1] == b->stride[1]
           && a->stride[2] == b->stride[2];
}

/* ---- split-bf16 LoRA quantities (see the note at the top) ---- */

/* A product row of rank r: dst = [hi, lo, hi] of scale * (a[j] + b[j]). */
void split_row(kt_bf16 *dst, const float *a, const float *b, int r, float scale) {
    for (int j = 0; j < r; j++) {
        split(scale * (a[j] + b[j]), &dst[j], &dst[r + j]);
        dst[2 * r + j] = dst[j];
    }
}

/* Product rows [m, 3r] (leading dimension ld) -> [2r, m]: hi rows then lo rows of the
 * transpose, each source row i scaled by w[i] first (w may be NULL). */
static kt_bf16 *transpose_split(const kt_bf16 *src, long ld, int m, int r, const float *w) {
    kt_bf16 *t = kt_scratch(KT_SCR_SPLIT_T, sizeof(kt_bf16) * 2 * (size_t)(m ? m : 1) * r);
    for (int i = 0; i < m; i++)
        for (int j = 0; j < r; j++)
            split((w ? w[i] : 1.f) * unsplit(src + i * ld, r, j), &t[(long)j * m + i], &t[(long)(r + j) * m + i]);
    return t;
}

/* grad[j, 0:n] (leading dimension ldg) += hi half + lo half of tmp [2r, n]. */
static void fold(float *grad, long ldg, const float *tmp, int r, int n) {
    for (int j = 0; j < r; j++) {
        float *g = grad + j * ldg;
        const float *a = tmp + (long)j * n, *b = tmp + (long)(r + j) * n;
        for (int i = 0; i < n; i++) g[i] += a[i] + b[i];
    }
}

/* grad [r, n] (ldg) += At ([2r, m] split transpose) x G [m, n] (leading dimension ldgm). */
static void grad_gemm(const kt_pass *c, int thread, int r, int n, int m, const kt_bf16 *At, const kt_bf16 *G, long ldgm,
                      float *grad, long ldg) {
    float *tmp = kt_scratch(KT_SCR_GRAD_OUT, sizeof(float) * 2 * (size_t)r * (n ? n : 1));
    PROF_GEMM(c, thread, lora, 4.0 * r * n * m, GEMM_NN(2 * r, n, m, At, m, G, ldgm, tmp, n, 0));
    fold(grad, ldg, tmp, r, n);
}

/* Product rows out[i] = split(s * sum_k X[i, k] F[j, k]) for m rows, F a factor block
 * [3r, K] ([hi; hi; lo]); out has leading dimension ldo. */
void lora_product(const kt_pass *c, int thread, int m, int r, int K, const kt_bf16 *X, long ldx, const kt_bf16 *F,
                         float s, kt_bf16 *out, long ldo) {
    float *tmp = kt_scratch(KT_SCR_LORA_OUT, sizeof(float) * (size_t)(m ? m : 1) * 2 * r);
    PROF_GEMM(c, thread, lora, 4.0 * m * r * K, GEMM_NT(m, 2 * r, K, X, ldx, F + (long)r * K, K, tmp, 2 * r, 0));
    for (int i = 0; i < m; i++) split_row(out + i * ldo, tmp + (long)i * 2 * r, tmp + (long)i * 2 * r + r, r, s);
}

/* ---- moving LoRA factors in and gradients out ----
 * The caller's factors are copied (split) into the layer's [3r, n] blocks, and the fp32
 * gradients added back, in tasks that each touch a cache-friendly part of the caller's
 * tensors: A (rows contiguous in both layouts) one task per expert; B, whose PEFT
 * layout interleaves the experts along its columns, one task per block of BLOCK_O output
 * rows across all experts of the call. An expert's A task handles every projection in
 * turn, so PEFT's A shared by gate and up is never written by two threads. */
enum { BLOCK_O = 32 };

/* Number of B tasks, and the decoding of task t >= nhit into (projection, first row). */
long lora_b_tasks(const kt_layer *L) {
    long n = 0;
    for (int p = 0; p < 3; p++)
        if (L->lora[p].r) n += (L->lora[p].out + BLOCK_O - 1) / BLOCK_O;
    return n;
}

static int b_task(const kt_layer *L, long t, int *o0) {
    *o0 = 0;
    for (int p = 0; p < 3; p++) {
        if (!L->lora[p].r) continue;
        long nb = (L->lora[p].out + BLOCK_O - 1) / BLOCK_O;
        if (t < nb) { *o0 = (int)t * BLOCK_O; return p; }
        t -= nb;
    }
    return -1;
}

/* rows [hi; hi; lo] (each n long, `stride` apart) of the fp32 values v[0:n] */
static void split_into(kt_bf16 *hi, long stride, const float *v, int n) {
    kt_bf16 *hi2 = hi + stride, *lo = hi + 2 * stride;
    for (int i = 0; i < n; i++) {
        kt_bf16 h = kt_f32_to_bf16(v[i]);
        hi[i] = hi2[i] = h;
        lo[i] = kt_f32_to_bf16(v[i] - kt_bf16_to_f32(h));
    }
}

void task_copy_lora(void *ctx, long task, int thread) {
    (void)thread;
    kt_layer *L = ((kt_pass *)ctx)->L;
    long nhit = L->rt.nhit;
    if (task < nhit) {
        int e = L->rt.hit[task];
        float *row = kt_scratch(KT_SCR_FACTOR, sizeof(float) * (size_t)(L->H > L->I ? L->H : L->I));
        for (int p = 0; p < 3; p++) {
            const kt_lora_bf16 *d = &L->lora[p];
            const kt_view3 *A = &L->lora_in.proj[p].A;
            int r = p == KT_UP && L->shared_a ? 0 : d->r, n = d->in; /* a shared A is copied once, as gate's */
            for (int j = 0; j < r; j++) {
                load_row(row, 1, A, e * A->stride[0] + j * A->stride[1], A->stride[2], n);
                split_into(d->A + ((long)e * 3 * r + j) * n, (long)r * n, row, n);
            }
        }
        return;
    }
    int o0, p = b_task(L, task - nhit, &o0);
    const kt_lora_bf16 *d = &L->lora[p];
    const kt_view3 *B = &L->lora_in.proj[p].B;
    int r = d->r, out = d->out, nb = o0 + BLOCK_O < out ? BLOCK_O : out - o0;
    /* gather the block as [expert][j][o] rows, then split each row */
    float *blk = kt_scratch(KT_SCR_FACTOR, sizeof(float) * (size_t)nhit * r * BLOCK_O);
    for (long h = 0; h < nhit; h++) { /* one expert's [nb, r] block at a time: its rows stay in L1 */
        float *bh = blk + h * r * BLOCK_O;
        long base = L->rt.hit[h] * B->stride[0] + o0 * B->stride[1];
        for (int o = 0; o < nb; o++) load_row(bh + o, BLOCK_O, B, base + o * B->stride[1], B->stride[2], r);
    }
    for (long h = 0; h < nhit; h++) {
        kt_bf16 *BT = d->BT + (long)L->rt.hit[h] * 3 * r * out + o0;
        for (int j = 0; j < r; j++)
            split_into(BT + (long)j * out, (long)r * out, blk + (h * r + j) * BLOCK_O, nb);
    }
}

/* The bf16 LoRA copies (layer buffers) for this call's ranks. */
int lora_alloc_copies(kt_layer *L) {
    for (int p = 0; p < 3; p++) {
        int r = L->has_lora ? L->lora_in.proj[p].r : 0, in = p == KT_DOWN ? L->I : L->H;
        int out = p == KT_DOWN ? L->H : L->I;
        L->lora[p] = (kt_lora_bf16){.r = r, .in = in, .out = out};
        if (!r) continue;
        L->lora[p].A = p == KT_UP && L->shared_a ? L->lora[KT_GATE].A
                                                  : kt_buf_get(&L->lora_a[p], sizeof(kt_bf16) * 3 * (size_t)L->E * r * in);
        L->lora[p].BT = kt_buf_get(&L->lora_bt[p], sizeof(kt_bf16) * 3 * (size_t)L->E * r * out);
        if (!L->lora[p].A || !L->lora[p].BT) return KT_ERR_NOMEM;
    }
    return 0;
}

/* ---- the backward's LoRA gradients ---- */

/* dAd[:, chunk] += (w s dy Bd)^T Hh[:, chunk] over all of an expert's rows (one task per
 * expert and chunk, so row blocks never add into the same gradient at once). */
void task_grad_down_a(void *ctx, long task, int thread) {
    kt_pass *c = ctx;
    kt_layer *L = c->L;
    int chunk, e = task_expert(c, task, c->nci, &chunk), I = L->I, rd = c->r[KT_DOWN];
    int n = kt_chunk_n(chunk, KT_CHUNK_I, I), i0 = chunk * KT_CHUNK_I;
    long p0;
    int m = expert_rows(L, e, &p0);
    float *w = kt_scratch(KT_SCR_RWEIGHT, sizeof(float) * (size_t)(m ? m : 1));
    for (int i = 0; i < m; i++) w[i] = L->rt.w[L->rt.slot_of_pos[p0 + i]];
    const kt_bf16 *qt = transpose_split(c->q + p0 * qld(c), qld(c), m, rd, w);
    grad_gemm(c, thread, rd, n, m, qt, c->hh + p0 * I + i0, I, c->grad[KT_DOWN].A + (long)e * rd * I + i0, I);
}

/* Per expert: dBd, and for gate and up: Q = s dG B (kept for dx), dB, dA. */
void task_lora_grads(void *ctx, long task, int thread) {
    kt_pass *c = ctx;
    kt_layer *L = c->L;
    int e = L->rt.hit[task], H = L->H, I = L->I, rd = c->r[KT_DOWN], grads = L->has_grads;
    long p0;
    int m = expert_rows(L, e, &p0);
    const kt_bf16 *dgu = c->dgu + p0 * 2 * I;
    if (rd && grads) {
        /* dBd^T += (w s Hh Ad^T)^T dy */
        float *w = kt_scratch(KT_SCR_RWEIGHT, sizeof(float) * (size_t)(m ? m : 1));
        for (int i = 0; i < m; i++) w[i] = L->rt.w[L->rt.slot_of_pos[p0 + i]];
        const kt_bf16 *pt = transpose_split((const kt_bf16 *)L->pd.p + p0 * 3 * rd, 3 * rd, m, rd, w);
        grad_gemm(c, thread, rd, H, m, pt, c->rows + p0 * c->ldr, c->ldr, c->grad[KT_DOWN].BT + (long)e * rd * H, H);
    }
    if (!c->rgu) return;
    kt_bf16 *xe = NULL;
    if (grads) {
        xe = kt_scratch(KT_SCR_XROWS, sizeof(kt_bf16) * (size_t)(m ? m : 1) * H);
        const kt_bf16 *xb = L->xb.p;
        for (int i = 0; i < m; i++)
            memcpy(xe + (size_t)i * H, xb + (long)(L->rt.slot_of_pos[p0 + i] / L->rt.k) * H, sizeof(kt_bf16) * H);
    }
    float *tmp = kt_scratch(KT_SCR_LORA_OUT, sizeof(float) * (size_t)(m ? m : 1) * 2 * c->rgu);
    for (int p = KT_GATE; p <= KT_UP; p++) {
        int r = c->r[p], half = p == KT_UP, off = half ? 3 * c->r[KT_GATE] : 0;
        if (!r) continue;
        const kt_bf16 *BT = L->lora[p].BT + (long)e * 3 * r * I;
        kt_bf16 *q = c->q + p0 * qld(c) + 3 * rd + off;
        /* Q = s dG B over the chunk-interleaved columns of this half, against B's [hi; lo] rows */
        for (int ch = 0; ch < c->nci; ch++) {
            int n = kt_chunk_n(ch, KT_CHUNK_I, I), i0 = ch * KT_CHUNK_I;
            PROF_GEMM(c, thread, lora, 4.0 * m * r * n,
                      GEMM_NT(m, 2 * r, n, dgu + 2 * i0 + half * n, 2 * I, BT + (long)r * I + i0, I, tmp, 2 * r, ch > 0));
        }
        for (int i = 0; i < m; i++)
            split_row(q + (long)i * qld(c), tmp + (long)i * 2 * r, tmp + (long)i * 2 * r + r, r, L->scale);
        if (!grads) continue;
        /* dB^T += (s X A^T)^T dG;  dA += (s dG B)^T X */
        const kt_bf16 *pt = transpose_split((const kt_bf16 *)L->pgu.p + p0 * 3 * c->rgu + off, 3 * c->rgu, m, r, NULL);
        for (int ch = 0; ch < c->nci; ch++) {
            int n = kt_chunk_n(ch, KT_CHUNK_I, I), i0 = ch * KT_CHUNK_I;
            grad_gemm(c, thread, r, n, m, pt, dgu + 2 * i0 + half * n, 2 * I, c->grad[p].BT + (long)e * r * I + i0, I);
        }
        if (c->share_grad) continue; /* dA once, from Qg + Qu, below */
        const kt_bf16 *qt = transpose_split(q, qld(c), m, r, NULL);
        grad_gemm(c, thread, r, H, m, qt, xe, H, c->grad[p].A + (long)e * r * H, H);
    }
    if (!L->shared_a) return;
    /* one A for gate and up: dx's LoRA term Qg A + Qu A = (Qg + Qu) A, kept in gate's Q slot
     * (task_dx then skips up); with one gradient buffer, dA = (Qg + Qu)^T X once */
    int r = c->r[KT_GATE];
    kt_bf16 *qg = c->q + p0 * qld(c) + 3 * rd, *qu = qg + 3 * r;
    float *sum = kt_scratch(KT_SCR_LORA_OUT, sizeof(float) * (size_t)(m ? m : 1) * 2 * c->rgu);
    for (int i = 0; i < m; i++) {
        kt_bf16 *a = qg + (long)i * qld(c), *b = qu + (long)i * qld(c);
        for (int j = 0; j < r; j++) sum[j] = unsplit(a, r, j) + unsplit(b, r, j);
        for (int j = 0; j < r; j++) sum[r + j] = 0.f;
        split_row(a, sum, sum + r, r, 1.f);
    }
    if (!c->share_grad) return;
    const kt_bf16 *qt = transpose_split(qg, qld(c), m, r, NULL);
    grad_gemm(c, thread, r, H, m, qt, xe, H, c->grad[KT_GATE].A + (long)e * r * H, H);
}

/* Adds the fp32 LoRA gradients into the caller's buffers (any layout and dtype); tasks
 * as in task_copy_lora. */
void task_export_grads(void *ctx, long task, int thread) {
    (void)thread;
    kt_pass *c = ctx;
    kt_layer *L = c->L;
    long nhit = L->rt.nhit;
    if (task < nhit) {
        int e = L->rt.hit[task];
        for (int p = 0; p < 3; p++) {
            const kt_lora_f32 *g = &c->grad[p];
            const kt_view3 *A = &L->grads_in.proj[p].A;
            if (p == KT_UP && c->share_grad) continue; /* gate's dA holds both */
            for (int j = 0; j < g->r; j++)
                add_row(A, e * A->stride[0] + j * A->stride[1], A->stride[2],
                        g->A + ((long)e * g->r + j) * g->in, 1, g->in);
        }
        return;
    }
    int o0, p = b_task(L, task - nhit, &o0);
    const kt_lora_f32 *g = &c->grad[p];
    const kt_view3 *B = &L->grads_in.proj[p].B;
    int r = g->r, out = g->out, nb = o0 + BLOCK_O < out ? BLOCK_O : out - o0;
    /* the block's gradients as [expert][j][o] rows, then added in the caller's order */
    float *blk = kt_scratch(KT_SCR_FACTOR, sizeof(float) * (size_t)nhit * r * BLOCK_O);
    for (long h = 0; h < nhit; h++)
        for (int j = 0; j < r; j++)
            memcpy(blk + (h * r + j) * BLOCK_O, g->BT + ((long)L->rt.hit[h] * r + j) * out + o0, sizeof(float) * nb);
    for (long h = 0; h < nhit; h++) { /* one expert at a time, as in task_copy_lora */
        const float *bh = blk + h * r * BLOCK_O;
        long base = L->rt.hit[h] * B->stride[0] + o0 * B->stride[1];
        for (int o = 0; o < nb; o++) add_row(B, base + o * B->stride[1], B->stride[2], bh + o, BLOCK_O, r);
    }
}
