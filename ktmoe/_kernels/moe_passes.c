/* moe_passes.c: the forward and backward of one layer's routed experts (SPEC.md 2-4).
 *
 * Compiled once per ISA (meson passes -DKT_ISA=portable|avx512|amx plus that ISA's
 * flags), so the same source drives each path's GEMMs (gemm.h) and the compiler
 * vectorises the small fp32 loops (LoRA, SiLU, reductions) for that ISA.
 *
 * Each pass is a short sequence of phases; a phase is a parallel loop over tasks, a task
 * being one expert (LoRA factor products, gathers) or one expert x one chunk of output
 * columns (the big GEMMs). Rows of one expert are contiguous "positions" (moe_layer.c
 * routing), so each expert's GEMM reads its weights once per column chunk.
 *
 * Precision: weights and GEMM inputs bf16, every product accumulated in fp32; the
 * per-slot down outputs and dx rows are rounded to bf16 before the per-token sums.
 * Kept for backward: x as bf16 and gate/up pre-activations as bf16 (see
 * kt_saved_bytes_per_token); Hh, dHh and the LoRA products are recomputed.
 */
#include "moe_internal.h"
#include "threadpool.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define GEMM_NT CAT(kt_gemm_nt_, KT_ISA)
#define GEMM_NN CAT(kt_gemm_nn_, KT_ISA)

enum { TOKENS_PER_TASK = 32 };

static inline float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

static void row_to_f32(float *dst, const kt_bf16 *src, int n) {
    for (int i = 0; i < n; i++) dst[i] = kt_bf16_to_f32(src[i]);
}
static void row_from_f32(void *dst, int dtype, const float *src, int n) {
    if (dtype == KT_F32) { memcpy(dst, src, sizeof(float) * (size_t)n); return; }
    kt_bf16 *d = dst;
    for (int i = 0; i < n; i++) d[i] = kt_f32_to_bf16(src[i]);
}
/* dst[i] = v[start + i * step] as fp32, for i < n. */
static void load_row(float *dst, const kt_view3 *v, long start, long step, int n) {
    if (v->dtype == KT_BF16) {
        const kt_bf16 *p = (const kt_bf16 *)v->data + start;
        for (int i = 0; i < n; i++) dst[i] = kt_bf16_to_f32(p[i * step]);
    } else {
        const float *p = (const float *)v->data + start;
        for (int i = 0; i < n; i++) dst[i] = p[i * step];
    }
}

/* ---- small fp32 products for the rank-r LoRA factors ---- */

/* sum_k a[k] * b[k] with 16 independent partial sums, so the compiler can vectorise it
 * without reassociating (no -ffast-math). */
static float dot_f32(const float *a, const float *b, int n) {
    enum { LANES = 16 };
    float part[LANES] = {0};
    int k = 0;
    for (; k + LANES <= n; k += LANES)
        for (int l = 0; l < LANES; l++) part[l] += a[k + l] * b[k + l];
    float s = 0.f;
    for (; k < n; k++) s += a[k] * b[k];
    for (int l = 0; l < LANES; l++) s += part[l];
    return s;
}

/* C[m, j] = sum_k A[m, k] * W[j, k]; A bf16 [M, K] (lda), W fp32 [R, K], C fp32 (ldc). */
static void lora_nt(int M, int R, int K, const kt_bf16 *A, long lda, const float *W,
                    float *C, long ldc, float *tmp /* [K] */) {
    for (int m = 0; m < M; m++) {
        row_to_f32(tmp, A + m * lda, K);
        for (int j = 0; j < R; j++) C[m * ldc + j] = dot_f32(tmp, W + (long)j * K, K);
    }
}

/* C[m, n] += alpha * sum_j P[m, j] * W[j, n]; P fp32 [M, R] (ldp), W fp32 rows of ldw. */
static void lora_nn(int M, int N, int R, const float *P, long ldp, float alpha,
                    const float *W, long ldw, float *C, long ldc) {
    for (int m = 0; m < M; m++) {
        float *c = C + m * ldc;
        for (int j = 0; j < R; j++) {
            float a = alpha * P[m * ldp + j];
            const float *w = W + j * ldw;
            for (int n = 0; n < N; n++) c[n] += a * w[n];
        }
    }
}

