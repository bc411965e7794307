/* moe_passes.c: the forward and backward of one layer's routed experts (design.md 2-4).
 *
 * Compiled once per kernel target (meson.build's list passes -DKT_ISA=<name> plus exactly
 * that target's flags), so the same source drives each path's GEMMs (gemm.h) and the compiler
 * vectorises the elementwise loops (SiLU, reductions, conversions) for that ISA.
 *
 * A pass is a short sequence of phases; a phase is a parallel loop over tasks, a task
 * being one expert (gathers, LoRA products and gradients) or one block of an expert's
 * rows (all of them, unless it has more than KT_ROW_BLOCK) x one chunk of output columns
 * (the big GEMMs). Rows of one expert are contiguous "positions"
 * (moe_layer.c routing), so each GEMM reads an expert's weights once per pass.
 *
 * LoRA runs through the same bf16 GEMMs as the base weights, at near-fp32 precision:
 * every fp32 LoRA quantity v (the factors, copied once per call for the experts that got
 * tokens, and the rank-r products like s X A^T) is split into two bf16 numbers
 * v = hi + lo. A factor block is stored as rows [hi; hi; lo] and a product row as
 * [hi, lo, hi], so one GEMM with K = 3r computes P_hi F_hi + P_lo F_hi + P_hi F_lo, and
 * a product X F^T is one GEMM against the [hi; lo] rows (N = 2r) summed pairwise. The
 * gradients are GEMMs too (contraction over the expert's tokens), accumulated in fp32
 * buffers and added to the caller's gradients at the end. No W + BA is ever formed.
 *
 * Precision: GEMM inputs bf16, every product accumulated in fp32; per-slot down outputs
 * and dx rows are rounded to bf16 before the per-token sums. Kept for backward: x and
 * the gate/up pre-activations (bf16) and the LoRA products; Hh is recomputed.
 */
#include "moe_internal.h"
#include "gemm_int8.h"
#include "fp8.h"
#include "threadpool.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define GEMM_NT CAT(kt_gemm_nt_, KT_ISA)
#define GEMM_NN CAT(kt_gemm_nn_, KT_ISA)
#define IGEMM_NT CAT(kt_igemm_nt_, KT_ISA)
#define IGEMM_NN CAT(kt_igemm_nn_, KT_ISA)

enum { TOKENS_PER_TASK = 32 };

/* e^x for the SiLU, in plain float arithmetic so loops of it vectorise (libm's expf does
 * not without -ffast-math): 2^n * p(r), x = n ln2 + r, |r| <= ln2/2, p the degree-6 Taylor
 * polynomial (relative error about 1e-7). x is clamped to [-87, 88] (e^x stays a normal,
 * finite float); comparisons keep NaN as NaN. */
