/* pass_backward.c: the backward pass of the last kept forward (design.md 3), a list of
 * phases (pass.h): convert and gather dy (with dy Bd), dHh and the SiLU backward (with the
 * router-weight partial sums), the LoRA gradients (pass_lora.c), dx through the gate/up
 * weights, the per-token combine of dx and dw, and the export of the LoRA gradients. The
 * base-weight products go through the layer's format row (fmt.h: L->fmt).
 *
 * Precision: GEMM inputs bf16, every product accumulated in fp32; per-slot dx rows are
 * rounded to bf16 before the per-token sums; Hh is recomputed from the kept pre-activations.
 */
#include "pass.h"
#include <string.h>

static void task_convert_dy(void *ctx, long task, int thread) {
    (void)thread;
    kt_pass *c = ctx;
    kt_layer *L = c->L;
    long t1, t0 = token_range(L, task, &t1);
    size_t n = (size_t)(t1 - t0) * L->H, off = (size_t)t0 * L->H;
    if (L->x_dtype == KT_BF16) memcpy(c->dyb + off, (const kt_bf16 *)L->dy + off, n * sizeof(kt_bf16));
    else row_to_bf16(c->dyb + off, (const float *)L->dy + off, (int)n, 1.f);
}


static void task_gather_dy(void *ctx, long task, int thread) {
    kt_pass *c = ctx;
    kt_layer *L = c->L;
    int e = L->rt.hit[task], H = L->H, rd = c->r[KT_DOWN];
    long p0;
    int m = expert_rows(L, e, &p0);
    for (int i = 0; i < m; i++)
        memcpy(c->rows + (p0 + i) * c->ldr, c->dyb + (long)(L->rt.slot_of_pos[p0 + i] / L->rt.k) * H, sizeof(kt_bf16) * H);
    for (int q = 0; q < 3; q++) { /* this expert's fp32 gradient accumulators start at zero */
        kt_lora_f32 *g = &c->grad[q];
        if (!g->r) continue;
        memset(g->A + (long)e * g->r * g->in, 0, sizeof(float) * g->r * g->in);
        memset(g->BT + (long)e * g->r * g->out, 0, sizeof(float) * g->r * g->out);
    }
    if (c->aq) act_cache_rows(c, 1, e, m, p0, c->rows + p0 * c->ldr, c->ldr, H, 1);
    if (rd) lora_product(c, thread, m, rd, H, c->rows + p0 * c->ldr, c->ldr, L->lora[KT_DOWN].BT + (long)e * 3 * rd * H, L->scale,
                         c->q + p0 * qld(c), qld(c));
}

/* One row of the SiLU-gate backward: from the kept pre-activations g, u and the raw
 * dHh row dr (before the router weight w): Hh (fp32 and bf16), dG and dU. */
static void silu_backward(int n, float w, const kt_bf16 *restrict gr, const kt_bf16 *restrict ur,
                          const float *restrict dr, float *restrict hv, kt_bf16 *restrict h,
                          kt_bf16 *restrict dg, kt_bf16 *restrict du) {
    for (int j = 0; j < n; j++) {
        float g = kt_bf16_to_f32(gr[j]), u = kt_bf16_to_f32(ur[j]), sg = sigmoid(g);
        float silu = g * sg, dh = w * dr[j], hj = silu * u;
        hv[j] = hj;
        h[j] = kt_f32_to_bf16(hj);
        dg[j] = kt_f32_to_bf16(dh * u * sg * (1.f + g * (1.f - sg)));
        du[j] = kt_f32_to_bf16(dh * silu);
    }
}