/* D[j, n] += alpha * sum_m P[m, j] * G[m, n]; P fp32 [M, R], G bf16 [M, N] (ldg). */
static void lora_tn(int M, int R, int N, const float *P, long ldp, const kt_bf16 *G, long ldg,
                    float alpha, float *D, long ldd, float *tmp /* [N] */) {
    for (int m = 0; m < M; m++) {
        row_to_f32(tmp, G + m * ldg, N);
        for (int j = 0; j < R; j++) {
            float a = alpha * P[m * ldp + j];
            float *d = D + j * ldd;
            for (int n = 0; n < N; n++) d[n] += a * tmp[n];
        }
    }
}

/* ---- shared state of one pass ---- */

typedef struct {
    kt_layer *L;
    int rg, ru, rd, rgu;   /* LoRA ranks (0 = none) and rg + ru */
    int nci, nch;          /* column chunks over I and over H */
    kt_bf16 *rows;         /* [npos, H]: gathered x / dy, then down outputs / dx rows */
    kt_bf16 *hh;           /* forward: [npos, I] SiLU(G) * U */
    kt_bf16 *dgu;          /* backward: [npos, 2I] dG | dU */
    float *pgu;            /* [npos, rgu] X Ag^T | X Au^T (forward); dG Bg | dU Bu (backward) */
    float *pd;             /* [npos, rd]  Hh Ad^T (forward); dy Bd (backward) */
    float *dwpart;         /* [npos, nci] partial router-weight gradients */
    kt_bf16 *dyb;          /* [T, H] dy as bf16 */
    kt_lora_f32 grad[3];   /* fp32 LoRA gradients, same layout as L->lora */
} pass;

static int expert_of_task(const pass *c, long task, int nchunks, int *chunk) {
    *chunk = (int)(task % nchunks);
    return c->L->rt.hit[task / nchunks];
}

static void chunk_range(int chunk, int width, int total, int *c0, int *n) {
    *c0 = chunk * width;
    *n = total - *c0 < width ? total - *c0 : width;
}

static int lora_dims(kt_layer *L, pass *c) {
    c->rg = L->lora[KT_GATE].r; c->ru = L->lora[KT_UP].r; c->rd = L->lora[KT_DOWN].r;
    c->rgu = c->rg + c->ru;
    c->nci = (L->I + KT_CHUNK_I - 1) / KT_CHUNK_I;
    c->nch = (L->H + KT_CHUNK_H - 1) / KT_CHUNK_H;
    return 0;
}

/* ---- forward ---- */

static void task_convert_x(void *ctx, long task, int thread) {
    (void)thread;
    kt_layer *L = ((pass *)ctx)->L;
    long t0 = task * TOKENS_PER_TASK, t1 = t0 + TOKENS_PER_TASK;
    if (t1 > L->rt.T) t1 = L->rt.T;
    size_t n = (size_t)(t1 - t0) * L->H;
    if (L->x_dtype == KT_BF16)
        memcpy(L->xb + t0 * L->H, (const kt_bf16 *)L->x + t0 * L->H, n * sizeof(kt_bf16));
    else
        for (size_t i = 0; i < n; i++)
            L->xb[t0 * L->H + i] = kt_f32_to_bf16(((const float *)L->x)[t0 * L->H + i]);
}

/* Copies the caller's LoRA factors of one expert into the fp32 layout of kt_lora_f32. */
static void copy_lora_expert(kt_layer *L, int e) {
    for (int p = 0; p < 3; p++) {
        kt_lora_f32 *d = &L->lora[p];
        const kt_lora_proj *s = &L->lora_in.proj[p];
        if (!d->r) continue;
        float *A = d->A + (long)e * d->r * d->in, *BT = d->BT + (long)e * d->r * d->out;
        for (int j = 0; j < d->r; j++) {
            load_row(A + (long)j * d->in, &s->A, e * s->A.stride[0] + j * s->A.stride[1], s->A.stride[2], d->in);
            load_row(BT + (long)j * d->out, &s->B, e * s->B.stride[0] + j * s->B.stride[2], s->B.stride[1], d->out);
        }
    }
}

