/* pass_forward.c: the forward pass of one layer's routed experts (design.md 2), a list of
 * phases (pass.h): convert x to bf16, copy the LoRA factors (pass_lora.c), gather each
 * expert's rows with their X A^T products, gate/up GEMM + LoRA + SiLU, the down projection's
 * LoRA products and GEMM, and the per-token combine. The base-weight products go through the
 * layer's format row (fmt.h: L->fmt), whatever the weight format.
 *
 * Precision: GEMM inputs bf16, every product accumulated in fp32; per-slot down outputs are
 * rounded to bf16 before the per-token sums. Kept for backward: x and the gate/up
 * pre-activations (bf16) and the LoRA products; Hh is recomputed.
 */
#include "pass.h"
#include <string.h>

static void task_convert_x(void *ctx, long task, int thread) {
    (void)thread;
    kt_layer *L = ((kt_pass *)ctx)->L;
    long t1, t0 = token_range(L, task, &t1);
    size_t n = (size_t)(t1 - t0) * L->H, off = (size_t)t0 * L->H;
    kt_bf16 *xb = L->xb.p;
    if (L->x_dtype == KT_BF16) memcpy(xb + off, (const kt_bf16 *)L->x + off, n * sizeof(kt_bf16));
    else row_to_bf16(xb + off, (const float *)L->x + off, (int)n, 1.f);
}

static void task_gather_x(void *ctx, long task, int thread) {
    kt_pass *c = ctx;
    kt_layer *L = c->L;
    int e = L->rt.hit[task], H = L->H;
    long p0;
    int m = expert_rows(L, e, &p0);
    const kt_bf16 *xb = L->xb.p;
    for (int i = 0; i < m; i++)
        memcpy(c->rows + (p0 + i) * c->ldr, xb + (long)(L->rt.slot_of_pos[p0 + i] / L->rt.k) * H, sizeof(kt_bf16) * H);
    if (c->aq) act_cache_rows(c, 0, e, m, p0, c->rows + p0 * c->ldr, c->ldr, H, 0);
    kt_bf16 *pgu = (kt_bf16 *)L->pgu.p + p0 * 3 * c->rgu;
    if (c->r[KT_GATE]) lora_product(c, thread, m, c->r[KT_GATE], H, c->rows + p0 * c->ldr, c->ldr,
                                    L->lora[KT_GATE].A + (long)e * 3 * c->r[KT_GATE] * H, L->scale, pgu, 3 * c->rgu);
    if (c->r[KT_UP] && L->shared_a) /* one A: up's product rows are gate's */
        for (int i = 0; i < m; i++)
            memcpy(pgu + (long)i * 3 * c->rgu + 3 * c->r[KT_GATE], pgu + (long)i * 3 * c->rgu, sizeof(kt_bf16) * 3 * c->r[KT_UP]);
    else if (c->r[KT_UP])
        lora_product(c, thread, m, c->r[KT_UP], H, c->rows + p0 * c->ldr, c->ldr,
                     L->lora[KT_UP].A + (long)e * 3 * c->r[KT_UP] * H, L->scale, pgu + 3 * c->r[KT_GATE], 3 * c->rgu);
}

static void task_gate_up(void *ctx, long task, int thread) {
    kt_pass *c = ctx;
    kt_layer *L = c->L;
    int chunk, m, H = L->H, I = L->I;
    long p0;
    int e = task_block(c, task, c->nci, &chunk, &p0, &m);
    int n = kt_chunk_n(chunk, KT_CHUNK_I, I), i0 = chunk * KT_CHUNK_I;
    float *gu = kt_scratch(KT_SCR_OUT, sizeof(float) * 2 * (size_t)m * n); /* [m, 2n]: gate | up */
    PROF_GEMM(c, thread, base, 4.0 * m * n * H, L->fmt->base_nt(c, 0, e, m, 2 * i0, 2 * n, c->rows + p0 * c->ldr, c->ldr, p0, gu, 2 * n));
    const kt_bf16 *pgu = (const kt_bf16 *)L->pgu.p + p0 * 3 * c->rgu;
    for (int p = KT_GATE; p <= KT_UP; p++) {
        int r = c->r[p];
        if (r) PROF_GEMM(c, thread, lora, 6.0 * m * n * r,
                         GEMM_NN(m, n, 3 * r, pgu + (p == KT_UP ? 3 * c->r[KT_GATE] : 0), 3 * c->rgu,
                                 L->lora[p].BT + (long)e * 3 * r * I + i0, I, gu + (p == KT_UP ? n : 0), 2 * n, 1));
    }
    kt_bf16 *saved = L->keep ? (kt_bf16 *)L->gu.p : NULL;
    for (int i = 0; i < m; i++) {
        const float *g = gu + (size_t)i * 2 * n, *u = g + n;
        kt_bf16 *h = c->hh + (p0 + i) * I + i0;
        for (int j = 0; j < n; j++) h[j] = kt_f32_to_bf16(g[j] * sigmoid(g[j]) * u[j]);
        if (saved) row_to_bf16(saved + (p0 + i) * 2 * I + 2 * i0, g, 2 * n, 1.f);
    }
}

/* W8A8: an expert's Hh rows (forward, down projection) or dG | dU rows (backward, folded
 * with the gate/up row scales), quantized once for all column chunks. */