/* dHh for one chunk of I; then dG, dU, the router-weight partial sums and dAd. */
static void task_dhh(void *ctx, long task, int thread) {
    kt_pass *c = ctx;
    kt_layer *L = c->L;
    int chunk, m, H = L->H, I = L->I, rd = c->r[KT_DOWN];
    long p0;
    int e = task_block(c, task, c->nci, &chunk, &p0, &m);
    int whole = m <= L->fmt->small_m; /* the first chunk's task does every chunk (fmt.h) */
    if (whole && chunk) return;
    int n = whole ? I : kt_chunk_n(chunk, KT_CHUNK_I, I), i0 = whole ? 0 : chunk * KT_CHUNK_I;
    float *d = kt_scratch(KT_SCR_OUT, sizeof(float) * (size_t)m * n);
    const kt_bf16 *q = c->q + p0 * qld(c);
    PROF_GEMM(c, thread, base, 2.0 * m * n * H, L->fmt->base_nn(c, 1, e, m, i0, n, c->rows + p0 * c->ldr, c->ldr, p0, d, n));
    if (rd) PROF_GEMM(c, thread, lora, 6.0 * m * n * rd,
                      GEMM_NN(m, n, 3 * rd, q, qld(c), L->lora[KT_DOWN].A + (long)e * 3 * rd * I + i0, I, d, n, 1));
    const kt_bf16 *gu = L->gu.p;
    float *hv = kt_scratch(KT_SCR_SILU, sizeof(float) * KT_CHUNK_I);
    for (int ch = i0 / KT_CHUNK_I; ch * KT_CHUNK_I < i0 + n; ch++) { /* gate/up rows are chunk-interleaved */
        int cn = kt_chunk_n(ch, KT_CHUNK_I, I), c0 = ch * KT_CHUNK_I;
        for (int i = 0; i < m; i++) {
            long p = p0 + i;
            float w = L->rt.w[L->rt.slot_of_pos[p]];
            const kt_bf16 *gr = gu + p * 2 * I + 2 * c0, *ur = gr + cn;
            const float *dr = d + (size_t)i * n + (c0 - i0);
            kt_bf16 *dg = c->dgu + p * 2 * I + 2 * c0, *du = dg + cn, *h = c->hh + p * I + c0;
            silu_backward(cn, w, gr, ur, dr, hv, h, dg, du);
            c->dwpart[p * c->nci + ch] = dot_f32(dr, hv, cn);
        }
    }
}


static void task_quantize_dgu(void *ctx, long task, int thread) {
    (void)thread;
    kt_pass *c = ctx;
    int e = c->L->rt.hit[task], I = c->L->I;
    long p0;
    int m = expert_rows(c->L, e, &p0);
    act_cache_rows(c, 0, e, m, p0, c->dgu + p0 * 2 * I, 2 * I, 2 * I, 1);
}

static void task_dx(void *ctx, long task, int thread) {
    kt_pass *c = ctx;
    kt_layer *L = c->L;
    int chunk, m, H = L->H, I = L->I;
    long p0;
    int e = task_block(c, task, c->nch, &chunk, &p0, &m);
    int whole = m <= L->fmt->small_m; /* the first chunk's task does every chunk (fmt.h) */
    if (whole && chunk) return;
    int n = whole ? H : kt_chunk_n(chunk, KT_CHUNK_H, H), h0 = whole ? 0 : chunk * KT_CHUNK_H;
    float *d = kt_scratch(KT_SCR_OUT, sizeof(float) * (size_t)m * n);
    /* [dG | dU] and [Wg; Wu] share the chunk-interleaved order: one GEMM over 2I */
    PROF_GEMM(c, thread, base, 4.0 * m * n * I, L->fmt->base_nn(c, 0, e, m, h0, n, c->dgu + p0 * 2 * I, 2 * I, p0, d, n));
    for (int p = KT_GATE; p <= (L->shared_a ? KT_GATE : KT_UP); p++) { /* shared A: gate's Q slot holds Qg + Qu */
        int r = c->r[p];
        if (r) PROF_GEMM(c, thread, lora, 6.0 * m * n * r,
                         GEMM_NN(m, n, 3 * r, c->q + p0 * qld(c) + 3 * (c->r[KT_DOWN] + (p == KT_UP ? c->r[KT_GATE] : 0)),
                                 qld(c), L->lora[p].A + (long)e * 3 * r * H + h0, H, d, n, 1));
    }
    for (int i = 0; i < m; i++) row_to_bf16(c->rows + (p0 + i) * c->ldr + h0, d + (size_t)i * n, n, 1.f);
}