static void task_gather_x(void *ctx, long task, int thread) {
    (void)thread;
    pass *c = ctx;
    kt_layer *L = c->L;
    int e = L->rt.hit[task], H = L->H;
    copy_lora_expert(L, e);
    long p0 = L->rt.offset[e], m = L->rt.offset[e + 1] - p0;
    for (long p = p0; p < p0 + m; p++)
        memcpy(c->rows + p * H, L->xb + (long)(L->rt.slot_of_pos[p] / L->rt.k) * H, sizeof(kt_bf16) * H);
    float *tmp = kt_scratch(0, sizeof(float) * H);
    if (c->rg) lora_nt((int)m, c->rg, H, c->rows + p0 * H, H, L->lora[KT_GATE].A + (long)e * c->rg * H,
                       c->pgu + p0 * c->rgu, c->rgu, tmp);
    if (c->ru) lora_nt((int)m, c->ru, H, c->rows + p0 * H, H, L->lora[KT_UP].A + (long)e * c->ru * H,
                       c->pgu + p0 * c->rgu + c->rg, c->rgu, tmp);
}

static void task_gate_up(void *ctx, long task, int thread) {
    (void)thread;
    pass *c = ctx;
    kt_layer *L = c->L;
    int chunk, e = expert_of_task(c, task, c->nci, &chunk), i0, n, H = L->H, I = L->I;
    chunk_range(chunk, KT_CHUNK_I, I, &i0, &n);
    long p0 = L->rt.offset[e];
    int m = (int)(L->rt.offset[e + 1] - p0);
    float *g = kt_scratch(0, sizeof(float) * 2 * (size_t)m * n), *u = g + (size_t)m * n;
    const kt_bf16 *W = L->w_gate_up + (long)e * 2 * I * H;
    const kt_bf16 *X = c->rows + p0 * H;
    GEMM_NT(m, n, H, X, H, W + (long)i0 * H, H, g, n, 0);
    GEMM_NT(m, n, H, X, H, W + (long)(I + i0) * H, H, u, n, 0);
    if (c->rg) lora_nn(m, n, c->rg, c->pgu + p0 * c->rgu, c->rgu, L->scale,
                       L->lora[KT_GATE].BT + (long)e * c->rg * I + i0, I, g, n);
    if (c->ru) lora_nn(m, n, c->ru, c->pgu + p0 * c->rgu + c->rg, c->rgu, L->scale,
                       L->lora[KT_UP].BT + (long)e * c->ru * I + i0, I, u, n);
    for (int r = 0; r < m; r++) {
        float *gr = g + (size_t)r * n, *ur = u + (size_t)r * n;
        kt_bf16 *h = c->hh + (p0 + r) * I + i0;
        for (int i = 0; i < n; i++) h[i] = kt_f32_to_bf16(gr[i] * sigmoid(gr[i]) * ur[i]);
        if (L->keep) {
            row_from_f32(L->gu + (p0 + r) * 2 * I + i0, KT_BF16, gr, n);
            row_from_f32(L->gu + (p0 + r) * 2 * I + I + i0, KT_BF16, ur, n);
        }
    }
}

static void task_down_lora_a(void *ctx, long task, int thread) {
    (void)thread;
    pass *c = ctx;
    kt_layer *L = c->L;
    int e = L->rt.hit[task], I = L->I;
    long p0 = L->rt.offset[e], m = L->rt.offset[e + 1] - p0;
    lora_nt((int)m, c->rd, I, c->hh + p0 * I, I, L->lora[KT_DOWN].A + (long)e * c->rd * I,
            c->pd + p0 * c->rd, c->rd, kt_scratch(0, sizeof(float) * I));
}

