/* moe_layer.c: life cycle of a kt_layer (its format row looked up once, weights packed at
 * creation through that row: fmt.h; the arrays placed by weights.c), the profile's names, and the
 * submit/wait plumbing onto the thread pool. The passes (pass_forward.c, pass_backward.c) and
 * the format rows are compiled once per ISA and picked here by the layer's ISA; the routing of a
 * call is routing.c's. */
#include "moe_internal.h"
#include "runtime/threadpool.h"
#include <stdlib.h>
#include <string.h>

/* The row of (wformat, act_int8) on this ISA's path (fmt_table.c), or NULL. */
typedef const kt_fmt_ops *(*fmt_lookup_fn)(int wformat, int act_int8);
#define KT_FMT_ROW(name, NAME, needs, flags) kt_fmt_lookup_##name,
static const fmt_lookup_fn fmt_lookup[KT_NISA] = {KT_ISA_LIST(KT_FMT_ROW)};
#undef KT_FMT_ROW

const kt_fmt_ops *kt_fmt_of(int isa, int wformat, int act_int8) {
    return isa >= 0 && isa < KT_NISA ? fmt_lookup[isa](wformat, act_int8) : NULL;
}

/* The packed weight arrays of L's format (L->E, H, I, isa, fmt set), every one through
 * kt_weight_alloc: the layer's own memory, or pieces of a shared region (moe_region.c).
 * Returns 0, or KT_ERR_NOMEM when an allocation failed. */
int kt_layer_alloc_weights(kt_layer *L, int transposed, int group_size) {
    return L->fmt->alloc(L, transposed, group_size);
}

kt_layer *kt_layer_create(int E, int H, int I, int isa, int num_threads,
                          const void *gate, const void *up, long gate_up_expert_stride, int w_dtype,
                          const void *down, int down_dtype, int transposed,
                          int wformat, int group_size, int act_int8, int *status) {
    return kt_layer_create_ex(E, H, I, isa, num_threads, gate, up, gate_up_expert_stride, w_dtype, down, down_dtype,
                              transposed, wformat, group_size, act_int8, NULL, 0, status);
}

/* A layer without weights: its format row looked up (the one check of the format: no row,
 * *status KT_ERR_FORMAT), the profile's per-thread slots; NULL and *status on failure. */
static kt_layer *layer_new(int E, int H, int I, int isa, int num_threads, int wformat, int act_int8, int *status) {
    const kt_fmt_ops *fmt = kt_fmt_of(isa, wformat, act_int8);
    *status = fmt ? KT_ERR_NOMEM : KT_ERR_FORMAT;
    if (!fmt) return NULL;
    kt_layer *L = calloc(1, sizeof *L);
    if (!L) return NULL;
    L->E = E; L->H = H; L->I = I; L->isa = isa; L->num_threads = num_threads;
    L->fmt = fmt;
    L->wformat = wformat;
    L->act_int8 = fmt->act_int8;
    pthread_mutex_init(&L->mu, NULL);
    pthread_cond_init(&L->cv, NULL);
    L->prof_thr = kt_alloc(sizeof(kt_prof_thread) * KT_MAX_THREADS);
    if (!L->prof_thr) { kt_layer_destroy(L); return NULL; }
    memset(L->prof_thr, 0, sizeof(kt_prof_thread) * KT_MAX_THREADS);
    return L;
}

