/* pass.h: what the forward and backward passes (pass_forward.c, pass_backward.c), the LoRA
 * machinery (pass_lora.c) and the format rows' products (fmt_*.c) share. These files are
 * compiled once per ISA (meson passes -DKT_ISA=portable|avx512|amx plus that ISA's flags):
 * GEMM_NT / GEMM_NN / IGEMM_* are that ISA's GEMMs, and every function one of them gives the
 * others is renamed per ISA here (KT_FN), so the ISA libraries link side by side.
 *
 * A pass is a short sequence of phases; a phase is a parallel loop over tasks, a task being
 * one expert (gathers, LoRA products and gradients) or one block of an expert's rows (all of
 * them, unless it has more than KT_ROW_BLOCK) x one chunk of output columns (the big GEMMs).
 * Rows of one expert are contiguous "positions" (routing.c), so each GEMM reads an
 * expert's weights once per pass. Math: design.md 2-4. */
#ifndef KTMOE_PASS_H
#define KTMOE_PASS_H
#include "moe_internal.h"
#include "gemm/gemm_int8.h"
#include "runtime/threadpool.h"
#include "vec.h"

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define KT_FN(name) CAT(CAT(name, _), KT_ISA)
#define GEMM_NT KT_FN(kt_gemm_nt)
#define GEMM_NN KT_FN(kt_gemm_nn)
#define IGEMM_NT KT_FN(kt_igemm_nt)
#define IGEMM_NN KT_FN(kt_igemm_nn)
#define KT_AI static inline __attribute__((always_inline))

enum { TOKENS_PER_TASK = 32 };

/* ---- what one pass shares between its tasks ---- */
struct kt_pass {
    kt_layer *L;
    int r[3], rgu;        /* LoRA ranks per projection (0 = none), rg + ru */
    int nci, nch;         /* column chunks over I and over H */
    kt_bf16 *rows;        /* [npos, ldr]: gathered x / dy, then down outputs / dx rows */
    long ldr;             /* H padded by one cache line: a power-of-two row stride would put
                             every row of a GEMM tile in the same L1 set */
    kt_bf16 *hh;          /* [npos, I] SiLU(G) * U */
    int *blk_e, *blk_r0;  /* row blocks: expert and first row (within the expert) */
    long nblk;
    kt_bf16 *dgu;         /* backward: [npos, 2I] dG | dU, chunk-interleaved */
    kt_bf16 *q;           /* backward: [npos, 3(rd + rg + ru)] split s dy Bd | s dG Bg | s dU Bu */
    float *dwpart;        /* backward: [npos, nci] partial router-weight gradients */
    kt_bf16 *dyb;         /* backward: [T, H] dy as bf16 */
    kt_lora_f32 grad[3];  /* backward: fp32 LoRA gradients */
    int share_grad;       /* backward: shared A (L->shared_a) with one gradient buffer: dA = (Qg + Qu)^T X once */
    int8_t *aq;           /* int8 activations (fmt cache_fwd / cache_bwd): [npos, ldq] int8 rows of the next
                             base GEMM's A, quantized once per call (NULL: each task quantizes its own rows) */
    float *sa;            /* their scales [npos] */
    long ldq;
};

/* call, timed into this thread's base or lora GEMM time with its FLOPs (the profile, ktmoe.h) */
#define PROF_GEMM(c, thread, kind, flops, call)                             \
    do {                                                                   \
        double t0_ = kt_now();                                             \
        call;                                                              \
        kt_prof_thread *pt_ = &(c)->L->prof_thr[thread];                   \
        pt_->kind##_s += kt_now() - t0_;                                   \
        pt_->kind##_flops += (double)(flops);                              \
    } while (0)

/* Positions of expert e: first one and count. */
static inline int expert_rows(const kt_layer *L, int e, long *p0) {
    *p0 = L->rt.offset[e];
    return (int)(L->rt.offset[e + 1] - *p0);
}

/* Task -> (expert, column chunk, first position p0 and row count m of its row block). */
static inline int task_block(const kt_pass *c, long task, int nchunks, int *chunk, long *p0, int *m) {
    long b = task / nchunks;
    int e = c->blk_e[b], r0 = c->blk_r0[b];
    long m_e = c->L->rt.offset[e + 1] - c->L->rt.offset[e];
    *chunk = (int)(task % nchunks);
    *p0 = c->L->rt.offset[e] + r0;
    *m = (int)(m_e - r0 < KT_ROW_BLOCK ? m_e - r0 : KT_ROW_BLOCK);
    return e;
}

static inline int task_expert(const kt_pass *c, long task, int nchunks, int *chunk) {
    *chunk = (int)(task % nchunks);
    return c->L->rt.hit[task / nchunks];
}