static void task_down(void *ctx, long task, int thread) {
    (void)thread;
    pass *c = ctx;
    kt_layer *L = c->L;
    int chunk, e = expert_of_task(c, task, c->nch, &chunk), h0, n, H = L->H, I = L->I;
    chunk_range(chunk, KT_CHUNK_H, H, &h0, &n);
    long p0 = L->rt.offset[e];
    int m = (int)(L->rt.offset[e + 1] - p0);
    float *d = kt_scratch(0, sizeof(float) * (size_t)m * n);
    GEMM_NT(m, n, I, c->hh + p0 * I, I, L->w_down + (long)e * H * I + (long)h0 * I, I, d, n, 0);
    if (c->rd) lora_nn(m, n, c->rd, c->pd + p0 * c->rd, c->rd, L->scale,
                       L->lora[KT_DOWN].BT + (long)e * c->rd * H + h0, H, d, n);
    for (int r = 0; r < m; r++) row_from_f32(c->rows + (p0 + r) * H + h0, KT_BF16, d + (size_t)r * n, n);
}

static void task_combine(void *ctx, long task, int thread) {
    (void)thread;
    pass *c = ctx;
    kt_layer *L = c->L;
    int H = L->H, k = L->rt.k;
    float *acc = kt_scratch(0, sizeof(float) * H), *row = kt_scratch(1, sizeof(float) * H);
    long t0 = task * TOKENS_PER_TASK, t1 = t0 + TOKENS_PER_TASK;
    if (t1 > L->rt.T) t1 = L->rt.T;
    size_t esz = L->x_dtype == KT_BF16 ? 2 : 4;
    for (long t = t0; t < t1; t++) {
        memset(acc, 0, sizeof(float) * H);
        for (int j = 0; j < k; j++) {
            long p = L->rt.pos_of_slot[t * k + j];
            if (p < 0) continue;
            float w = L->rt.w[t * k + j];
            row_to_f32(row, c->rows + p * H, H);
            for (int h = 0; h < H; h++) acc[h] += w * row[h];
        }
        row_from_f32((char *)L->y + (size_t)t * H * esz, L->x_dtype, acc, H);
    }
}

/* Allocates the fp32 LoRA copies (or gradients) for a call; only hit experts get filled. */
static int alloc_lora(kt_lora_f32 *dst, const kt_lora *src, int E, int H, int I, int zero) {
    static const int in_of[3] = {0, 0, 1}; /* 0 -> H, 1 -> I */
    for (int p = 0; p < 3; p++) {
        int r = src->proj[p].r;
        dst[p] = (kt_lora_f32){.r = r, .in = in_of[p] ? I : H, .out = in_of[p] ? H : I};
        if (!r) continue;
        size_t na = (size_t)E * r * dst[p].in, nb = (size_t)E * r * dst[p].out;
        dst[p].A = zero ? calloc(na, sizeof(float)) : kt_alloc(sizeof(float) * na);
        dst[p].BT = zero ? calloc(nb, sizeof(float)) : kt_alloc(sizeof(float) * nb);
        if (!dst[p].A || !dst[p].BT) return -2;
    }
    return 0;
}

static void free_lora(kt_lora_f32 *l) {
    for (int p = 0; p < 3; p++) { free(l[p].A); free(l[p].BT); l[p] = (kt_lora_f32){0}; }
}