static void task_quantize_hh(void *ctx, long task, int thread) {
    (void)thread;
    kt_pass *c = ctx;
    int e = c->L->rt.hit[task], I = c->L->I;
    long p0;
    int m = expert_rows(c->L, e, &p0);
    act_cache_rows(c, 1, e, m, p0, c->hh + p0 * I, I, I, 0);
}

static void task_down_lora(void *ctx, long task, int thread) {
    kt_pass *c = ctx;
    kt_layer *L = c->L;
    int e = L->rt.hit[task], I = L->I, rd = c->r[KT_DOWN];
    long p0;
    int m = expert_rows(L, e, &p0);
    lora_product(c, thread, m, rd, I, c->hh + p0 * I, I, L->lora[KT_DOWN].A + (long)e * 3 * rd * I, L->scale,
                 (kt_bf16 *)L->pd.p + p0 * 3 * rd, 3 * rd);
}

static void task_down(void *ctx, long task, int thread) {
    kt_pass *c = ctx;
    kt_layer *L = c->L;
    int chunk, m, H = L->H, I = L->I, rd = c->r[KT_DOWN];
    long p0;
    int e = task_block(c, task, c->nch, &chunk, &p0, &m);
    int n = kt_chunk_n(chunk, KT_CHUNK_H, H), h0 = chunk * KT_CHUNK_H;
    float *d = kt_scratch(KT_SCR_OUT, sizeof(float) * (size_t)m * n);
    PROF_GEMM(c, thread, base, 2.0 * m * n * I, L->fmt->base_nt(c, 1, e, m, h0, n, c->hh + p0 * I, I, p0, d, n));
    if (rd) PROF_GEMM(c, thread, lora, 6.0 * m * n * rd,
                      GEMM_NN(m, n, 3 * rd, (const kt_bf16 *)L->pd.p + p0 * 3 * rd, 3 * rd,
                              L->lora[KT_DOWN].BT + (long)e * 3 * rd * H + h0, H, d, n, 1));
    for (int i = 0; i < m; i++) row_to_bf16(c->rows + (p0 + i) * c->ldr + h0, d + (size_t)i * n, n, 1.f);
}

int KT_FN(kt_forward)(kt_layer *L) {
    int E = L->E, H = L->H, I = L->I, T = L->rt.T, k = L->rt.k;
    double t0 = kt_now();
    L->oom = 0;
    int rc = kt_routing_build(&L->rt, E, T, k, L->ids, L->ids_dtype, L->weights, L->w_dtype);
    if (rc) return rc;
    L->scale = L->has_lora ? L->lora_in.scale : 0.f;
    const kt_lora_proj *pg = &L->lora_in.proj[KT_GATE], *pu = &L->lora_in.proj[KT_UP];
    L->shared_a = L->has_lora && pg->r && pg->r == pu->r && same_view(&pg->A, &pu->A);
    kt_pass c;
    if ((rc = lora_alloc_copies(L))) goto done;
    pass_setup(&c, L);
    long npos = L->rt.npos, nhit = L->rt.nhit;
    c.rows = kt_workspace(KT_WS_ROWS, sizeof(kt_bf16) * (size_t)npos * c.ldr);
    c.hh = kt_workspace(KT_WS_HH, sizeof(kt_bf16) * (size_t)npos * I);
    int ok = c.rows && c.hh && kt_buf_get(&L->xb, sizeof(kt_bf16) * (size_t)T * H)
             && kt_buf_get(&L->pgu, sizeof(kt_bf16) * 3 * (size_t)npos * c.rgu)
             && kt_buf_get(&L->pd, sizeof(kt_bf16) * 3 * (size_t)npos * c.r[KT_DOWN])
             && (!L->keep || kt_buf_get(&L->gu, sizeof(kt_bf16) * (size_t)npos * 2 * I));
    if (!ok || pass_row_blocks(&c) || pass_alloc_act_cache(&c, L->fmt->cache_fwd)) { rc = KT_ERR_NOMEM; goto done; }
    c.ldq = H;
    long ntok = (T + TOKENS_PER_TASK - 1) / TOKENS_PER_TASK;
    pass_phase_serial(L, KT_PH_SETUP_FWD, t0);
    pass_phase(&c, KT_PH_CONVERT_X, ntok, task_convert_x);
    if (L->has_lora) pass_phase(&c, KT_PH_COPY_LORA, nhit + lora_b_tasks(L), task_copy_lora);
    pass_phase(&c, KT_PH_GATHER_X, nhit, task_gather_x);
    pass_phase(&c, KT_PH_GATE_UP, c.nblk * c.nci, task_gate_up);
    if (c.aq) {
        c.ldq = I;
        pass_phase(&c, KT_PH_QUANT_HH, nhit, task_quantize_hh);
    }
    if (c.r[KT_DOWN]) pass_phase(&c, KT_PH_DOWN_LORA, nhit, task_down_lora);
    pass_phase(&c, KT_PH_DOWN, c.nblk * c.nch, task_down);
    pass_phase(&c, KT_PH_COMBINE_Y, ntok, task_combine);
    if (L->oom) rc = KT_ERR_NOMEM;
done:
    if (rc || !L->keep) kt_layer_release_saved(L);
    else L->has_saved = 1;
    return rc;
}
