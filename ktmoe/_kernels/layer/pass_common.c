/* pass_common.c: what the forward and the backward pass (pass_forward.c, pass_backward.c)
 * both do: the pass set-up, running and profiling phases (ktmoe.h: the profile), splitting
 * hot experts into row blocks, the per-token combine of y / dx and dw, and the buffer of int8
 * activation rows quantized once per call for the formats that cache them (fmt.h). */
#include "pass.h"
#include <string.h>

void pass_setup(kt_pass *c, kt_layer *L) {
    c->L = L;
    for (int p = 0; p < 3; p++) c->r[p] = L->lora[p].r;
    c->rgu = c->r[KT_GATE] + c->r[KT_UP];
    c->nci = (L->I + KT_CHUNK_I - 1) / KT_CHUNK_I;
    c->nch = (L->H + KT_CHUNK_H - 1) / KT_CHUNK_H;
    c->ldr = L->H + 32;
}

/* Adds one run of phase `id` (ntasks tasks, wall seconds, busy thread seconds) to the profile. */
static kt_phase_stat *phase_add(kt_layer *L, int id, long ntasks, double wall, double busy) {
    kt_phase_stat *s = &L->prof.ph[id];
    s->calls++;
    s->tasks += ntasks;
    s->wall += wall;
    s->thread += wall * L->num_threads;
    s->busy += busy;
    return s;
}

/* Runs one phase (a parallel loop over ntasks tasks) and adds it to the layer's profile. */
void pass_phase(kt_pass *c, int id, long ntasks, kt_task_fn fn) {
    kt_layer *L = c->L;
    int nt = L->num_threads;
    if (ntasks <= 0) return;
    memset(L->prof_thr, 0, sizeof(kt_prof_thread) * (size_t)nt);
    double t0 = kt_now();
    double busy = kt_parallel_for(nt, ntasks, fn, c);
    kt_phase_stat *s = phase_add(L, id, ntasks, kt_now() - t0, busy);
    for (int i = 0; i < nt; i++) {
        const kt_prof_thread *t = &L->prof_thr[i];
        s->base_s += t->base_s;
        s->base_flops += t->base_flops;
        s->lora_s += t->lora_s;
        s->lora_flops += t->lora_flops;
    }
}

void pass_phase_serial(kt_layer *L, int id, double t0) {
    double wall = kt_now() - t0;
    phase_add(L, id, 1, wall, wall);
}

/* Splits every hit expert's rows into blocks of at most KT_ROW_BLOCK. */
int pass_row_blocks(kt_pass *c) {
    const kt_routing *rt = &c->L->rt;
    long n = 0;
    for (int h = 0; h < rt->nhit; h++) {
        long m = rt->offset[rt->hit[h] + 1] - rt->offset[rt->hit[h]];
        n += (m + KT_ROW_BLOCK - 1) / KT_ROW_BLOCK;
    }
    c->blk_e = kt_workspace(KT_WS_BLOCKS, sizeof(int) * 2 * (size_t)(n ? n : 1));
    if (!c->blk_e) return KT_ERR_NOMEM;
    c->blk_r0 = c->blk_e + n;
    c->nblk = 0;
    for (int h = 0; h < rt->nhit; h++) {
        int e = rt->hit[h];
        long m = rt->offset[e + 1] - rt->offset[e];
        for (long r0 = 0; r0 < m; r0 += KT_ROW_BLOCK, c->nblk++) {
            c->blk_e[c->nblk] = e;
            c->blk_r0[c->nblk] = (int)r0;
        }
    }
    return 0;
}

/* y_t = sum_j w_tj D_(t,j) (forward), or dx_t = sum_j dX_(t,j) and dw (backward). */
void task_combine(void *ctx, long task, int thread) {
    (void)thread;
    kt_pass *c = ctx;
    kt_layer *L = c->L;
    int H = L->H, k = L->rt.k, backward = L->job_kind == KT_JOB_BACKWARD;
    float *acc = kt_scratch(KT_SCR_OUT, sizeof(float) * H), *row = kt_scratch(KT_SCR_ROW, sizeof(float) * H);
    long t1, t0 = token_range(L, task, &t1);
    size_t esz = L->x_dtype == KT_BF16 ? 2 : 4;
    for (long t = t0; t < t1; t++) {
        memset(acc, 0, sizeof(float) * H);
        for (int j = 0; j < k; j++) {
            long p = L->rt.pos_of_slot[t * k + j];
            if (p >= 0) {
                float w = backward ? 1.f : L->rt.w[t * k + j];
                row_to_f32(row, c->rows + p * c->ldr, H);
                for (int h = 0; h < H; h++) acc[h] += w * row[h];
            }
            if (backward) {
                float dw = 0.f;
                for (int q = 0; p >= 0 && q < c->nci; q++) dw += c->dwpart[p * c->nci + q];
                if (L->w_dtype == KT_BF16) ((kt_bf16 *)L->dw)[t * k + j] = kt_f32_to_bf16(dw);
                else ((float *)L->dw)[t * k + j] = dw;
            }
        }
        row_out((char *)(backward ? L->dx : L->y) + (size_t)t * H * esz, L->x_dtype, acc, H);
    }
}

/* The buffer of rows quantized once per call (want: the format caches them in this pass;
 * c->aq NULL otherwise). */
int pass_alloc_act_cache(kt_pass *c, int want) {
    const kt_layer *L = c->L;
    c->aq = NULL;
    c->sa = NULL;
    if (!want) return 0;
    long npos = L->rt.npos, K = L->H > 2 * L->I ? L->H : 2 * L->I;
    c->aq = kt_workspace(KT_WS_AQ, (size_t)(npos ? npos : 1) * K);
    c->sa = kt_workspace(KT_WS_SA, sizeof(float) * (size_t)(npos ? npos : 1));
    return c->aq && c->sa ? 0 : KT_ERR_NOMEM;
}