int CAT(kt_forward_, KT_ISA)(kt_layer *L) {
    int E = L->E, H = L->H, I = L->I, T = L->rt.T, k = L->rt.k, nt = L->num_threads;
    pass c = {.L = L};
    int rc = kt_routing_build(&L->rt, E, T, k, L->ids, L->ids_dtype, L->weights, L->w_dtype);
    if (rc) return rc;
    kt_lora none = {0};
    L->scale = L->has_lora ? L->lora_in.scale : 0.f;
    rc = alloc_lora(L->lora, L->has_lora ? &L->lora_in : &none, E, H, I, 0);
    lora_dims(L, &c);
    long npos = L->rt.npos;
    L->xb = kt_alloc(sizeof(kt_bf16) * (size_t)T * H);
    c.rows = kt_alloc(sizeof(kt_bf16) * (size_t)npos * H);
    c.hh = kt_alloc(sizeof(kt_bf16) * (size_t)npos * I);
    c.pgu = kt_alloc(sizeof(float) * (size_t)npos * c.rgu);
    c.pd = kt_alloc(sizeof(float) * (size_t)npos * c.rd);
    if (L->keep) L->gu = kt_alloc(sizeof(kt_bf16) * (size_t)npos * 2 * I);
    if (rc || !L->xb || !c.rows || !c.hh || !c.pgu || !c.pd || (L->keep && !L->gu)) {
        rc = -2;
        goto done;
    }
    long ntok = (T + TOKENS_PER_TASK - 1) / TOKENS_PER_TASK, nhit = L->rt.nhit;
    kt_parallel_for(nt, ntok, task_convert_x, &c);
    kt_parallel_for(nt, nhit, task_gather_x, &c);
    kt_parallel_for(nt, nhit * c.nci, task_gate_up, &c);
    if (c.rd) kt_parallel_for(nt, nhit, task_down_lora_a, &c);
    kt_parallel_for(nt, nhit * c.nch, task_down, &c);
    kt_parallel_for(nt, ntok, task_combine, &c);
done:
    free(c.rows); free(c.hh); free(c.pgu); free(c.pd);
    if (rc || !L->keep) kt_layer_release_saved(L);
    else L->has_saved = 1;
    return rc;
}

/* ---- backward ---- */

static void task_convert_dy(void *ctx, long task, int thread) {
    (void)thread;
    pass *c = ctx;
    kt_layer *L = c->L;
    long t0 = task * TOKENS_PER_TASK, t1 = t0 + TOKENS_PER_TASK;
    if (t1 > L->rt.T) t1 = L->rt.T;
    size_t n = (size_t)(t1 - t0) * L->H;
    if (L->x_dtype == KT_BF16)
        memcpy(c->dyb + t0 * L->H, (const kt_bf16 *)L->dy + t0 * L->H, n * sizeof(kt_bf16));
    else
        for (size_t i = 0; i < n; i++)
            c->dyb[t0 * L->H + i] = kt_f32_to_bf16(((const float *)L->dy)[t0 * L->H + i]);
}

static void task_gather_dy(void *ctx, long task, int thread) {
    (void)thread;
    pass *c = ctx;
    kt_layer *L = c->L;
    int e = L->rt.hit[task], H = L->H;
    long p0 = L->rt.offset[e], m = L->rt.offset[e + 1] - p0;
    for (long p = p0; p < p0 + m; p++)
        memcpy(c->rows + p * H, c->dyb + (long)(L->rt.slot_of_pos[p] / L->rt.k) * H, sizeof(kt_bf16) * H);
    if (c->rd) lora_nt((int)m, c->rd, H, c->rows + p0 * H, H, L->lora[KT_DOWN].BT + (long)e * c->rd * H,
                       c->pd + p0 * c->rd, c->rd, kt_scratch(0, sizeof(float) * H));
}