static inline long token_range(const kt_layer *L, long task, long *t1) {
    long t0 = task * TOKENS_PER_TASK;
    *t1 = t0 + TOKENS_PER_TASK < L->rt.T ? t0 + TOKENS_PER_TASK : L->rt.T;
    return t0;
}

/* backward: row stride of c->q, the split LoRA products of dy Bd | dG Bg | dU Bu */
static inline int qld(const kt_pass *c) { return 3 * (c->r[KT_DOWN] + c->rgu); }

/* the quantized weights of `which` (0 gate/up, 1 down) */
static inline const kt_qmat *qmat(const kt_layer *L, int which) { return which ? &L->q_down : &L->q_gate_up; }

/* ---- pass_common.c: set-up, phases, row blocks, the combine, the int8 activation cache ---- */
#define pass_setup KT_FN(kt_pass_setup)
#define pass_phase KT_FN(kt_pass_phase)
#define pass_phase_serial KT_FN(kt_pass_phase_serial)
#define pass_row_blocks KT_FN(kt_pass_row_blocks)
#define pass_alloc_act_cache KT_FN(kt_pass_alloc_act_cache)
#define task_combine KT_FN(kt_task_combine)
void pass_setup(kt_pass *c, kt_layer *L);
void pass_phase(kt_pass *c, int id, long ntasks, kt_task_fn fn);   /* one phase, profiled */
void pass_phase_serial(kt_layer *L, int id, double t0);             /* the serial start, t0 to now */
int pass_row_blocks(kt_pass *c);                                    /* 0 or KT_ERR_NOMEM */
int pass_alloc_act_cache(kt_pass *c, int want);                     /* c->aq / c->sa if want; 0 or KT_ERR_NOMEM */
void task_combine(void *ctx, long task, int thread);               /* y = sum w D, or dx = sum dX and dw */

/* ---- pass_lora.c: the split-bf16 LoRA machinery ---- */
#define same_view KT_FN(kt_same_view)
#define lora_product KT_FN(kt_lora_product)
#define split_row KT_FN(kt_split_row)
#define lora_alloc_copies KT_FN(kt_lora_alloc_copies)
#define lora_b_tasks KT_FN(kt_lora_b_tasks)
#define task_copy_lora KT_FN(kt_task_copy_lora)
#define task_grad_down_a KT_FN(kt_task_grad_down_a)
#define task_lora_grads KT_FN(kt_task_lora_grads)
#define task_export_grads KT_FN(kt_task_export_grads)
int same_view(const kt_view3 *a, const kt_view3 *b);
/* out[i] = split(s * X[i] F_hi^T) for m rows (F a factor block [3r, K]), leading dimension ldo */
void lora_product(const kt_pass *c, int thread, int m, int r, int K, const kt_bf16 *X, long ldx, const kt_bf16 *F,
                  float s, kt_bf16 *out, long ldo);
void split_row(kt_bf16 *dst, const float *a, const float *b, int r, float scale);
int lora_alloc_copies(kt_layer *L);  /* the bf16 factor copies for this call's ranks; 0 or KT_ERR_NOMEM */
long lora_b_tasks(const kt_layer *L); /* tasks of copy / export beyond the nhit expert ones */
void task_copy_lora(void *ctx, long task, int thread);
void task_grad_down_a(void *ctx, long task, int thread);
void task_lora_grads(void *ctx, long task, int thread);
void task_export_grads(void *ctx, long task, int thread);

/* ---- act_int8.c: int8 activation rows for the W8A8 rows' products ---- */
#define quantize_act KT_FN(kt_quantize_act)
#define act_rows KT_FN(kt_act_rows)
#define act_cache_rows KT_FN(kt_act_cache_rows)
/* Rows of A [m, K] (bf16, times fold[k * fstride] when fold is given) -> int8 aq [m, K] and
 * per-row scales sa (amax / 127; 0 for an all-zero row); NaN / Inf give a NaN / Inf scale. */
void quantize_act(int m, int K, const kt_bf16 *A, long lda, const float *fold, long fstride, int8_t *aq, long ldq,
                  float *sa);
/* A's m rows as int8 codes and scales: from the pass's cache (c->aq) or quantized here (times
 * fold[k * fstride] when given). Returns the codes' row stride. */
long act_rows(const kt_pass *c, int m, int K, const kt_bf16 *A, long lda, long p0, const float *fold, long fstride,
              const int8_t **aq, const float **sa);
/* c->aq / c->sa rows p0 .. p0 + m of expert e = A's rows quantized (times the W row scales of
 * `which` when fold): done once where every column chunk would repeat it. */
void act_cache_rows(kt_pass *c, int which, int e, int m, long p0, const kt_bf16 *A, long lda, int K, int fold);
#endif