kt_layer *kt_layer_create_ex(int E, int H, int I, int isa, int num_threads,
                             const void *gate, const void *up, long gate_up_expert_stride, int w_dtype,
                             const void *down, int down_dtype, int transposed,
                             int wformat, int group_size, int act_int8, const kt_region *region, int attach,
                             int *status) {
    kt_layer *L = layer_new(E, H, I, isa, num_threads, wformat, act_int8, status);
    if (!L) return NULL;
    kt_pack_fn pack = L->fmt->pack_rows;
    if (!attach && !pack) { /* a format made from pre-quantized codes only (fp8) */
        kt_layer_destroy(L);
        *status = KT_ERR_FORMAT;
        return NULL;
    }
    if (region) L->region = *region;
    size_t per = (size_t)I * H, esz = w_dtype == KT_BF16 ? 2 : 4, desz = down_dtype == KT_BF16 ? 2 : 4;
    int ok = !kt_layer_alloc_weights(L, transposed, group_size);
    if (ok && L->prepacked && !attach) { /* one expert staged plain at a time */
        L->stage = kt_alloc(sizeof(kt_bf16) * 3 * per);
        ok = L->stage != NULL;
    }
    if (!ok || kt_pool_ensure(num_threads)) { kt_layer_destroy(L); return NULL; }
    if (attach) { /* the region already holds the packed weights */
        *status = KT_OK;
        return L;
    }
    int rc = 0; /* pack: 0, 1 (NaN / Inf met) or KT_ERR_NOMEM */
    for (int e = 0; e < E && !rc; e++) {
        const char *g = (const char *)gate + (size_t)e * gate_up_expert_stride * esz;
        const char *u = (const char *)up + (size_t)e * gate_up_expert_stride * esz;
        for (int c = 0; c * KT_CHUNK_I < I && !rc; c++) { /* gate/up rows chunk-interleaved */
            int i0 = c * KT_CHUNK_I, n = kt_chunk_n(c, KT_CHUNK_I, I);
            rc = pack(L, e, 2 * i0, n, g + (size_t)i0 * H * esz, H, w_dtype);
            if (!rc) rc = pack(L, e, 2 * i0 + n, n, u + (size_t)i0 * H * esz, H, w_dtype);
        }
        if (rc == 1) rc = KT_ERR_GATE_UP_NONFINITE;
        if (!rc) rc = pack(L, e, -1, H, (const char *)down + (size_t)e * per * desz, I, down_dtype);
        if (rc == 1) rc = KT_ERR_DOWN_NONFINITE;
        if (!rc && L->fmt->pack_done) L->fmt->pack_done(L, e);
    }
    free(L->stage);
    L->stage = NULL;
    if (rc) {
        *status = rc;
        kt_layer_destroy(L);
        return NULL;
    }
    *status = KT_OK;
    return L;
}

kt_layer *kt_layer_new_quantized(int E, int H, int I, int isa, int num_threads, int wformat, int group,
                                 int act_int8, int *status) {
    kt_layer *L = layer_new(E, H, I, isa, num_threads, wformat, act_int8, status);
    if (!L) return NULL;
    if (!L->fmt->code_bits) { /* not a quantized format */
        kt_layer_destroy(L);
        *status = KT_ERR_FORMAT;
        return NULL;
    }
    if (L->fmt->alloc(L, 0, group) || kt_pool_ensure(num_threads)) { kt_layer_destroy(L); return NULL; }
    return L;
}

size_t kt_layer_weight_bytes(const kt_layer *L) { return L->fmt->weight_bytes(L); }

int kt_layer_set_threads(kt_layer *L, int num_threads) {
    if (kt_pool_ensure(num_threads)) return -1;
    L->num_threads = num_threads;
    return 0;
}

void kt_layer_destroy(kt_layer *L) {
    if (!L) return;
    kt_wait(L);
    kt_layer_release_saved(L);
    kt_buf *bufs[] = {&L->xb, &L->gu, &L->pgu, &L->pd, &L->lora_a[0], &L->lora_a[1], &L->lora_a[2],
                      &L->lora_bt[0], &L->lora_bt[1], &L->lora_bt[2]};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) kt_buf_free(bufs[i]);
    void *weights[] = {L->wt_gate_up, L->wt_down, L->w_gate_up, L->w_down, L->q_gate_up.q, L->q_gate_up.scale,
                       L->q_down.q, L->q_down.scale};
    for (size_t i = 0; i < sizeof weights / sizeof *weights; i++) kt_weight_free(L, weights[i]);
    free(L->prof_thr);
    free(L->stage);
    pthread_mutex_destroy(&L->mu);
    pthread_cond_destroy(&L->cv);
    free(L);
}

size_t kt_saved_bytes_per_token(int H, int I, int k, int lora_ranks) {
    return sizeof(kt_bf16) * ((size_t)H + (size_t)k * (2 * (size_t)I + 3 * (size_t)lora_ranks)) /* x, gate/up, LoRA products */
           + (size_t)k * (sizeof(int) + sizeof(long) + sizeof(float));              /* routing */
}