/* dHh for one chunk of I, then dG, dU, the router-weight partial sums and dAd. */
static void task_dhh(void *ctx, long task, int thread) {
    (void)thread;
    pass *c = ctx;
    kt_layer *L = c->L;
    int chunk, e = expert_of_task(c, task, c->nci, &chunk), i0, n, H = L->H, I = L->I, rd = c->rd;
    chunk_range(chunk, KT_CHUNK_I, I, &i0, &n);
    long p0 = L->rt.offset[e];
    int m = (int)(L->rt.offset[e + 1] - p0);
    float *d = kt_scratch(0, sizeof(float) * (size_t)m * n);
    kt_bf16 *hh = kt_scratch(1, sizeof(kt_bf16) * (size_t)m * n);
    float *wq = kt_scratch(2, sizeof(float) * (size_t)m * (rd ? rd : 1));
    GEMM_NN(m, n, H, c->rows + p0 * H, H, L->w_down + (long)e * H * I + i0, I, d, n, 0);
    if (rd) lora_nn(m, n, rd, c->pd + p0 * rd, rd, L->scale, L->lora[KT_DOWN].A + (long)e * rd * I + i0, I, d, n);
    for (int r = 0; r < m; r++) {
        long p = p0 + r;
        float w = L->rt.w[L->rt.slot_of_pos[p]], dot = 0.f;
        const kt_bf16 *gr = L->gu + p * 2 * I + i0, *ur = gr + I;
        float *dr = d + (size_t)r * n;
        kt_bf16 *dg = c->dgu + p * 2 * I + i0, *du = dg + I;
        for (int i = 0; i < n; i++) {
            float g = kt_bf16_to_f32(gr[i]), u = kt_bf16_to_f32(ur[i]), s = sigmoid(g);
            float silu = g * s, h = silu * u, dh = w * dr[i];
            dot += dr[i] * h;
            hh[(size_t)r * n + i] = kt_f32_to_bf16(h);
            dg[i] = kt_f32_to_bf16(dh * u * s * (1.f + g * (1.f - s)));
            du[i] = kt_f32_to_bf16(dh * silu);
        }
        c->dwpart[p * c->nci + chunk] = dot;
        for (int j = 0; j < rd; j++) wq[r * rd + j] = w * c->pd[p * rd + j];
    }
    if (rd && c->grad[KT_DOWN].A)
        lora_tn(m, rd, n, wq, rd, hh, n, L->scale, c->grad[KT_DOWN].A + (long)e * rd * I + i0, I,
                kt_scratch(3, sizeof(float) * n));
}

/* LoRA gradients of one expert that need whole rows: dBd, dAg, dBg, dAu, dBu; and the
 * products dG Bg, dU Bu that the dx pass needs. */
static void task_lora_grads(void *ctx, long task, int thread) {
    (void)thread;
    pass *c = ctx;
    kt_layer *L = c->L;
    int e = L->rt.hit[task], H = L->H, I = L->I, rd = c->rd, k = L->rt.k;
    long p0 = L->rt.offset[e];
    int m = (int)(L->rt.offset[e + 1] - p0);
    float s = L->scale;
    float *tmp = kt_scratch(0, sizeof(float) * (H > 2 * I ? H : 2 * I));
    int grads = L->has_grads;
    if (rd && grads) {
        /* dBd^T[j, h] += s * sum_m (w_m Hh Ad^T)[m, j] dy[m, h] */
        kt_bf16 *hh = kt_scratch(1, sizeof(kt_bf16) * (size_t)m * I);
        float *pd = kt_scratch(2, sizeof(float) * (size_t)m * rd);
        for (int r = 0; r < m; r++) {
            const kt_bf16 *gr = L->gu + (p0 + r) * 2 * I;
            for (int i = 0; i < I; i++) {
                float g = kt_bf16_to_f32(gr[i]);
                hh[(size_t)r * I + i] = kt_f32_to_bf16(g * sigmoid(g) * kt_bf16_to_f32(gr[I + i]));
            }
        }
        lora_nt(m, rd, I, hh, I, L->lora[KT_DOWN].A + (long)e * rd * I, pd, rd, tmp);
        for (int r = 0; r < m; r++) {
            float w = L->rt.w[L->rt.slot_of_pos[p0 + r]];
            for (int j = 0; j < rd; j++) pd[r * rd + j] *= w;
        }
        lora_tn(m, rd, H, pd, rd, c->rows + p0 * H, H, s, c->grad[KT_DOWN].BT + (long)e * rd * H, H, tmp);
    }
    if (!c->rgu) return;
    kt_bf16 *xe = kt_scratch(1, sizeof(kt_bf16) * (size_t)m * H);
    float *pa = kt_scratch(2, sizeof(float) * (size_t)m * c->rgu);
    for (int r = 0; r < m; r++)
        memcpy(xe + (size_t)r * H, L->xb + (long)(L->rt.slot_of_pos[p0 + r] / k) * H, sizeof(kt_bf16) * H);
    for (int p = KT_GATE; p <= KT_UP; p++) {
        int rp = L->lora[p].r, off = p == KT_GATE ? 0 : c->rg;
        if (!rp) continue;
        const kt_bf16 *dproj = c->dgu + p0 * 2 * I + (p == KT_GATE ? 0 : I);
        float *q = c->pgu + p0 * c->rgu + off;
        /* q = dG Bg (for dx and dAg) */
        lora_nt(m, rp, I, dproj, 2 * I, L->lora[p].BT + (long)e * rp * I, q, c->rgu, tmp);
        if (!grads) continue;
        /* P = X Ag^T; dBg^T[j, i] += s sum_m P[m, j] dG[m, i]; dAg[j, h] += s sum_m q[m, j] X[m, h] */
        lora_nt(m, rp, H, xe, H, L->lora[p].A + (long)e * rp * H, pa, rp, tmp);
        lora_tn(m, rp, I, pa, rp, dproj, 2 * I, s, c->grad[p].BT + (long)e * rp * I, I, tmp);
        lora_tn(m, rp, H, q, c->rgu, xe, H, s, c->grad[p].A + (long)e * rp * H, H, tmp);
    }
}

