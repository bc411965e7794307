/* fmt.h: the weight format table (llama.cpp's type_traits idea): one kt_fmt_ops row per
 * (weight format, activation mode) pair, each defined in its own fmt_<row>.c and listed once, in
 * meson.build's fmt_rows (the table: fmt_table.c). A layer looks its row up once, when it is created (kt_layer.fmt; no row: the
 * format is refused with KT_ERR_FORMAT); from then on nothing branches on the format: the
 * creation, region and export code (layer/: moe_layer.c, moe_region.c, quantized.c) calls the row's
 * storage entries and the passes (pass_*.c) its products. design.md 5 defines the formats;
 * design.md "Adding a weight format" lists the files to touch.
 *
 * The rows are compiled once per ISA with the passes (fmt_table.c: kt_fmt_lookup_<isa>), so a
 * row's products are that ISA's kernels; its storage entries do not depend on the ISA except
 * where the layout does (bf16 on the amx path keeps the AMX tile layout). */
#ifndef KTMOE_FMT_H
#define KTMOE_FMT_H
#include "gemm/gemm.h"
#include <stddef.h>

/* blocks of up to this many rows are small-M products (fmt_weight_only.h: QSMALL) */
#define KT_SMALL_M 4

typedef struct kt_layer kt_layer;
typedef struct kt_pass kt_pass;
typedef struct kt_wo_kernels kt_wo_kernels; /* fmt_weight_only.h */

/* A product with the base weights of expert e (which = 0: gate/up, 1: down), for m rows of A
 * (positions p0 .. p0 + m of the call, for formats that cache quantized activation rows):
 *   nt: C[m, n] = A[m, :K] W_e[off : off + n, :]^T  (K = the weight's columns)
 *   nn: C[m, n] = A[m, :K] W_e[:, off : off + n]    (K = the weight's rows) */
typedef void (*kt_base_fn)(const kt_pass *c, int which, int e, int m, int off, int n, const kt_bf16 *A, long lda,
                           long p0, float *C, long ldc);
/* Stores n rows of expert e (dst_row0 >= 0: gate/up rows from there, chunk-interleaved; -1:
 * down) from src (rows ld elements apart, KT_F32 / KT_BF16). 0, 1 if a value is NaN or Inf
 * (quantized formats), KT_ERR_NOMEM. */
typedef int (*kt_pack_fn)(kt_layer *L, int e, int dst_row0, int n, const void *src, long ld, int dtype);

typedef struct kt_fmt_ops {
    const char *name;
    int wformat, act_int8;     /* the pair: KT_W_*, and 1 for int8 activations (W8A8) */
    /* ---- storage ---- */
    int code_bits;             /* quantized (kt_qmat): bits per stored code (8 or 4); 0: bf16 */
    float qmax;                /* largest code ktmoe's own quantizer makes (qmat.c); 0: none */
    int per_row_scale;         /* one scale per row (group = the row), else per `group` columns */
    int scale_bf16;            /* scales stored as bf16 (kt_qmat.scale_bf16), else fp32 (kt_qmat.scale);
                                  the weight-only loops read either through kt_qscale */
    /* the packed weight arrays (every one through kt_weight_alloc); 0 or KT_ERR_NOMEM */
    int (*alloc)(kt_layer *L, int transposed, int group_size);
    kt_pack_fn pack_rows;      /* NULL: made only from pre-quantized codes (kt_layer_create_quantized) */
    void (*pack_done)(kt_layer *L, int e); /* after expert e's rows are all stored; may be NULL */
    size_t (*weight_bytes)(const kt_layer *L);
    /* ---- products (the passes) ---- */
    kt_base_fn base_nt, base_nn;
    const kt_wo_kernels *wo;   /* weight-only quantized rows: the format's kernels (fmt_weight_only.h) */
    int small_m;               /* the backward's nn tasks of a row block this small read whole weight
                                  rows (one task per block, not per column chunk); 0: never */
    /* int8 activations quantized once per call for every column chunk (rows cached in the pass):
     * forward (x and Hh rows) and backward (dy and dG | dU rows, folded with the W row scales) */
    int cache_fwd, cache_bwd;
} kt_fmt_ops;

/* The row of (wformat, act_int8) for each kernel target of kt_isas.h (fmt_table.c), or NULL:
 * no such pair. */
#define KT_FMT_LOOKUP_PROTO(name, NAME, needs, flags) const kt_fmt_ops *kt_fmt_lookup_##name(int wformat, int act_int8);
KT_ISA_LIST(KT_FMT_LOOKUP_PROTO)
#undef KT_FMT_LOOKUP_PROTO
#endif