/* ---- profile (ktmoe.h) ---- */

static const char *const phase_names[KT_NPHASE] = {
    "setup", "convert x", "copy LoRA", "gather x + X A^T", "gate/up + SiLU", "quantize Hh",
    "Hh Ad^T", "down", "combine y",
    "setup", "convert dy", "gather dy + dy Bd", "dHh + SiLU'", "dAd", "LoRA grads",
    "quantize dG|dU", "dx", "combine dx, dw", "export grads"};

const char *kt_phase_name(int phase) { return phase >= 0 && phase < KT_NPHASE ? phase_names[phase] : "?"; }
int kt_phase_is_backward(int phase) { return phase >= KT_PH_SETUP_BWD; }

void kt_layer_profile(const kt_layer *L, kt_profile *out) { *out = L->prof; }
void kt_layer_profile_reset(kt_layer *L) { memset(&L->prof, 0, sizeof L->prof); }

/* ---- jobs ---- */

typedef int (*pass_fn)(kt_layer *);
#define KT_FWD_ROW(name, NAME, needs, flags) kt_forward_##name,
#define KT_BWD_ROW(name, NAME, needs, flags) kt_backward_##name,
static const pass_fn forward_pass[KT_NISA] = {KT_ISA_LIST(KT_FWD_ROW)};
static const pass_fn backward_pass[KT_NISA] = {KT_ISA_LIST(KT_BWD_ROW)};
#undef KT_FWD_ROW
#undef KT_BWD_ROW

static void run_job(void *p) {
    kt_layer *L = p;
    int kind = L->job_kind;
    double t0 = kt_now();
    int status = kind == KT_JOB_FORWARD ? forward_pass[L->isa](L) : backward_pass[L->isa](L);
    L->prof.passes[kind]++;
    L->prof.pass_wall[kind] += kt_now() - t0;
    pthread_mutex_lock(&L->mu);
    L->status = status;
    L->busy = 0;
    pthread_cond_broadcast(&L->cv);
    pthread_mutex_unlock(&L->mu);
}

static int start(kt_layer *L) {
    L->busy = 1;
    L->status = KT_OK;
    if (kt_pool_submit(run_job, L)) { L->busy = 0; return KT_ERR_NOMEM; }
    return 0;
}

int kt_layer_busy(const kt_layer *L) { return L->busy; }
int kt_layer_has_saved(const kt_layer *L) { return L->has_saved; }

int kt_submit_forward(kt_layer *L, int T, int k, const void *x, int x_dtype,
                      const void *ids, int ids_dtype, const void *weights, int w_dtype,
                      const kt_lora *lora, int keep, void *y) {
    if (L->busy) return KT_ERR_BUSY;
    kt_layer_release_saved(L);
    L->job_kind = KT_JOB_FORWARD;
    L->x = x; L->x_dtype = x_dtype;
    L->ids = ids; L->ids_dtype = ids_dtype;
    L->weights = weights; L->w_dtype = w_dtype;
    L->keep = keep; L->y = y;
    L->rt.T = T; L->rt.k = k;
    L->has_lora = lora != NULL;
    if (lora) L->lora_in = *lora; else memset(&L->lora_in, 0, sizeof L->lora_in);
    return start(L);
}

int kt_submit_backward(kt_layer *L, const void *dy, const kt_lora *grads, void *dx, void *dw) {
    if (L->busy) return KT_ERR_BUSY;
    if (!L->has_saved) return KT_ERR_NOT_KEPT;
    L->job_kind = KT_JOB_BACKWARD;
    L->dy = dy; L->dx = dx; L->dw = dw;
    L->has_grads = grads != NULL;
    if (grads) L->grads_in = *grads; else memset(&L->grads_in, 0, sizeof L->grads_in);
    return start(L);
}

int kt_wait(kt_layer *L) {
    pthread_mutex_lock(&L->mu);
    while (L->busy) pthread_cond_wait(&L->cv, &L->mu);
    int s = L->status;
    pthread_mutex_unlock(&L->mu);
    return s;
}
