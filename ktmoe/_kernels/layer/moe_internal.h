/* moe_internal.h: the layer object shared by the layer files (moe_layer.c: life cycle and jobs;
 * routing.c, weights.c, moe_region.c, quantized.c), the format rows (formats/: fmt_*.c, fmt.h,
 * qmat.c) and the passes (pass_*.c, pass.h), which are compiled once per ISA. */
#ifndef KTMOE_MOE_INTERNAL_H
#define KTMOE_MOE_INTERNAL_H
#include "ktmoe.h"
#include "gemm/gemm.h"
#include "formats/fmt.h"
#include "runtime/memory.h"
#include <pthread.h>
#include <stddef.h>

/* Column chunks: one task = one expert x one chunk of output columns.
 * Gate and up weights are packed chunk-interleaved: chunk c of the intermediate dimension
 * (columns c*KT_CHUNK_I .. +n) occupies rows 2*c*KT_CHUNK_I .. +2n of the packed
 * [2I, H] expert matrix, its n gate rows first, then its n up rows. One GEMM then yields
 * both halves of a chunk, and the backward's dX = [dG | dU] [Wg; Wu] is one GEMM over 2I.
 * Activations over 2I (gate/up pre-activations, dG | dU) use the same column order. */
#define KT_CHUNK_I 128
#define KT_CHUNK_H 256
/* Rows per GEMM task: an expert with more rows than this (a hot expert under skewed
 * routing) is split into row blocks too, so it spreads over more threads. */
#define KT_ROW_BLOCK 512

static inline int kt_chunk_n(int chunk, int width, int total) {
    int n = total - chunk * width;
    return n < width ? n : width;
}

/* Split-bf16 copies of one projection's LoRA factors for the experts of a call
 * (pass_lora.c): A[e] is [3r, in] = [hi; hi; lo] of A, BT[e] the same of B^T ([3r, out]). */
typedef struct {
    int r, in, out;
    kt_bf16 *A, *BT;
} kt_lora_bf16;

/* fp32 LoRA gradients of a backward, same layout. */
typedef struct {
    int r, in, out;
    float *A, *BT;
} kt_lora_f32;

/* Routing of one call: slots (t, j) with a valid id, grouped by expert ("positions"). */
typedef struct {
    int T, k;
    long npos;          /* number of valid slots */
    long *offset;       /* [E + 1]: positions of expert e are offset[e] .. offset[e+1]-1 */
    int *slot_of_pos;   /* [npos]: t * k + j */
    long *pos_of_slot;  /* [T * k]: position, or -1 for id -1 */
    int *hit;           /* [nhit]: experts with at least one position */
    int nhit;
    float *w;           /* [T * k] router weights as fp32 */
} kt_routing;

/* Quantized base weights of one kind (gate/up or down) for all experts (design.md 5,
 * formats/qmat.c): per expert a [rows, cols] matrix of symmetric int8 (one scale per row),
 * int4 (one scale per row and group of `group` columns; fp32, or bf16 for int4bs) or fp8 e4m3fn codes (fp8.h; the
 * block scales copied to every row of their block, group = the block's columns). Rows are
 * in the same order as the bf16 copies (gate/up chunk-interleaved). The format's row
 * (fmt_*.c) says how the codes are read; the layout itself only depends on `bits`. */
typedef struct {
    int bits;           /* bits per code: 8 (int8, fp8) or 4 (int4) */
    float qmax;         /* ktmoe's quantizer: codes in [-qmax, qmax] (0: codes only given) */
    int rows, cols, group, ngroups; /* per expert; one scale per row: group = cols, ngroups = 1 */
    int8_t *q;          /* int8: [E, rows, cols]; int4: [E, rows, cols / 2] bytes, column 2j in
                           the low nibble and 2j + 1 in the high nibble of byte j; fp8: [E, rows,
                           cols] e4m3fn codes (read as uint8_t) */
    float *scale;       /* [E, rows, ngroups] fp32 scales, or NULL when they are bf16: */
    kt_bf16 *scale_bf16; /* [E, rows, ngroups] bf16 scales (the row's scale_bf16: int4bs), else NULL */
} kt_qmat;