static inline float exp_f32(float x) {
    x = x < -87.f ? -87.f : x;
    x = x > 88.f ? 88.f : x;
    const float shift = 12582912.f; /* 1.5 * 2^23: adding it rounds to an integer */
    float n = (x * 1.44269504f + shift) - shift;
    float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
    float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
    uint32_t bits = (uint32_t)((int)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoid(float g) { return 1.f / (1.f + exp_f32(-g)); }

/* sum_i a[i] * b[i] with 16 independent partial sums (vectorises without reassociation) */
static float dot_f32(const float *a, const float *b, int n) {
    float part[16] = {0}, s = 0.f;
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) part[l] += a[i + l] * b[i + l];
    for (; i < n; i++) s += a[i] * b[i];
    for (int l = 0; l < 16; l++) s += part[l];
    return s;
}

static void row_to_f32(float *dst, const kt_bf16 *src, int n) {
    for (int i = 0; i < n; i++) dst[i] = kt_bf16_to_f32(src[i]);
}
static void row_to_bf16(kt_bf16 *dst, const float *src, int n, float scale) {
    for (int i = 0; i < n; i++) dst[i] = kt_f32_to_bf16(scale * src[i]);
}
static void row_out(void *dst, int dtype, const float *src, int n) {
    if (dtype == KT_F32) memcpy(dst, src, sizeof(float) * (size_t)n);
    else row_to_bf16(dst, src, n, 1.f);
}

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

static int same_view(const kt_view3 *a, const kt_view3 *b) {
    return a->data == b->data && a->dtype == b->dtype && a->stride[0] == b->stride[0] && a->stride[1] == b->stride[1]
           && a->stride[2] == b->stride[2];
}

/* ---- what one pass shares between its tasks ---- */

typedef struct {
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
    int8_t *aq;           /* W8A8: [npos, lda_q] int8 rows of the next base GEMM's A, quantized
                             once per call (NULL: each task quantizes its own rows) */
    float *sa;            /* W8A8: [npos] their scales */
    long ldq;
} pass;

static void setup(pass *c, kt_layer *L) {
    c->L = L;
    for (int p = 0; p < 3; p++) c->r[p] = L->lora[p].r;
    c->rgu = c->r[KT_GATE] + c->r[KT_UP];
    c->nci = (L->I + KT_CHUNK_I - 1) / KT_CHUNK_I;
    c->nch = (L->H + KT_CHUNK_H - 1) / KT_CHUNK_H;
    c->ldr = L->H + 32;
}

/* ---- the profile (ktmoe.h): phases and the GEMM calls inside their tasks ---- */

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
static void phase(pass *c, int id, long ntasks, kt_task_fn fn) {
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

/* The single-threaded start of a pass (routing, buffers), from t0 to now. */
static void phase_serial(kt_layer *L, int id, double t0) {
    double wall = kt_now() - t0;
    phase_add(L, id, 1, wall, wall);
}

/* call, timed into this thread's base or lora GEMM time with its FLOPs */
#define PROF_GEMM(c, thread, kind, flops, call)                             \
    do {                                                                   \
        double t0_ = kt_now();                                             \
        call;                                                              \
        kt_prof_thread *pt_ = &(c)->L->prof_thr[thread];                   \
        pt_->kind##_s += kt_now() - t0_;                                   \
        pt_->kind##_flops += (double)(flops);                              \
    } while (0)

/* Positions of expert e: first one and count. */
static int expert_rows(const kt_layer *L, int e, long *p0) {
    *p0 = L->rt.offset[e];
    return (int)(L->rt.offset[e + 1] - *p0);
}

/* Splits every hit expert's rows into blocks of at most KT_ROW_BLOCK. 0 or -2 (OOM). */
static int build_row_blocks(pass *c) {
    const kt_routing *rt = &c->L->rt;
    long n = 0;
    for (int h = 0; h < rt->nhit; h++) {
        long m = rt->offset[rt->hit[h] + 1] - rt->offset[rt->hit[h]];
        n += (m + KT_ROW_BLOCK - 1) / KT_ROW_BLOCK;
    }
    c->blk_e = kt_workspace(KT_WS_BLOCKS, sizeof(int) * 2 * (size_t)(n ? n : 1));
    if (!c->blk_e) return -2;
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

/* Task -> (expert, column chunk, first position p0 and row count m of its row block). */
static int task_block(const pass *c, long task, int nchunks, int *chunk, long *p0, int *m) {
    long b = task / nchunks;
    int e = c->blk_e[b], r0 = c->blk_r0[b];
    long m_e = c->L->rt.offset[e + 1] - c->L->rt.offset[e];
    *chunk = (int)(task % nchunks);
    *p0 = c->L->rt.offset[e] + r0;
    *m = (int)(m_e - r0 < KT_ROW_BLOCK ? m_e - r0 : KT_ROW_BLOCK);
    return e;
}

static int task_expert(const pass *c, long task, int nchunks, int *chunk) {
    *chunk = (int)(task % nchunks);
    return c->L->rt.hit[task / nchunks];
}

static long token_range(const kt_layer *L, long task, long *t1) {
    long t0 = task * TOKENS_PER_TASK;
    *t1 = t0 + TOKENS_PER_TASK < L->rt.T ? t0 + TOKENS_PER_TASK : L->rt.T;
    return t0;
}

/* ---- split-bf16 LoRA quantities (see the note at the top) ---- */

static inline void split(float v, kt_bf16 *hi, kt_bf16 *lo) {
    *hi = kt_f32_to_bf16(v);
    *lo = kt_f32_to_bf16(v - kt_bf16_to_f32(*hi));
}

/* A product row of rank r: dst = [hi, lo, hi] of scale * (a[j] + b[j]). */
static void split_row(kt_bf16 *dst, const float *a, const float *b, int r, float scale) {
    for (int j = 0; j < r; j++) {
        split(scale * (a[j] + b[j]), &dst[j], &dst[r + j]);
        dst[2 * r + j] = dst[j];
    }
}

static inline float unsplit(const kt_bf16 *row, int r, int j) {
    return kt_bf16_to_f32(row[j]) + kt_bf16_to_f32(row[r + j]);
}

/* Product rows [m, 3r] (leading dimension ld) -> [2r, m]: hi rows then lo rows of the
 * transpose, each source row i scaled by w[i] first (w may be NULL). */
static kt_bf16 *transpose_split(const kt_bf16 *src, long ld, int m, int r, const float *w, int slot) {
    kt_bf16 *t = kt_scratch(slot, sizeof(kt_bf16) * 2 * (size_t)(m ? m : 1) * r);
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
static void grad_gemm(const pass *c, int thread, int r, int n, int m, const kt_bf16 *At, const kt_bf16 *G, long ldgm,
                      float *grad, long ldg) {
    float *tmp = kt_scratch(6, sizeof(float) * 2 * (size_t)r * (n ? n : 1));
    PROF_GEMM(c, thread, lora, 4.0 * r * n * m, GEMM_NN(2 * r, n, m, At, m, G, ldgm, tmp, n, 0));
    fold(grad, ldg, tmp, r, n);
}

/* Product rows out[i] = split(s * sum_k X[i, k] F[j, k]) for m rows, F a factor block
 * [3r, K] ([hi; hi; lo]); out has leading dimension ldo. */
static void lora_product(const pass *c, int thread, int m, int r, int K, const kt_bf16 *X, long ldx, const kt_bf16 *F,
                         float s, kt_bf16 *out, long ldo) {
    float *tmp = kt_scratch(4, sizeof(float) * (size_t)(m ? m : 1) * 2 * r);
    PROF_GEMM(c, thread, lora, 4.0 * m * r * K, GEMM_NT(m, 2 * r, K, X, ldx, F + (long)r * K, K, tmp, 2 * r, 0));
    for (int i = 0; i < m; i++) split_row(out + i * ldo, tmp + (long)i * 2 * r, tmp + (long)i * 2 * r + r, r, s);
}

/* ---- products with the base weights, in every weight format (design.md 5) ----
 * base_nt: C[m, n] = A[m, :K] W_e[row0 : row0 + n, :]^T (K = the weight's columns),
 * base_nn: C[m, n] = A[m, :K] W_e[:, col0 : col0 + n]    (K = the weight's rows),
 * W being the layer's gate/up (which = 0) or down (which = 1) weights of expert e.
 *  - bf16: the GEMMs of gemm.h on the packed copy (or the opt-in transposed copy for nn).
 *  - int8 / int4 / fp8 weight-only: the block of W is expanded, one K panel at a time, into
 *    bf16 values bf16(q * scale) in per-thread scratch, then the bf16 GEMMs run on it (fp8:
 *    q is the code's exact value, fp8.h; its scale the row's copy of the block scale). The
 *    forward and the backward expand the same stored values, so the backward multiplies by
 *    exactly the weights the forward used. fp8 has no W8A8 mode (refused in Python).
 *  - W8A8: A's rows are quantized to int8 (scale amax / 127 per row) and the int8 GEMMs of
 *    gemm_int8.h give exact int32 sums, scaled afterwards in fp32. nt: scales per row of A
 *    and per W row (int8) or per (W row, group) (int4: one GEMM per group of K). nn: the W
 *    scales multiply A's columns before A is quantized (per-row scales fold into the
 *    incoming gradient); for int4 that is done once per group of output columns. No
 *    transposed or re-quantized copy of W is made. */
enum { QKP = 512 }; /* K panel of expanded weights: a multiple of every int4 group size */

static const kt_qmat *qmat(const kt_layer *L, int which) { return which ? &L->q_down : &L->q_gate_up; }

/* dst[i, j] = bf16(q * scale) of W_e[r0 + i, c0 + j] for i < nr, j < nc (c0, nc even for int4) */
#if defined(__AMX_BF16__)
/* AMX build (its CPUs all have AVX512-BF16): VCVTNEPS2BF16 rounds to nearest even like
 * kt_f32_to_bf16 for the finite values met here, one instruction per 16 values */
#include <immintrin.h>
static void expand_bf16(const kt_qmat *W, int e, int r0, int nr, int c0, int nc, kt_bf16 *dst, long ldd) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int i = 0; i < nr; i++) {
        long row = (long)e * W->rows + r0 + i;
        const float *sc = W->scale + row * W->ngroups;
        kt_bf16 *d = dst + i * ldd - c0;
        for (int j0 = c0; j0 < c0 + nc;) {
            int g = j0 / W->group, j1 = (g + 1) * W->group < c0 + nc ? (g + 1) * W->group : c0 + nc;
            __m512 s = _mm512_set1_ps(sc[g]);
            if (W->fmt == KT_W_INT8) {
                const int8_t *q = W->q + row * W->cols;
                for (int j = j0; j < j1; j += 16) {
                    __mmask16 mk = (__mmask16)(j1 - j >= 16 ? 0xffff : (1u << (j1 - j)) - 1);
                    __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, q + j))), s);
                    _mm256_mask_storeu_epi16(d + j, mk, (__m256i)_mm512_cvtneps_pbh(w));
                }
            } else if (W->fmt == KT_W_FP8) { /* blocks are multiples of 32 columns */
                const uint8_t *q = (const uint8_t *)W->q + row * W->cols;
                for (int j = j0; j < j1; j += 16) {
                    __m512 w = _mm512_mul_ps(kt_fp8x16_to_ps(_mm_loadu_si128((const __m128i *)(q + j))), s);
                    _mm256_storeu_si256((__m256i *)(d + j), (__m256i)_mm512_cvtneps_pbh(w));
                }
            } else { /* groups and chunk edges are multiples of 32 columns */
                const int8_t *q = W->q + row * (W->cols / 2);
                for (int j = j0; j < j1; j += 32) {
                    __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + j / 2)));
                    __m512 even = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28)), s);
                    __m512 odd = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 24), 28)), s);
                    __m512i both = (__m512i)_mm512_cvtne2ps_pbh(odd, even); /* [even 0..15, odd 0..15] */
                    _mm512_storeu_si512(d + j, _mm512_permutexvar_epi16(interleave, both));
                }
            }
            j0 = j1;
        }
    }
}
#else
static void expand_bf16(const kt_qmat *W, int e, int r0, int nr, int c0, int nc, kt_bf16 *dst, long ldd) {
    for (int i = 0; i < nr; i++) {
        long row = (long)e * W->rows + r0 + i;
        const float *sc = W->scale + row * W->ngroups;
        kt_bf16 *d = dst + i * ldd - c0;
        for (int j0 = c0; j0 < c0 + nc;) {
            int g = j0 / W->group, j1 = (g + 1) * W->group < c0 + nc ? (g + 1) * W->group : c0 + nc;
            float s = sc[g];
            if (W->fmt == KT_W_INT8) {
                const int8_t *q = W->q + row * W->cols;
                for (int j = j0; j < j1; j++) d[j] = kt_f32_to_bf16((float)q[j] * s);
            } else if (W->fmt == KT_W_FP8) { /* blocks are multiples of 32 columns */
                const uint8_t *q = (const uint8_t *)W->q + row * W->cols;
#if defined(__AVX512F__)
                __m512 sv = _mm512_set1_ps(s);
                for (int j = j0; j < j1; j += 16)
                    _mm256_storeu_si256((__m256i *)(d + j),
                                        kt_ps_to_bf16x16(_mm512_mul_ps(kt_fp8x16_to_ps(_mm_loadu_si128((const __m128i *)(q + j))), sv)));
#else
                for (int j = j0; j < j1; j++) d[j] = kt_f32_to_bf16(kt_fp8_to_f32(q[j]) * s);
#endif
            } else {
                const int8_t *q = W->q + row * (W->cols / 2);
                for (int j = j0 / 2; j < j1 / 2; j++) {
                    int8_t b = q[j];
                    d[2 * j] = kt_f32_to_bf16((float)((int8_t)(b << 4) >> 4) * s);
                    d[2 * j + 1] = kt_f32_to_bf16((float)(b >> 4) * s);
                }
            }
            j0 = j1;
        }
    }
}