static void task_dx(void *ctx, long task, int thread) {
    (void)thread;
    pass *c = ctx;
    kt_layer *L = c->L;
    int chunk, e = expert_of_task(c, task, c->nch, &chunk), h0, n, H = L->H, I = L->I;
    chunk_range(chunk, KT_CHUNK_H, H, &h0, &n);
    long p0 = L->rt.offset[e];
    int m = (int)(L->rt.offset[e + 1] - p0);
    float *d = kt_scratch(0, sizeof(float) * (size_t)m * n);
    const kt_bf16 *W = L->w_gate_up + (long)e * 2 * I * H + h0;
    GEMM_NN(m, n, I, c->dgu + p0 * 2 * I, 2 * I, W, H, d, n, 0);
    GEMM_NN(m, n, I, c->dgu + p0 * 2 * I + I, 2 * I, W + (long)I * H, H, d, n, 1);
    for (int p = KT_GATE; p <= KT_UP; p++) {
        int rp = L->lora[p].r;
        if (rp) lora_nn(m, n, rp, c->pgu + p0 * c->rgu + (p == KT_GATE ? 0 : c->rg), c->rgu, L->scale,
                        L->lora[p].A + (long)e * rp * H + h0, H, d, n);
    }
    for (int r = 0; r < m; r++) row_from_f32(c->rows + (p0 + r) * H + h0, KT_BF16, d + (size_t)r * n, n);
}

static void task_reduce_dx(void *ctx, long task, int thread) {
    (void)thread;
    pass *c = ctx;
    kt_layer *L = c->L;
    int H = L->H, k = L->rt.k;
    float *acc = kt_scratch(0, sizeof(float) * H), *row = kt_scratch(1, sizeof(float) * H);
    long t0 = task * TOKENS_PER_TASK, t1 = t0 + TOKENS_PER_TASK;
    if (t1 > L->rt.T) t1 = L->rt.T;
    size_t esz = L->x_dtype == KT_BF16 ? 2 : 4;
    for (long t = t0; t < t1; t++) {
        memset(acc, 0, sizeof(float) * H);
        for (int j = 0; j < k; j++) {
            long p = L->rt.pos_of_slot[t * k + j];
            float dw = 0.f;
            if (p >= 0) {
                row_to_f32(row, c->rows + p * H, H);
                for (int h = 0; h < H; h++) acc[h] += row[h];
                for (int q = 0; q < c->nci; q++) dw += c->dwpart[p * c->nci + q];
            }
            if (L->w_dtype == KT_BF16) ((kt_bf16 *)L->dw)[t * k + j] = kt_f32_to_bf16(dw);
            else ((float *)L->dw)[t * k + j] = dw;
        }
        row_from_f32((char *)L->dx + (size_t)t * H * esz, L->x_dtype, acc, H);
    }
}