/* bytes of one stored row of `cols` codes */
static inline long kt_qmat_row_bytes(const kt_qmat *W) { return (long)W->cols * W->bits / 8; }

/* Scale i (= stored row * ngroups + group) of W as fp32, from either storage (bf16 widens
 * exactly). The one place the weight-only loops (fmt_weight_only.h) read a scale. */
static inline float kt_qscale(const kt_qmat *W, long i) {
    return W->scale_bf16 ? kt_bf16_to_f32(W->scale_bf16[i]) : W->scale[i];
}

/* An empty layer whose quantized weights q_gate_up / q_down (group: int4 group or fp8 column
 * block) the caller fills (moe_layer.c, for kt_layer_create_quantized). NULL and *status on
 * failure (KT_ERR_NOMEM; KT_ERR_FORMAT: no such pair, or not a quantized format). */
kt_layer *kt_layer_new_quantized(int E, int H, int I, int isa, int num_threads, int wformat, int group,
                                 int act_int8, int *status);

/* The storage entries every quantized row (fmt_int8.c, fmt_int4.c, fmt_fp8.c, the W8A8 rows)
 * shares (formats/qmat.c): q_gate_up / q_down as the row's code_bits / per_row_scale say, rows
 * quantized by ktmoe's quantizer (the row's qmax; 0, 1 on NaN / Inf, KT_ERR_NOMEM), their bytes. */
int kt_qmat_alloc(kt_layer *L, int transposed, int group_size);
int kt_qmat_pack_rows(kt_layer *L, int e, int dst_row0, int n, const void *src, long ld, int dtype);
size_t kt_qmat_weight_bytes(const kt_layer *L);

/* What one thread's GEMM calls took during the running phase (the profile, ktmoe.h). */
typedef struct {
    _Alignas(64) double base_s, base_flops, lora_s, lora_flops;
} kt_prof_thread;

/* Where a layer's packed weight arrays live (weights.c, moe_region.c): KT_REGION_NONE, the layer's own
 * allocations; KT_REGION_IN, consecutive page-aligned pieces of base[0, size); KT_REGION_MEASURE,
 * nothing allocated, only the layout's size counted. `used` is the end of the last piece,
 * `requested` the bytes asked for (padding excluded). */
enum { KT_REGION_NONE = 0, KT_REGION_IN = 1, KT_REGION_MEASURE = 2 };
typedef struct { int mode; char *base; size_t size, used, requested; } kt_region;
#define KT_REGION_ALIGN 4096 /* every piece of a region starts on a page */
static inline size_t kt_region_align_up(size_t n) { return (n + KT_REGION_ALIGN - 1) & ~(size_t)(KT_REGION_ALIGN - 1); }

struct kt_layer {
    int E, H, I, isa, num_threads;
    /* Every packed weight array below (w_*, wt_*, q_*.q / .scale, and any new format's) is
     * allocated in kt_layer_alloc_weights through kt_weight_alloc and freed with
     * kt_weight_free (weights.c): the shared-region layout (moe_region.c) follows from that one place. */
    kt_region region;
    kt_bf16 *w_gate_up; /* [E, 2I, H], chunk-interleaved rows (see above) */
    kt_bf16 *w_down;    /* [E, H, I] */
    int prepacked;      /* amx path, bf16: w_gate_up / w_down hold each expert's matrix in the tile
                           layout of gemm.h (kt_prepack_amx), pre_gu / pre_dn elements apart */
    size_t pre_gu, pre_dn;
    kt_bf16 *stage;     /* during creation only: one expert's plain bf16 gate/up and down */
    int oom;            /* set by a pass's task whose GEMM could not get its scratch: the pass fails with -2 */
    kt_bf16 *wt_gate_up, *wt_down; /* opt-in transposed copies [E, H, 2I], [E, I, H], or NULL */
    const kt_fmt_ops *fmt; /* the row of (wformat, act_int8) for this ISA (fmt.h), set once at creation */
    int wformat;        /* KT_W_BF16 (w_gate_up / w_down above), KT_W_INT8, KT_W_INT4 or KT_W_FP8 (q_* below) */
    int act_int8;       /* W8A8: products with base weights on int8 activations */
    kt_qmat q_gate_up;  /* [E, 2I, H], chunk-interleaved rows, groups along H */
    kt_qmat q_down;     /* [E, H, I], groups along I */