#endif

/* dst[i, j] = q of W_e[r0 + i, c0 + j] as int8 (int4 values unpacked; c0, nc even) */
static void expand_int8(const kt_qmat *W, int e, int r0, int nr, int c0, int nc, int8_t *dst, long ldd) {
    for (int i = 0; i < nr; i++) {
        long row = (long)e * W->rows + r0 + i;
        if (W->fmt == KT_W_INT8) {
            memcpy(dst + i * ldd, W->q + row * W->cols + c0, (size_t)nc);
            continue;
        }
        const int8_t *q = W->q + row * (W->cols / 2) + c0 / 2;
        int8_t *d = dst + i * ldd;
        for (int j = 0; j < nc / 2; j++) {
            d[2 * j] = (int8_t)((int8_t)(q[j] << 4) >> 4);
            d[2 * j + 1] = (int8_t)(q[j] >> 4);
        }
    }
}

static inline float round_even(float v) {
    const float shift = 12582912.f; /* 1.5 * 2^23: exact round-half-even for |v| < 2^22 */
    return (v + shift) - shift;
}

/* Rows of A [m, K] (bf16, times fold[k * fstride] when fold is given) -> int8 aq [m, K] and
 * per-row scales sa (amax / 127; 0 for an all-zero row). NaN / Inf give a NaN / Inf scale,
 * so they propagate into the products. */
static void quantize_act(int m, int K, const kt_bf16 *A, long lda, const float *fold, long fstride,
                         int8_t *aq, long ldq, float *sa) {
    float *v = kt_scratch(11, sizeof(float) * (size_t)(K + 16));
    for (int i = 0; i < m; i++) {
        const kt_bf16 *a = A + i * lda;
        /* one pass: the values (times the fold), their amax and a finiteness check (v * 0 is
         * NaN for NaN and Inf), in 16 lanes so that it vectorises */
        float lane[16] = {0}, chk[16] = {0}, amax = 0.f, bad = 0.f;
        int k = 0;
        for (; k + 16 <= K; k += 16)
            for (int l = 0; l < 16; l++) {
                float x = kt_bf16_to_f32(a[k + l]) * (fold ? fold[(k + l) * fstride] : 1.f);
                v[k + l] = x;
                float ax = x < 0 ? -x : x;
                lane[l] = ax > lane[l] ? ax : lane[l];
                chk[l] += x * 0.f;
            }
        for (; k < K; k++) {
            float x = kt_bf16_to_f32(a[k]) * (fold ? fold[k * fstride] : 1.f);
            v[k] = x;
            float ax = x < 0 ? -x : x;
            amax = ax > amax ? ax : amax;
            bad += x * 0.f;
        }
        for (int l = 0; l < 16; l++) {
            amax = lane[l] > amax ? lane[l] : amax;
            bad += chk[l];
        }
        float s = bad == 0.f ? amax / 127.f : bad; /* NaN / Inf in the row: a NaN scale */
        sa[i] = s;
        int8_t *q = aq + (long)i * ldq;
        if (!(s > 0.f)) { /* zero row, or NaN: the scale carries it */
            memset(q, 0, (size_t)K);
            continue;
        }
        /* times 1 / s rather than a division per value (4x fewer cycles): a code may differ
         * by one from reference/quant.py's v / s where that lands within an ulp of a half */
        float inv = 1.f / s;
        for (k = 0; k < K; k++) {
            float r = round_even(v[k] * inv);
            r = r > 127.f ? 127.f : r;
            r = r < -127.f ? -127.f : r;
            q[k] = (int8_t)r;
        }
    }
}

/* ---- weight-only products for experts with few rows (decode-like, memory bound) ----
 * With at most QSMALL rows the expansion into bf16 panels costs more than the product, so
 * these loops read each stored code once, convert it in registers and multiply in fp32:
 *   nt: C[i, j] = sum_g scale[j, g] * sum_{k in g} A[i, k] q[j, k]
 *   nn: C[i, j] = sum_k (A[i, k] scale[k, g(j)]) q[k, j]
 * i.e. the weights q * scale without the bf16 rounding of the panel path (a difference
 * below 2^-9 of each weight; an expert has the same rows in forward and backward, so both
 * use the same path). Specialised per row count so that the loops vectorise. */
enum { QSMALL = 4, QPREFETCH_NT = 2 };

#define KT_AI static inline __attribute__((always_inline))

/* out[i] = sum_k a[i * lda + k] * code(k) over n values of one stored row (fmt: the kt_qmat's
 * format; fp8 codes decode to their exact value, fp8.h). For int4, a is stored per 32 values
 * as 16 even then 16 odd ones (see small_nt) and n is a multiple of 32, as it is for fp8. */
#if defined(__AVX512F__)
#include <immintrin.h>
KT_AI void qdot(int M, const float *a, long lda, const int8_t *q, int fmt, int n, float *out) {
    __m512 p[QSMALL][2];
    for (int i = 0; i < QSMALL; i++) p[i][0] = p[i][1] = _mm512_setzero_ps();
    int k = 0;
    if (fmt == KT_W_FP8) {
        for (; k + 32 <= n; k += 32) {
            __m512 w0 = kt_fp8x16_to_ps_div256(_mm_loadu_si128((const __m128i *)(q + k)));
            __m512 w1 = kt_fp8x16_to_ps_div256(_mm_loadu_si128((const __m128i *)(q + k + 16)));
            for (int i = 0; i < M; i++) {
                p[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(a + i * lda + k), w0, p[i][0]);
                p[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(a + i * lda + k + 16), w1, p[i][1]);
            }
        }
    } else if (fmt == KT_W_INT4) {
        for (; k + 32 <= n; k += 32) {
            __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + k / 2)));
            __m512 w0 = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28));
            __m512 w1 = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 24), 28));
            for (int i = 0; i < M; i++) {
                p[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(a + i * lda + k), w0, p[i][0]);
                p[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(a + i * lda + k + 16), w1, p[i][1]);
            }
        }
    } else {
        for (; k + 32 <= n; k += 32) {
            __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + k))));
            __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + k + 16))));
            for (int i = 0; i < M; i++) {
                p[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(a + i * lda + k), w0, p[i][0]);
                p[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(a + i * lda + k + 16), w1, p[i][1]);
            }
        }
        for (; k < n; k += 16) {
            __mmask16 mk = (__mmask16)(n - k >= 16 ? 0xffff : (1u << (n - k)) - 1);
            __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, q + k)));
            for (int i = 0; i < M; i++)
                p[i][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, a + i * lda + k), w, p[i][0]);
        }
    }
    float unit = fmt == KT_W_FP8 ? 256.f : 1.f; /* fp8: the decoded values were code / 256 (exact) */
    for (int i = 0; i < M; i++) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(p[i][0], p[i][1])) * unit;
}
#else
KT_AI void qdot(int M, const float *a, long lda, const int8_t *q, int fmt, int n, float *out) {
    for (int i = 0; i < M; i++) {
        float part[16] = {0}, t = 0.f;
        const float *ai = a + i * lda;
        int k = 0;
        if (fmt == KT_W_FP8) {
            for (; k + 16 <= n; k += 16)
                for (int l = 0; l < 16; l++) part[l] += ai[k + l] * kt_fp8_to_f32((uint8_t)q[k + l]);
        } else if (fmt == KT_W_INT4) {
            for (; k + 32 <= n; k += 32)
                for (int l = 0; l < 16; l++) {
                    int8_t b = q[k / 2 + l];
                    part[l] += ai[k + l] * (float)(int8_t)((int8_t)(b << 4) >> 4) + ai[k + 16 + l] * (float)(int8_t)(b >> 4);
                }
        } else {
            for (; k + 16 <= n; k += 16)
                for (int l = 0; l < 16; l++) part[l] += ai[k + l] * (float)q[k + l];
            for (; k < n; k++) t += ai[k] * (float)q[k];
        }
        for (int l = 0; l < 16; l++) t += part[l];
        out[i] = t;
    }
}
#endif