static void add_elem(void *p, int dtype, long i, float v) {
    if (dtype == KT_BF16) {
        kt_bf16 *q = p;
        q[i] = kt_f32_to_bf16(kt_bf16_to_f32(q[i]) + v);
    } else {
        ((float *)p)[i] += v;
    }
}

/* Adds one expert's fp32 LoRA gradients into the caller's buffers (any layout/dtype).
 * One task per expert, projections in turn, so a shared A (PEFT gate_up) is safe. */
static void task_export_grads(void *ctx, long task, int thread) {
    (void)thread;
    pass *c = ctx;
    kt_layer *L = c->L;
    int e = L->rt.hit[task];
    for (int p = 0; p < 3; p++) {
        kt_lora_f32 *g = &c->grad[p];
        const kt_lora_proj *d = &L->grads_in.proj[p];
        if (!g->r) continue;
        const float *A = g->A + (long)e * g->r * g->in, *BT = g->BT + (long)e * g->r * g->out;
        for (int j = 0; j < g->r; j++) {
            for (int i = 0; i < g->in; i++)
                add_elem(d->A.data, d->A.dtype, e * d->A.stride[0] + j * d->A.stride[1] + i * d->A.stride[2],
                         A[(long)j * g->in + i]);
            for (int o = 0; o < g->out; o++)
                add_elem(d->B.data, d->B.dtype, e * d->B.stride[0] + o * d->B.stride[1] + j * d->B.stride[2],
                         BT[(long)j * g->out + o]);
        }
    }
}

int CAT(kt_backward_, KT_ISA)(kt_layer *L) {
    int E = L->E, H = L->H, I = L->I, T = L->rt.T, nt = L->num_threads;
    pass c = {.L = L};
    lora_dims(L, &c);
    long npos = L->rt.npos, nhit = L->rt.nhit;
    int rc = 0;
    if (L->has_grads) {
        /* the caller's grads have the forward lora's ranks (checked in Python) */
        rc = alloc_lora(c.grad, &L->grads_in, E, H, I, 1);
    }
    c.dyb = kt_alloc(sizeof(kt_bf16) * (size_t)T * H);
    c.rows = kt_alloc(sizeof(kt_bf16) * (size_t)npos * H);
    c.dgu = kt_alloc(sizeof(kt_bf16) * (size_t)npos * 2 * I);
    c.pgu = kt_alloc(sizeof(float) * (size_t)npos * c.rgu);
    c.pd = kt_alloc(sizeof(float) * (size_t)npos * c.rd);
    c.dwpart = kt_alloc(sizeof(float) * (size_t)npos * c.nci);
    if (rc || !c.dyb || !c.rows || !c.dgu || !c.pgu || !c.pd || !c.dwpart) { rc = -2; goto done; }
    long ntok = (T + TOKENS_PER_TASK - 1) / TOKENS_PER_TASK;
    kt_parallel_for(nt, ntok, task_convert_dy, &c);
    kt_parallel_for(nt, nhit, task_gather_dy, &c);
    kt_parallel_for(nt, nhit * c.nci, task_dhh, &c);
    if (c.rgu || (c.rd && L->has_grads)) kt_parallel_for(nt, nhit, task_lora_grads, &c);
    kt_parallel_for(nt, nhit * c.nch, task_dx, &c);
    kt_parallel_for(nt, ntok, task_reduce_dx, &c);
    if (L->has_grads) kt_parallel_for(nt, nhit, task_export_grads, &c);
done:
    free(c.dyb); free(c.rows); free(c.dgu); free(c.pgu); free(c.pd); free(c.dwpart);
    free_lora(c.grad);
    kt_layer_release_saved(L);
    return rc;
}