    /* job plumbing */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int busy, status;
    int job_kind; /* KT_JOB_FORWARD or KT_JOB_BACKWARD */

    /* arguments of the submitted call */
    const void *x, *ids, *weights, *dy;
    int x_dtype, ids_dtype, w_dtype, keep;
    void *y, *dx, *dw;
    kt_lora lora_in, grads_in;
    int has_lora, has_grads;
    int shared_a;       /* gate and up LoRA use one A (PEFT's gate_up_proj): X A^T, the factor copy and,
                           with one gradient buffer too, dA and the dx product are done once */

    /* state of a forward, kept for backward when keep (buffers reused between calls) */
    int has_saved;
    kt_routing rt;
    float scale;
    kt_lora_bf16 lora[3];
    kt_buf xb;          /* [T, H] input as bf16 */
    kt_buf gu;          /* [npos, 2I] gate/up pre-activations, bf16, chunk-interleaved */
    kt_buf pgu;         /* [npos, 3(rg + ru)] s X Ag^T | s X Au^T as split-bf16 rows */
    kt_buf pd;          /* [npos, 3 rd] s Hh Ad^T as split-bf16 rows */
    kt_buf lora_a[3], lora_bt[3];

    kt_profile prof;
    kt_prof_thread *prof_thr; /* [KT_MAX_THREADS] */
};

/* What a submitted job runs (the index of kt_profile.passes too). */
enum kt_job { KT_JOB_FORWARD = 0, KT_JOB_BACKWARD = 1 };

/* Weight arrays (see struct kt_layer): kt_alloc'ed, or pieces of L->region (weights.c). */
void *kt_weight_alloc(kt_layer *L, size_t bytes);
void kt_weight_free(kt_layer *L, void *p);
int kt_layer_alloc_weights(kt_layer *L, int transposed, int group_size);
/* The format row of (wformat, act_int8) on `isa`'s path (fmt_table.c), or NULL: no such pair. */
const kt_fmt_ops *kt_fmt_of(int isa, int wformat, int act_int8);

/* kt_layer_create with the weight arrays placed as `region` says (NULL: own memory); attach != 0: the
 * region already holds them packed, nothing is read from gate / up / down. */
kt_layer *kt_layer_create_ex(int E, int H, int I, int isa, int num_threads,
                             const void *gate, const void *up, long gate_up_expert_stride, int w_dtype,
                             const void *down, int down_dtype, int transposed,
                             int wformat, int group_size, int act_int8, const kt_region *region, int attach,
                             int *status);

/* The routing of a call (routing.c) */
int kt_routing_build(kt_routing *rt, int E, int T, int k, const void *ids, int ids_dtype,
                     const void *weights, int w_dtype);
void kt_routing_free(kt_routing *rt);
/* The passes, one set per kernel target of kt_isas.h (pass_forward.c, pass_backward.c).
 * Return 0 or KT_ERR_NOMEM. */
#define KT_PASS_PROTO(name, NAME, needs, flags) int kt_forward_##name(kt_layer *L); int kt_backward_##name(kt_layer *L);
KT_ISA_LIST(KT_PASS_PROTO)
#undef KT_PASS_PROTO
#endif