KT_AI void small_nt_m(int M, const kt_qmat *W, int e, int row0, int n, const float *a, long lda,
                      float *C, long ldc) {
    int int4 = W->fmt == KT_W_INT4, cols = W->cols;
    for (int j = 0; j < n; j++) {
        long row = (long)e * W->rows + row0 + j;
        const float *sc = W->scale + row * W->ngroups;
        const int8_t *q = W->q + row * (int4 ? cols / 2 : cols);
#if defined(__AVX512F__)
        if (j + QPREFETCH_NT < n) { /* a row a few rows ahead: keeps more misses in flight */
            long bytes = int4 ? cols / 2 : cols;
            for (long b = 0; b < bytes; b += 64) _mm_prefetch((const char *)q + QPREFETCH_NT * bytes + b, _MM_HINT_T0);
        }
#endif
        float acc[QSMALL] = {0}, part[QSMALL];
        for (int g = 0; g < W->ngroups; g++) {
            int k0 = g * W->group;
            qdot(M, a + k0, lda, q + (int4 ? k0 / 2 : k0), W->fmt, W->group, part);
            for (int i = 0; i < M; i++) acc[i] += sc[g] * part[i];
        }
        for (int i = 0; i < M; i++) C[i * ldc + j] = acc[i];
    }
}

static void small_nt(const kt_qmat *W, int e, int m, int row0, int n, const kt_bf16 *A, long lda, float *C, long ldc) {
    int K = W->cols;
    float *a = kt_scratch(9, sizeof(float) * (size_t)QSMALL * K);
    for (int i = 0; i < m; i++) {
        if (W->fmt == KT_W_INT4) /* per 32 values: even ones, then odd ones (qdot's order) */
            for (int k = 0; k < K; k += 32)
                for (int l = 0; l < 16; l++) {
                    a[(long)i * K + k + l] = kt_bf16_to_f32(A[i * lda + k + 2 * l]);
                    a[(long)i * K + k + 16 + l] = kt_bf16_to_f32(A[i * lda + k + 2 * l + 1]);
                }
        else
            row_to_f32(a + (long)i * K, A + i * lda, K);
    }
    switch (m) {
    case 1: small_nt_m(1, W, e, row0, n, a, K, C, ldc); break;
    case 2: small_nt_m(2, W, e, row0, n, a, K, C, ldc); break;
    case 3: small_nt_m(3, W, e, row0, n, a, K, C, ldc); break;
    default: small_nt_m(4, W, e, row0, n, a, K, C, ldc); break;
    }
}

/* C [M, n] = sum over the K stored rows k of (A[i, k] * scale[k, g(j)]) * code[k, col0 + j] */
#if defined(__AVX512F__)
/* codes [col0 + j0, + 16 * nv) of one stored row as fp32 vectors: int8 one per lane; int4 the
 * even columns in w[2v], the odd ones in w[2v + 1] (32 codes per pair) */
enum { QPREFETCH = 6 };

KT_AI __m512 code8(const int8_t *q, int j, __mmask16 mk) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, q + j)));
}

KT_AI void small_nn_m(int M, const kt_qmat *W, int e, int col0, int n, const kt_bf16 *A, long lda,
                      float *C, long ldc) {
    int int4 = W->fmt == KT_W_INT4, cols = W->cols, K = W->rows;
    /* accumulators [M][n] in L1 (int4: per 32 columns, 16 even then 16 odd ones) */
    float *acc = kt_scratch(9, sizeof(float) * (size_t)QSMALL * (n + 32));
    int nv = (n + 15) / 16;
    for (int i = 0; i < M * nv * 16; i++) acc[i] = 0.f;
    for (int k = 0; k < K; k++) {
        long row = (long)e * K + k;
        const float *sc = W->scale + row * W->ngroups;
        float ak[QSMALL];
        for (int i = 0; i < M; i++) ak[i] = kt_bf16_to_f32(A[i * lda + k]);
        if (k + QPREFETCH < K) { /* the same columns QPREFETCH rows ahead: keeps more misses in flight */
            const char *ahead = (const char *)W->q + (row + QPREFETCH) * (int4 ? cols / 2 : cols) + (int4 ? col0 / 2 : col0);
            for (int b = 0; b < (int4 ? n / 2 : n); b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
        }
        if (W->fmt == KT_W_FP8) { /* one scale per block of `group` columns, a multiple of 32 */
            const uint8_t *q = (const uint8_t *)W->q + row * cols + col0;
            for (int j = 0; j < n; j += 16) {
                __m512 w = kt_fp8x16_to_ps_div256(_mm_loadu_si128((const __m128i *)(q + j)));
                float s = sc[(col0 + j) / W->group] * 256.f; /* w is code / 256: exact powers of two */
                for (int i = 0; i < M; i++) {
                    float *c = acc + (long)i * nv * 16 + j;
                    _mm512_storeu_ps(c, _mm512_fmadd_ps(_mm512_set1_ps(ak[i] * s), w, _mm512_loadu_ps(c)));
                }
            }
            continue;
        }
        if (!int4) {
            const int8_t *q = W->q + row * cols + col0;
            __m512 av[QSMALL];
            for (int i = 0; i < M; i++) av[i] = _mm512_set1_ps(ak[i] * sc[0]);
            for (int v = 0; v < nv; v++) {
                int j = 16 * v;
                __m512 w = code8(q, j, (__mmask16)(n - j >= 16 ? 0xffff : (1u << (n - j)) - 1));
                for (int i = 0; i < M; i++) {
                    float *c = acc + (long)i * nv * 16 + j;
                    _mm512_storeu_ps(c, _mm512_fmadd_ps(av[i], w, _mm512_loadu_ps(c)));
                }
            }
            continue;
        }
        const int8_t *q = W->q + row * (cols / 2) + col0 / 2;
        for (int j = 0; j < n; j += 32) { /* groups are multiples of 32 columns */
            int g = (col0 + j) / W->group;
            __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + j / 2)));
            __m512 w0 = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28));
            __m512 w1 = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 24), 28));
            for (int i = 0; i < M; i++) {
                __m512 as = _mm512_set1_ps(ak[i] * sc[g]);
                float *c = acc + (long)i * nv * 16 + j;
                _mm512_storeu_ps(c, _mm512_fmadd_ps(as, w0, _mm512_loadu_ps(c)));
                _mm512_storeu_ps(c + 16, _mm512_fmadd_ps(as, w1, _mm512_loadu_ps(c + 16)));
            }
        }
    }
    for (int i = 0; i < M; i++) {
        const float *a = acc + (long)i * nv * 16;
        for (int j = 0; j < n; j++)
            C[i * ldc + j] = int4 ? a[(j & ~31) + (j & 1) * 16 + (j & 31) / 2] : a[j];
    }
}
#else
KT_AI void small_nn_m(int M, const kt_qmat *W, int e, int col0, int n, const kt_bf16 *A, long lda,
                      float *C, long ldc) {
    int int4 = W->fmt == KT_W_INT4, cols = W->cols, K = W->rows;
    float *acc = kt_scratch(9, sizeof(float) * (size_t)QSMALL * (n + 32));
    for (int i = 0; i < M * n; i++) acc[i] = 0.f;
    for (int k = 0; k < K; k++) {
        long row = (long)e * K + k;
        const float *sc = W->scale + row * W->ngroups;
        for (int i = 0; i < M; i++) {
            float ak = kt_bf16_to_f32(A[i * lda + k]);
            float *c = acc + (long)i * n;
            if (W->fmt == KT_W_FP8) {
                const uint8_t *q = (const uint8_t *)W->q + row * cols + col0;
                for (int j = 0; j < n; j++) c[j] += ak * sc[(col0 + j) / W->group] * kt_fp8_to_f32(q[j]);
                continue;
            }
            if (!int4) {
                const int8_t *q = W->q + row * cols + col0;
                float as = ak * sc[0];
                for (int j = 0; j < n; j++) c[j] += as * (float)q[j];
                continue;
            }
            const int8_t *q = W->q + row * (cols / 2) + col0 / 2;
            for (int j = 0; j < n; j += 2) {
                float as = ak * sc[(col0 + j) / W->group];
                c[j] += as * (float)(int8_t)((int8_t)(q[j / 2] << 4) >> 4);
                c[j + 1] += as * (float)(int8_t)(q[j / 2] >> 4);
            }
        }
    }
    for (int i = 0; i < M; i++)
        for (int j = 0; j < n; j++) C[i * ldc + j] = acc[(long)i * n + j];
}
#endif