int KT_FN(kt_backward)(kt_layer *L) {
    int E = L->E, H = L->H, I = L->I, T = L->rt.T, rc = 0;
    double t0 = kt_now();
    L->oom = 0;
    kt_pass c;
    pass_setup(&c, L);
    memset(c.grad, 0, sizeof c.grad);
    c.share_grad = L->shared_a && L->has_grads && same_view(&L->grads_in.proj[KT_GATE].A, &L->grads_in.proj[KT_UP].A);
    long npos = L->rt.npos, nhit = L->rt.nhit;
    c.dyb = kt_workspace(KT_WS_DYB, sizeof(kt_bf16) * (size_t)T * H);
    c.rows = kt_workspace(KT_WS_ROWS, sizeof(kt_bf16) * (size_t)npos * c.ldr);
    c.dgu = kt_workspace(KT_WS_DGU, sizeof(kt_bf16) * (size_t)npos * 2 * I);
    c.q = kt_workspace(KT_WS_Q, sizeof(kt_bf16) * (size_t)npos * qld(&c));
    c.dwpart = kt_workspace(KT_WS_DW, sizeof(float) * (size_t)npos * c.nci);
    c.hh = kt_workspace(KT_WS_HH, sizeof(kt_bf16) * (size_t)npos * I);
    int ok = c.dyb && c.rows && c.dgu && c.q && c.dwpart && c.hh && !pass_row_blocks(&c);
    for (int p = 0; L->has_grads && p < 3; p++) {
        int r = c.r[p], in = L->lora[p].in, out = L->lora[p].out;
        if (!r) continue;
        c.grad[p] = (kt_lora_f32){.r = r, .in = in, .out = out,
                                  .A = kt_workspace(KT_WS_GRAD0 + 2 * p, sizeof(float) * (size_t)E * r * in),
                                  .BT = kt_workspace(KT_WS_GRAD0 + 2 * p + 1, sizeof(float) * (size_t)E * r * out)};
        ok = ok && c.grad[p].A && c.grad[p].BT;
    }
    /* int8 activations cached once per call (fmt.h cache_bwd: one fold + quantization per row
     * serves every column chunk); otherwise, e.g. int4 W8A8 folding per output column group, the
     * tasks quantize their own rows (c.aq NULL) */
    if (!ok || pass_alloc_act_cache(&c, L->fmt->cache_bwd)) { rc = KT_ERR_NOMEM; goto done; }
    c.ldq = H;
    long ntok = (T + TOKENS_PER_TASK - 1) / TOKENS_PER_TASK;
    pass_phase_serial(L, KT_PH_SETUP_BWD, t0);
    pass_phase(&c, KT_PH_CONVERT_DY, ntok, task_convert_dy);
    pass_phase(&c, KT_PH_GATHER_DY, nhit, task_gather_dy);
    pass_phase(&c, KT_PH_DHH, c.nblk * c.nci, task_dhh);
    if (c.r[KT_DOWN] && L->has_grads) pass_phase(&c, KT_PH_GRAD_DOWN_A, nhit * c.nci, task_grad_down_a);
    if (c.rgu || (c.r[KT_DOWN] && L->has_grads)) pass_phase(&c, KT_PH_LORA_GRADS, nhit, task_lora_grads);
    if (c.aq) {
        c.ldq = 2 * I;
        pass_phase(&c, KT_PH_QUANT_DGU, nhit, task_quantize_dgu);
    }
    pass_phase(&c, KT_PH_DX, c.nblk * c.nch, task_dx);
    pass_phase(&c, KT_PH_COMBINE_DX, ntok, task_combine);
    if (L->has_grads) pass_phase(&c, KT_PH_EXPORT_GRADS, nhit + lora_b_tasks(L), task_export_grads);
    if (L->oom) rc = KT_ERR_NOMEM;
done:
    kt_layer_release_saved(L);
    return rc;
}