static void small_nn(const kt_qmat *W, int e, int m, int col0, int n, const kt_bf16 *A, long lda, float *C, long ldc) {
    switch (m) {
    case 1: small_nn_m(1, W, e, col0, n, A, lda, C, ldc); break;
    case 2: small_nn_m(2, W, e, col0, n, A, lda, C, ldc); break;
    case 3: small_nn_m(3, W, e, col0, n, A, lda, C, ldc); break;
    default: small_nn_m(4, W, e, col0, n, A, lda, C, ldc); break;
    }
}

/* Backward nn tasks of a block this small read whole rows of the weights (one task per
 * block instead of one per column chunk): the weights then stream sequentially from memory
 * instead of as short strided slices, which is what bounds these memory-bound products. */
static int whole_rows(const kt_layer *L, int m) {
    return !L->act_int8 && m <= QSMALL;
}

/* Weight-only product with quantized W: nt (C = A W_e[off : off + n, :]^T) or nn
 * (C = A W_e[:, off : off + n]); blocks of at most QSMALL rows in registers, others on
 * bf16 panels expanded one K panel at a time. */
static void weight_only(const kt_qmat *W, int nt, int e, int m, int off, int n, int K, const kt_bf16 *A, long lda,
                        float *C, long ldc) {
    if (m <= QSMALL) {
        if (m) (nt ? small_nt : small_nn)(W, e, m, off, n, A, lda, C, ldc);
        return;
    }
    kt_bf16 *wb = kt_scratch(8, sizeof(kt_bf16) * (size_t)n * QKP);
    for (int k0 = 0; k0 < K; k0 += QKP) {
        int kp = K - k0 < QKP ? K - k0 : QKP;
        if (nt) {
            expand_bf16(W, e, off, n, k0, kp, wb, kp);
            GEMM_NT(m, n, kp, A + k0, lda, wb, kp, C, ldc, k0 > 0);
        } else {
            expand_bf16(W, e, k0, kp, off, n, wb, n);
            GEMM_NN(m, n, kp, A + k0, lda, wb, n, C, ldc, k0 > 0);
        }
    }
}

/* W8A8: A's m rows as int8 codes and scales, from the call's cache (c->aq, rows quantized
 * once for every column chunk) or quantized here (times fold[k * fstride] when given).
 * Returns the codes' row stride. */
static long act_rows(const pass *c, int m, int K, const kt_bf16 *A, long lda, long p0, const float *fold,
                     long fstride, const int8_t **aq, const float **sa) {
    if (c->aq) {
        *aq = c->aq + p0 * c->ldq;
        *sa = c->sa + p0;
        return c->ldq;
    }
    int8_t *t = kt_scratch(9, (size_t)(m ? m : 1) * K);
    float *ts = kt_scratch(10, sizeof(float) * (size_t)(m ? m : 1));
    quantize_act(m, K, A, lda, fold, fstride, t, K, ts);
    *aq = t;
    *sa = ts;
    return K;
}

static void base_nt(const pass *c, int which, int e, int m, int row0, int n, const kt_bf16 *A, long lda,
                    long p0, float *C, long ldc) {
    const kt_layer *L = c->L;
    int H = L->H, I = L->I, K = which ? I : H;
    if (L->wformat == KT_W_BF16) {
#if defined(__AMX_BF16__)
        if (L->prepacked) { /* the tile layout, read in place (row0 is a multiple of 32: chunk starts) */
            const kt_bf16 *Wp = which ? L->w_down + L->pre_dn * e : L->w_gate_up + L->pre_gu * e;
            if (kt_gemm_nt_pre_amx(m, n, A, lda, Wp, which ? H : 2 * I, K, row0, C, ldc)) c->L->oom = 1;
            return;
        }
#endif
        const kt_bf16 *W = which ? L->w_down + (long)e * H * I : L->w_gate_up + (long)e * 2 * I * H;
        GEMM_NT(m, n, K, A, lda, W + (long)row0 * K, K, C, ldc, 0);
        return;
    }
    const kt_qmat *W = qmat(L, which);
    if (!L->act_int8) {
        weight_only(W, 1, e, m, row0, n, K, A, lda, C, ldc);
        return;
    }
    const int8_t *aq;
    const float *sa;
    long ldq = act_rows(c, m, K, A, lda, p0, NULL, 0, &aq, &sa);
    int32_t *acc = kt_scratch(2, sizeof(int32_t) * (size_t)(m ? m : 1) * n);
    const float *sw = W->scale + ((long)e * W->rows + row0) * W->ngroups;
    if (W->fmt == KT_W_INT8) {
        IGEMM_NT(m, n, K, aq, ldq, W->q + ((long)e * W->rows + row0) * K, K, acc, n, 0);
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++) C[i * ldc + j] = sa[i] * sw[j] * (float)acc[(long)i * n + j];
        return;
    }
    int8_t *wq = kt_scratch(8, (size_t)n * QKP);
    for (int i = 0; i < m; i++) memset(C + i * ldc, 0, sizeof(float) * (size_t)n);
    for (int k0 = 0; k0 < K; k0 += QKP) {
        int kp = K - k0 < QKP ? K - k0 : QKP;
        expand_int8(W, e, row0, n, k0, kp, wq, kp);
        for (int g0 = k0; g0 < k0 + kp; g0 += W->group) {
            int g = g0 / W->group;
            IGEMM_NT(m, n, W->group, aq + g0, ldq, wq + (g0 - k0), kp, acc, n, 0);
            for (int i = 0; i < m; i++)
                for (int j = 0; j < n; j++)
                    C[i * ldc + j] += sa[i] * sw[(long)j * W->ngroups + g] * (float)acc[(long)i * n + j];
        }
    }
}

static void base_nn(const pass *c, int which, int e, int m, int col0, int n, const kt_bf16 *A, long lda,
                    long p0, float *C, long ldc) {
    const kt_layer *L = c->L;
    int H = L->H, I = L->I, K = which ? H : 2 * I, cols = which ? I : H;
    if (L->wformat == KT_W_BF16) {
        const kt_bf16 *WT = which ? L->wt_down : L->wt_gate_up;
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
        return;
    }
    const kt_qmat *W = qmat(L, which);
    if (!L->act_int8) {
        weight_only(W, 0, e, m, col0, n, K, A, lda, C, ldc);
        return;
    }
    int32_t *acc = kt_scratch(2, sizeof(int32_t) * (size_t)(m ? m : 1) * n);
    const float *sw = W->scale + (long)e * W->rows * W->ngroups; /* [K, ngroups] */
    if (W->fmt == KT_W_INT8) { /* one group: A's rows folded with W's row scales and quantized once */
        const int8_t *aq;
        const float *sa;
        long ldq = act_rows(c, m, K, A, lda, p0, sw, 1, &aq, &sa);
        IGEMM_NN(m, n, K, aq, ldq, W->q + (long)e * K * cols + col0, cols, acc, n, 0);
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++) C[i * ldc + j] = sa[i] * (float)acc[(long)i * n + j];
        return;
    }
    /* int4: the scales change with the output column group, so A is folded and quantized once
     * per group (each group of a row block is handled by exactly one task: no repetition) */
    int8_t *aq = kt_scratch(9, (size_t)(m ? m : 1) * K);
    float *sa = kt_scratch(10, sizeof(float) * (size_t)(m ? m : 1));
    int8_t *wq = kt_scratch(8, (size_t)K * n);
    expand_int8(W, e, 0, K, col0, n, wq, n);
    for (int j0 = 0; j0 < n;) {
        int g = (col0 + j0) / W->group, j1 = (g + 1) * W->group - col0;
        j1 = j1 < n ? j1 : n;
        quantize_act(m, K, A, lda, sw + g, W->ngroups, aq, K, sa);
        IGEMM_NN(m, j1 - j0, K, aq, K, wq + j0, n, acc, n, 0);
        for (int i = 0; i < m; i++)
            for (int j = j0; j < j1; j++) C[i * ldc + j] = sa[i] * (float)acc[(long)i * n + j - j0];
        j0 = j1;
    }
}

/* W8A8: c->aq / c->sa rows p0 .. p0 + m of expert e = A's rows quantized (times the W row
 * scales of `which` when fold). Used where every column chunk would repeat the same work. */
static void quantize_block(pass *c, int which, int e, int m, long p0, const kt_bf16 *A, long lda, int K, int fold) {
    const kt_qmat *W = qmat(c->L, which);
    quantize_act(m, K, A, lda, fold ? W->scale + (long)e * W->rows * W->ngroups : NULL, W->ngroups,
                 c->aq + p0 * c->ldq, c->ldq, c->sa + p0);
}

/* ---- forward ---- */

static void task_convert_x(void *ctx, long task, int thread) {
    (void)thread;
    kt_layer *L = ((pass *)ctx)->L;
    long t1, t0 = token_range(L, task, &t1);
    size_t n = (size_t)(t1 - t0) * L->H, off = (size_t)t0 * L->H;
    kt_bf16 *xb = L->xb.p;
    if (L->x_dtype == KT_BF16) memcpy(xb + off, (const kt_bf16 *)L->x + off, n * sizeof(kt_bf16));
    else row_to_bf16(xb + off, (const float *)L->x + off, (int)n, 1.f);
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
static long b_tasks(const kt_layer *L) {
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

static void task_copy_lora(void *ctx, long task, int thread) {
    (void)thread;
    kt_layer *L = ((pass *)ctx)->L;
    long nhit = L->rt.nhit;
    if (task < nhit) {
        int e = L->rt.hit[task];
        float *row = kt_scratch(7, sizeof(float) * (size_t)(L->H > L->I ? L->H : L->I));
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
    float *blk = kt_scratch(7, sizeof(float) * (size_t)nhit * r * BLOCK_O);
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

static void task_gather_x(void *ctx, long task, int thread) {
    pass *c = ctx;
    kt_layer *L = c->L;
    int e = L->rt.hit[task], H = L->H;
    long p0;
    int m = expert_rows(L, e, &p0);
    const kt_bf16 *xb = L->xb.p;
    for (int i = 0; i < m; i++)
        memcpy(c->rows + (p0 + i) * c->ldr, xb + (long)(L->rt.slot_of_pos[p0 + i] / L->rt.k) * H, sizeof(kt_bf16) * H);
    if (c->aq) quantize_block(c, 0, e, m, p0, c->rows + p0 * c->ldr, c->ldr, H, 0);
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
    pass *c = ctx;
    kt_layer *L = c->L;
    int chunk, m, H = L->H, I = L->I;
    long p0;
    int e = task_block(c, task, c->nci, &chunk, &p0, &m);
    int n = kt_chunk_n(chunk, KT_CHUNK_I, I), i0 = chunk * KT_CHUNK_I;
    float *gu = kt_scratch(0, sizeof(float) * 2 * (size_t)m * n); /* [m, 2n]: gate | up */
    PROF_GEMM(c, thread, base, 4.0 * m * n * H, base_nt(c, 0, e, m, 2 * i0, 2 * n, c->rows + p0 * c->ldr, c->ldr, p0, gu, 2 * n));
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
    pass *c = ctx;
    int e = c->L->rt.hit[task], I = c->L->I;
    long p0;
    int m = expert_rows(c->L, e, &p0);
    quantize_block(c, 1, e, m, p0, c->hh + p0 * I, I, I, 0);
}

static void task_quantize_dgu(void *ctx, long task, int thread) {
    (void)thread;
    pass *c = ctx;
    int e = c->L->rt.hit[task], I = c->L->I;
    long p0;
    int m = expert_rows(c->L, e, &p0);
    quantize_block(c, 0, e, m, p0, c->dgu + p0 * 2 * I, 2 * I, 2 * I, 1);
}

static void task_down_lora(void *ctx, long task, int thread) {
    pass *c = ctx;
    kt_layer *L = c->L;
    int e = L->rt.hit[task], I = L->I, rd = c->r[KT_DOWN];
    long p0;
    int m = expert_rows(L, e, &p0);
    lora_product(c, thread, m, rd, I, c->hh + p0 * I, I, L->lora[KT_DOWN].A + (long)e * 3 * rd * I, L->scale,
                 (kt_bf16 *)L->pd.p + p0 * 3 * rd, 3 * rd);
}

static void task_down(void *ctx, long task, int thread) {
    pass *c = ctx;
    kt_layer *L = c->L;
    int chunk, m, H = L->H, I = L->I, rd = c->r[KT_DOWN];
    long p0;
    int e = task_block(c, task, c->nch, &chunk, &p0, &m);
    int n = kt_chunk_n(chunk, KT_CHUNK_H, H), h0 = chunk * KT_CHUNK_H;
    float *d = kt_scratch(0, sizeof(float) * (size_t)m * n);
    PROF_GEMM(c, thread, base, 2.0 * m * n * I, base_nt(c, 1, e, m, h0, n, c->hh + p0 * I, I, p0, d, n));
    if (rd) PROF_GEMM(c, thread, lora, 6.0 * m * n * rd,
                      GEMM_NN(m, n, 3 * rd, (const kt_bf16 *)L->pd.p + p0 * 3 * rd, 3 * rd,
                              L->lora[KT_DOWN].BT + (long)e * 3 * rd * H + h0, H, d, n, 1));
    for (int i = 0; i < m; i++) row_to_bf16(c->rows + (p0 + i) * c->ldr + h0, d + (size_t)i * n, n, 1.f);
}

/* y_t = sum_j w_tj D_(t,j) (forward), or dx_t = sum_j dX_(t,j) and dw (backward). */
static void task_combine(void *ctx, long task, int thread) {
    (void)thread;
    pass *c = ctx;
    kt_layer *L = c->L;
    int H = L->H, k = L->rt.k, backward = L->job_kind == 1;
    float *acc = kt_scratch(0, sizeof(float) * H), *row = kt_scratch(1, sizeof(float) * H);
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

/* W8A8: the buffer of rows quantized once per call (c->aq NULL otherwise). 0 or -2. */
static int alloc_quantized_rows(pass *c) {
    const kt_layer *L = c->L;
    c->aq = NULL;
    c->sa = NULL;
    if (!L->act_int8) return 0;
    long npos = L->rt.npos, K = L->H > 2 * L->I ? L->H : 2 * L->I;
    c->aq = kt_workspace(KT_WS_AQ, (size_t)(npos ? npos : 1) * K);
    c->sa = kt_workspace(KT_WS_SA, sizeof(float) * (size_t)(npos ? npos : 1));
    return c->aq && c->sa ? 0 : -2;
}

/* The bf16 LoRA copies (layer buffers) for this call's ranks. */
static int alloc_lora_copies(kt_layer *L) {
    for (int p = 0; p < 3; p++) {
        int r = L->has_lora ? L->lora_in.proj[p].r : 0, in = p == KT_DOWN ? L->I : L->H;
        int out = p == KT_DOWN ? L->H : L->I;
        L->lora[p] = (kt_lora_bf16){.r = r, .in = in, .out = out};
        if (!r) continue;
        L->lora[p].A = p == KT_UP && L->shared_a ? L->lora[KT_GATE].A
                                                  : kt_buf_get(&L->lora_a[p], sizeof(kt_bf16) * 3 * (size_t)L->E * r * in);
        L->lora[p].BT = kt_buf_get(&L->lora_bt[p], sizeof(kt_bf16) * 3 * (size_t)L->E * r * out);
        if (!L->lora[p].A || !L->lora[p].BT) return -2;
    }
    return 0;
}

int CAT(kt_forward_, KT_ISA)(kt_layer *L) {
    int E = L->E, H = L->H, I = L->I, T = L->rt.T, k = L->rt.k;
    double t0 = kt_now();
    L->oom = 0;
    int rc = kt_routing_build(&L->rt, E, T, k, L->ids, L->ids_dtype, L->weights, L->w_dtype);
    if (rc) return rc;
    L->scale = L->has_lora ? L->lora_in.scale : 0.f;
    const kt_lora_proj *pg = &L->lora_in.proj[KT_GATE], *pu = &L->lora_in.proj[KT_UP];
    L->shared_a = L->has_lora && pg->r && pg->r == pu->r && same_view(&pg->A, &pu->A);
    pass c;
    if ((rc = alloc_lora_copies(L))) goto done;
    setup(&c, L);
    long npos = L->rt.npos, nhit = L->rt.nhit;
    c.rows = kt_workspace(KT_WS_ROWS, sizeof(kt_bf16) * (size_t)npos * c.ldr);
    c.hh = kt_workspace(KT_WS_HH, sizeof(kt_bf16) * (size_t)npos * I);
    int ok = c.rows && c.hh && kt_buf_get(&L->xb, sizeof(kt_bf16) * (size_t)T * H)
             && kt_buf_get(&L->pgu, sizeof(kt_bf16) * 3 * (size_t)npos * c.rgu)
             && kt_buf_get(&L->pd, sizeof(kt_bf16) * 3 * (size_t)npos * c.r[KT_DOWN])
             && (!L->keep || kt_buf_get(&L->gu, sizeof(kt_bf16) * (size_t)npos * 2 * I));
    if (!ok || build_row_blocks(&c) || alloc_quantized_rows(&c)) { rc = -2; goto done; }
    c.ldq = H;
    long ntok = (T + TOKENS_PER_TASK - 1) / TOKENS_PER_TASK;
    phase_serial(L, KT_PH_SETUP_FWD, t0);
    phase(&c, KT_PH_CONVERT_X, ntok, task_convert_x);
    if (L->has_lora) phase(&c, KT_PH_COPY_LORA, nhit + b_tasks(L), task_copy_lora);
    phase(&c, KT_PH_GATHER_X, nhit, task_gather_x);
    phase(&c, KT_PH_GATE_UP, c.nblk * c.nci, task_gate_up);
    if (c.aq) {
        c.ldq = I;
        phase(&c, KT_PH_QUANT_HH, nhit, task_quantize_hh);
    }
    if (c.r[KT_DOWN]) phase(&c, KT_PH_DOWN_LORA, nhit, task_down_lora);
    phase(&c, KT_PH_DOWN, c.nblk * c.nch, task_down);
    phase(&c, KT_PH_COMBINE_Y, ntok, task_combine);
    if (L->oom) rc = -2;
done:
    if (rc || !L->keep) kt_layer_release_saved(L);
    else L->has_saved = 1;
    return rc;
}

/* ---- backward ---- */

static void task_convert_dy(void *ctx, long task, int thread) {
    (void)thread;
    pass *c = ctx;
    kt_layer *L = c->L;
    long t1, t0 = token_range(L, task, &t1);
    size_t n = (size_t)(t1 - t0) * L->H, off = (size_t)t0 * L->H;
    if (L->x_dtype == KT_BF16) memcpy(c->dyb + off, (const kt_bf16 *)L->dy + off, n * sizeof(kt_bf16));
    else row_to_bf16(c->dyb + off, (const float *)L->dy + off, (int)n, 1.f);
}

static int qld(const pass *c) { return 3 * (c->r[KT_DOWN] + c->rgu); }

static void task_gather_dy(void *ctx, long task, int thread) {
    pass *c = ctx;
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
    if (c->aq) quantize_block(c, 1, e, m, p0, c->rows + p0 * c->ldr, c->ldr, H, 1);
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
    pass *c = ctx;
    kt_layer *L = c->L;
    int chunk, m, H = L->H, I = L->I, rd = c->r[KT_DOWN];
    long p0;
    int e = task_block(c, task, c->nci, &chunk, &p0, &m);
    int whole = whole_rows(L, m); /* the first chunk's task does every chunk */
    if (whole && chunk) return;
    int n = whole ? I : kt_chunk_n(chunk, KT_CHUNK_I, I), i0 = whole ? 0 : chunk * KT_CHUNK_I;
    float *d = kt_scratch(0, sizeof(float) * (size_t)m * n);
    const kt_bf16 *q = c->q + p0 * qld(c);
    PROF_GEMM(c, thread, base, 2.0 * m * n * H, base_nn(c, 1, e, m, i0, n, c->rows + p0 * c->ldr, c->ldr, p0, d, n));
    if (rd) PROF_GEMM(c, thread, lora, 6.0 * m * n * rd,
                      GEMM_NN(m, n, 3 * rd, q, qld(c), L->lora[KT_DOWN].A + (long)e * 3 * rd * I + i0, I, d, n, 1));
    const kt_bf16 *gu = L->gu.p;
    float *hv = kt_scratch(5, sizeof(float) * KT_CHUNK_I);
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

/* dAd[:, chunk] += (w s dy Bd)^T Hh[:, chunk] over all of an expert's rows (one task per
 * expert and chunk, so row blocks never add into the same gradient at once). */
static void task_grad_down_a(void *ctx, long task, int thread) {
    pass *c = ctx;
    kt_layer *L = c->L;
    int chunk, e = task_expert(c, task, c->nci, &chunk), I = L->I, rd = c->r[KT_DOWN];
    int n = kt_chunk_n(chunk, KT_CHUNK_I, I), i0 = chunk * KT_CHUNK_I;
    long p0;
    int m = expert_rows(L, e, &p0);
    float *w = kt_scratch(2, sizeof(float) * (size_t)(m ? m : 1));
    for (int i = 0; i < m; i++) w[i] = L->rt.w[L->rt.slot_of_pos[p0 + i]];
    const kt_bf16 *qt = transpose_split(c->q + p0 * qld(c), qld(c), m, rd, w, 3);
    grad_gemm(c, thread, rd, n, m, qt, c->hh + p0 * I + i0, I, c->grad[KT_DOWN].A + (long)e * rd * I + i0, I);
}

/* Per expert: dBd, and for gate and up: Q = s dG B (kept for dx), dB, dA. */
static void task_lora_grads(void *ctx, long task, int thread) {
    pass *c = ctx;
    kt_layer *L = c->L;
    int e = L->rt.hit[task], H = L->H, I = L->I, rd = c->r[KT_DOWN], grads = L->has_grads;
    long p0;
    int m = expert_rows(L, e, &p0);
    const kt_bf16 *dgu = c->dgu + p0 * 2 * I;
    if (rd && grads) {
        /* dBd^T += (w s Hh Ad^T)^T dy */
        float *w = kt_scratch(2, sizeof(float) * (size_t)(m ? m : 1));
        for (int i = 0; i < m; i++) w[i] = L->rt.w[L->rt.slot_of_pos[p0 + i]];
        const kt_bf16 *pt = transpose_split((const kt_bf16 *)L->pd.p + p0 * 3 * rd, 3 * rd, m, rd, w, 3);
        grad_gemm(c, thread, rd, H, m, pt, c->rows + p0 * c->ldr, c->ldr, c->grad[KT_DOWN].BT + (long)e * rd * H, H);
    }
    if (!c->rgu) return;
    kt_bf16 *xe = NULL;
    if (grads) {
        xe = kt_scratch(5, sizeof(kt_bf16) * (size_t)(m ? m : 1) * H);
        const kt_bf16 *xb = L->xb.p;
        for (int i = 0; i < m; i++)
            memcpy(xe + (size_t)i * H, xb + (long)(L->rt.slot_of_pos[p0 + i] / L->rt.k) * H, sizeof(kt_bf16) * H);
    }
    float *tmp = kt_scratch(4, sizeof(float) * (size_t)(m ? m : 1) * 2 * c->rgu);
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
        const kt_bf16 *pt = transpose_split((const kt_bf16 *)L->pgu.p + p0 * 3 * c->rgu + off, 3 * c->rgu, m, r, NULL, 3);
        for (int ch = 0; ch < c->nci; ch++) {
            int n = kt_chunk_n(ch, KT_CHUNK_I, I), i0 = ch * KT_CHUNK_I;
            grad_gemm(c, thread, r, n, m, pt, dgu + 2 * i0 + half * n, 2 * I, c->grad[p].BT + (long)e * r * I + i0, I);
        }
        if (c->share_grad) continue; /* dA once, from Qg + Qu, below */
        const kt_bf16 *qt = transpose_split(q, qld(c), m, r, NULL, 3);
        grad_gemm(c, thread, r, H, m, qt, xe, H, c->grad[p].A + (long)e * r * H, H);
    }
    if (!L->shared_a) return;
    /* one A for gate and up: dx's LoRA term Qg A + Qu A = (Qg + Qu) A, kept in gate's Q slot
     * (task_dx then skips up); with one gradient buffer, dA = (Qg + Qu)^T X once */
    int r = c->r[KT_GATE];
    kt_bf16 *qg = c->q + p0 * qld(c) + 3 * rd, *qu = qg + 3 * r;
    float *sum = kt_scratch(4, sizeof(float) * (size_t)(m ? m : 1) * 2 * c->rgu);
    for (int i = 0; i < m; i++) {
        kt_bf16 *a = qg + (long)i * qld(c), *b = qu + (long)i * qld(c);
        for (int j = 0; j < r; j++) sum[j] = unsplit(a, r, j) + unsplit(b, r, j);
        for (int j = 0; j < r; j++) sum[r + j] = 0.f;
        split_row(a, sum, sum + r, r, 1.f);
    }
    if (!c->share_grad) return;
    const kt_bf16 *qt = transpose_split(qg, qld(c), m, r, NULL, 3);
    grad_gemm(c, thread, r, H, m, qt, xe, H, c->grad[KT_GATE].A + (long)e * r * H, H);
}

static void task_dx(void *ctx, long task, int thread) {
    pass *c = ctx;
    kt_layer *L = c->L;
    int chunk, m, H = L->H, I = L->I;
    long p0;
    int e = task_block(c, task, c->nch, &chunk, &p0, &m);
    int whole = whole_rows(L, m); /* the first chunk's task does every chunk */
    if (whole && chunk) return;
    int n = whole ? H : kt_chunk_n(chunk, KT_CHUNK_H, H), h0 = whole ? 0 : chunk * KT_CHUNK_H;
    float *d = kt_scratch(0, sizeof(float) * (size_t)m * n);
    /* [dG | dU] and [Wg; Wu] share the chunk-interleaved order: one GEMM over 2I */
    PROF_GEMM(c, thread, base, 4.0 * m * n * I, base_nn(c, 0, e, m, h0, n, c->dgu + p0 * 2 * I, 2 * I, p0, d, n));
    for (int p = KT_GATE; p <= (L->shared_a ? KT_GATE : KT_UP); p++) { /* shared A: gate's Q slot holds Qg + Qu */
        int r = c->r[p];
        if (r) PROF_GEMM(c, thread, lora, 6.0 * m * n * r,
                         GEMM_NN(m, n, 3 * r, c->q + p0 * qld(c) + 3 * (c->r[KT_DOWN] + (p == KT_UP ? c->r[KT_GATE] : 0)),
                                 qld(c), L->lora[p].A + (long)e * 3 * r * H + h0, H, d, n, 1));
    }
    for (int i = 0; i < m; i++) row_to_bf16(c->rows + (p0 + i) * c->ldr + h0, d + (size_t)i * n, n, 1.f);
}

/* Adds the fp32 LoRA gradients into the caller's buffers (any layout and dtype); tasks
 * as in task_copy_lora. */
static void task_export_grads(void *ctx, long task, int thread) {
    (void)thread;
    pass *c = ctx;
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
    float *blk = kt_scratch(7, sizeof(float) * (size_t)nhit * r * BLOCK_O);
    for (long h = 0; h < nhit; h++)
        for (int j = 0; j < r; j++)
            memcpy(blk + (h * r + j) * BLOCK_O, g->BT + ((long)L->rt.hit[h] * r + j) * out + o0, sizeof(float) * nb);
    for (long h = 0; h < nhit; h++) { /* one expert at a time, as in task_copy_lora */
        const float *bh = blk + h * r * BLOCK_O;
        long base = L->rt.hit[h] * B->stride[0] + o0 * B->stride[1];
        for (int o = 0; o < nb; o++) add_row(B, base + o * B->stride[1], B->stride[2], bh + o, BLOCK_O, r);
    }
}

int CAT(kt_backward_, KT_ISA)(kt_layer *L) {
    int E = L->E, H = L->H, I = L->I, T = L->rt.T, rc = 0;
    double t0 = kt_now();
    L->oom = 0;
    pass c;
    setup(&c, L);
    memset(c.grad, 0, sizeof c.grad);
    c.share_grad = L->shared_a && L->has_grads && same_view(&L->grads_in.proj[KT_GATE].A, &L->grads_in.proj[KT_UP].A);
    long npos = L->rt.npos, nhit = L->rt.nhit;
    c.dyb = kt_workspace(KT_WS_DYB, sizeof(kt_bf16) * (size_t)T * H);
    c.rows = kt_workspace(KT_WS_ROWS, sizeof(kt_bf16) * (size_t)npos * c.ldr);
    c.dgu = kt_workspace(KT_WS_DGU, sizeof(kt_bf16) * (size_t)npos * 2 * I);
    c.q = kt_workspace(KT_WS_Q, sizeof(kt_bf16) * (size_t)npos * qld(&c));
    c.dwpart = kt_workspace(KT_WS_DW, sizeof(float) * (size_t)npos * c.nci);
    c.hh = kt_workspace(KT_WS_HH, sizeof(kt_bf16) * (size_t)npos * I);
    int ok = c.dyb && c.rows && c.dgu && c.q && c.dwpart && c.hh && !build_row_blocks(&c);
    for (int p = 0; L->has_grads && p < 3; p++) {
        int r = c.r[p], in = L->lora[p].in, out = L->lora[p].out;
        if (!r) continue;
        c.grad[p] = (kt_lora_f32){.r = r, .in = in, .out = out,
                                  .A = kt_workspace(KT_WS_GRAD0 + 2 * p, sizeof(float) * (size_t)E * r * in),
                                  .BT = kt_workspace(KT_WS_GRAD0 + 2 * p + 1, sizeof(float) * (size_t)E * r * out)};
        ok = ok && c.grad[p].A && c.grad[p].BT;
    }
    if (!ok || alloc_quantized_rows(&c)) { rc = -2; goto done; }
    /* W8A8 with int8 weights: one fold + quantization per row serves every column chunk; int4
     * folds per output column group, inside the tasks (c.aq NULL) */
    int8_t *aq = L->wformat == KT_W_INT8 ? c.aq : NULL;
    c.aq = aq;
    c.ldq = H;
    long ntok = (T + TOKENS_PER_TASK - 1) / TOKENS_PER_TASK;
    phase_serial(L, KT_PH_SETUP_BWD, t0);
    phase(&c, KT_PH_CONVERT_DY, ntok, task_convert_dy);
    phase(&c, KT_PH_GATHER_DY, nhit, task_gather_dy);
    phase(&c, KT_PH_DHH, c.nblk * c.nci, task_dhh);
    if (c.r[KT_DOWN] && L->has_grads) phase(&c, KT_PH_GRAD_DOWN_A, nhit * c.nci, task_grad_down_a);
    if (c.rgu || (c.r[KT_DOWN] && L->has_grads)) phase(&c, KT_PH_LORA_GRADS, nhit, task_lora_grads);
    if (aq) {
        c.ldq = 2 * I;
        phase(&c, KT_PH_QUANT_DGU, nhit, task_quantize_dgu);
    }
    phase(&c, KT_PH_DX, c.nblk * c.nch, task_dx);
    phase(&c, KT_PH_COMBINE_DX, ntok, task_combine);
    if (L->has_grads) phase(&c, KT_PH_EXPORT_GRADS, nhit + b_tasks(L), task_export_grads);
    if (L->oom) rc = -2;
done:
    kt_layer_release_saved(L);
    return rc;
}
