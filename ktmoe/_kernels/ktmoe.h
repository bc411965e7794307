/* ktmoe.h: the C interface of one MoE layer's routed experts (what the Cython wrapper calls).
 *
 * A kt_layer owns the packed expert weights of one layer and the state a forward keeps
 * for its backward. Calls are asynchronous: kt_submit_* queue the work on the shared
 * thread pool and return; kt_wait blocks until it is done. All shapes and ids are
 * checked by the caller (ktmoe/experts.py) before anything is submitted; the C side
 * trusts them. Math: design.md 2-4.
 */
#ifndef KTMOE_H
#define KTMOE_H
#include <stddef.h>
#include <stdint.h>
#include "kt_isas.h"

enum kt_dtype { KT_F32 = 0, KT_BF16 = 1, KT_I32 = 2, KT_I64 = 3 };
/* The kernel targets, worst first (kt_isas.h, from meson.build's list): KT_ISA_PORTABLE = 0, ... */
#define KT_ISA_ENUM(name, NAME, needs, flags) KT_ISA_##NAME,
enum kt_isa { KT_ISA_LIST(KT_ISA_ENUM) };
#undef KT_ISA_ENUM
enum kt_proj { KT_GATE = 0, KT_UP = 1, KT_DOWN = 2 };
enum kt_wformat { KT_W_BF16 = 0, KT_W_INT8 = 1, KT_W_INT4 = 2, KT_W_FP8 = 3, KT_W_INT4BS = 4 };

/* Status codes of the calls below (0 = success). kt_status_message (status.c) is the one table
 * that turns a non-zero status into its error: the message and the kind of exception the Python
 * side raises; `at` says whether a layer was being created (or packed) or a call was made. */
enum kt_status {
    KT_OK = 0,
    KT_ERR_BUSY = -1,               /* the layer already has a call in flight */
    KT_ERR_NOMEM = -2,              /* out of memory (or worker threads could not start) */
    KT_ERR_NOT_KEPT = -3,           /* backward without a kept forward */
    KT_ERR_GATE_UP_NONFINITE = -4,  /* gate / up hold NaN or Inf (quantized formats) */
    KT_ERR_DOWN_NONFINITE = -5,     /* down holds NaN or Inf (quantized formats) */
    KT_ERR_REGION_SMALL = -6,       /* region smaller than its layout */
    KT_ERR_REGION_NOT_PACKED = -7,  /* region not packed (yet) */
    KT_ERR_REGION_MISMATCH = -8,    /* region packed for other shapes / format / ISA */
    KT_ERR_FORMAT = -9              /* no kernel for this weight format, activation mode and source */
};
enum kt_error_kind { KT_ERRK_VALUE = 0, KT_ERRK_MEMORY = 1, KT_ERRK_RUNTIME = 2 };
enum kt_status_at { KT_AT_CREATE = 0, KT_AT_CALL = 1 };
const char *kt_status_message(int status, int at, int *kind);

/* A strided 3-d tensor view [E, rows, cols]; strides in elements. */
typedef struct {
    void *data;
    int dtype; /* KT_F32 or KT_BF16 */
    long stride[3];
} kt_view3;

/* LoRA of one projection: A logical [E, r, in], B logical [E, out, r]. r == 0: none. */
typedef struct {
    int r;
    kt_view3 A, B;
} kt_lora_proj;

typedef struct {
    float scale;
    kt_lora_proj proj[3]; /* KT_GATE, KT_UP, KT_DOWN */
} kt_lora;

typedef struct kt_layer kt_layer;

/* CPU features (cpu_features.c): what this CPU and OS allow, one bit each (the targets' needs in
 * kt_isas.h are ORs of these). KT_F_AVX2 / KT_F_AVX512 include the OS saving the ymm / zmm and
 * opmask state (XCR0); KT_F_AVX512 is F + BW + VL + DQ; KT_F_AMX_OS: XCR0 has the tile state;
 * KT_F_AMX_PERM: Linux granted this process the tile state (asked only where the CPU has AMX). */
enum kt_feature {
    KT_F_AVX2 = 1 << 0, KT_F_FMA = 1 << 1, KT_F_F16C = 1 << 2, KT_F_AVX_VNNI = 1 << 3,
    KT_F_AVX512 = 1 << 4, KT_F_AVX512_BF16 = 1 << 5, KT_F_AVX512_VNNI = 1 << 6,
    KT_F_AMX_TILE = 1 << 7, KT_F_AMX_BF16 = 1 << 8, KT_F_AMX_INT8 = 1 << 9, KT_F_AMX_OS = 1 << 10,
    KT_F_AMX_PERM = 1 << 11
};
enum { KT_NFEATURE = 12 };
/* The features, detected on the first call (CPUID, XGETBV, the AMX request) and cached. */
unsigned kt_cpu_features(void);
/* Name of feature bit i (i < KT_NFEATURE): "avx2", "fma", ..., "amx_perm". */
const char *kt_feature_name(int i);
/* The targets (isa_table.c): name, compiler flags and needed features of target i < KT_NISA. */
const char *kt_isa_name(int isa);
const char *kt_isa_flags(int isa);
unsigned kt_isa_needs(int isa);
/* Asks Linux for the AMX tile state (once per process). 0 on success, else errno. */
int kt_amx_request_permission(void);

/* Weights: gate/up [E, I, H] (may both point into one fused [E, 2I, H] buffer: then
 * up = gate + I*H and gate_up_stride = 2*I*H) and down [E, H, I]. transposed != 0 also
 * keeps a transposed copy (twice the weight memory) that the backward streams like the
 * forward streams the weights (bf16 only).
 * wformat: KT_W_BF16 keeps bf16 copies; KT_W_INT8 / KT_W_INT4 / KT_W_INT4BS quantize them
 * (design.md 5; int4 with one fp32 scale per group_size columns, group_size dividing H and I;
 * int4bs the same with bf16 scales, rounded to bf16 before the codes are made). act_int8 != 0
 * (quantized formats only): W8A8, activations quantized per row for the base products.
 * The pair (wformat, act_int8) must have a row in the format table (fmt.h, fmt_table.c) that
 * can be made from float weights (not fp8). Returns NULL and *status = KT_ERR_FORMAT if not,
 * KT_ERR_NOMEM on OOM, KT_ERR_GATE_UP_NONFINITE / KT_ERR_DOWN_NONFINITE if gate-up / down hold
 * NaN or Inf (quantized formats), else the layer and *status = KT_OK. */
kt_layer *kt_layer_create(int E, int H, int I, int isa, int num_threads,
                          const void *gate, const void *up, long gate_up_expert_stride, int w_dtype,
                          const void *down, int down_dtype, int transposed,
                          int wformat, int group_size, int act_int8, int *status);
/* Packed weights in caller memory (moe_region.c), e.g. one shared-memory region mapped by
 * every process of a host. kt_layer_region_bytes: the region size for these shapes and format
 * (a multiple of 4096; the region must start on a page boundary). kt_region_pack: packs the
 * weights into base[0, bytes) exactly as kt_layer_create would (same arguments); returns 0,
 * -2 OOM, -4 / -5 NaN or Inf (quantized formats), -6 region too small. kt_layer_attach: a
 * layer whose weights are the packed region (which it only reads and never frees: keep it
 * mapped until kt_layer_destroy); NULL and *status -6 region too small, -7 not packed yet,
 * -8 packed for other shapes / format / ISA, -2 OOM. */
size_t kt_layer_region_bytes(int E, int H, int I, int isa, int transposed, int wformat, int group_size);
int kt_region_pack(void *base, size_t bytes, int E, int H, int I, int isa,
                   const void *gate, const void *up, long gate_up_expert_stride, int w_dtype,
                   const void *down, int down_dtype, int transposed, int wformat, int group_size);
kt_layer *kt_layer_attach(const void *base, size_t bytes, int E, int H, int I, int isa, int num_threads,
                          int transposed, int wformat, int group_size, int act_int8, int *status);
/* Pre-quantized weights taken as they are (no re-quantization; design.md 5): the codes and
 * scales of gate, up [E, I, H] and down [E, H, I], one kt_qsource each (gate and up may
 * point into one fused [E, 2I, H] array, like kt_layer_create's). Code rows are contiguous:
 * wformat KT_W_INT8: int8 codes in [-127, 127], one byte per value; KT_W_INT4: two codes per
 * byte, column 2j in the low nibble and 2j + 1 in the high one, 4-bit two's complement (-8
 * allowed), each byte XORed with code_xor first (0x88 turns compressed-tensors' unsigned
 * code + 8 nibbles into these); KT_W_INT4BS: the same codes with bf16 scales, kept as bf16
 * (scale_dtype must be KT_BF16); KT_W_FP8: e4m3fn codes, one byte per value (NaN codes must
 * have been rejected by the caller). Scales (scale_dtype KT_F32 or KT_BF16, finite, checked
 * by the caller) per expert [ceil(rows / block_rows), cols / group], row-major: the scale of
 * (row, col) is scales[row / block_rows][col / group]; group = 0 means the whole row (int8).
 * int8 / int4 have block_rows = 1; fp8 keeps a per-row copy of its block scales (group =
 * the block's columns, a multiple of 32 dividing H, I and 512). act_int8: W8A8 (int8 / int4).
 * Returns NULL and *status = KT_ERR_NOMEM on OOM, KT_ERR_FORMAT if (wformat, act_int8) is no
 * quantized row of the format table, else the layer and *status = KT_OK. */
typedef struct {
    const void *codes;
    long codes_stride;  /* bytes from one expert's codes to the next */
    const void *scales;
    long scales_stride; /* elements from one expert's scales to the next */
} kt_qsource;
kt_layer *kt_layer_create_quantized(int E, int H, int I, int isa, int num_threads, int wformat,
                                    const kt_qsource *gate, const kt_qsource *up, const kt_qsource *down,
                                    int scale_dtype, int block_rows, int group, int code_xor, int act_int8,
                                    int *status);
/* Index of the first of n bytes with (byte & mask) == value, or -1 (fp8 NaN codes: mask and
 * value 0x7f; int8 code -128: 0xff, 0x80). */
long kt_find_byte(const void *p, long n, int mask, int value);
/* Index of the first of n scales (KT_F32 / KT_BF16) that is NaN, Inf or negative, or -1. */
long kt_find_bad_scale(const void *p, int dtype, long n);
/* Copies the stored codes and scales of projection `proj` (KT_GATE, KT_UP, KT_DOWN) in the
 * caller's order: q [E, rows, cols] one byte per value (int8 / int4: the int8 value, int4
 * in [-8, 7]; fp8: the e4m3 code), scale [E, rows, ngroups] fp32 (fp8: the per-row copies of
 * the block scales; int4bs: its bf16 scales widened, exactly). Returns 0, or -1 if the layer is not quantized. */
int kt_layer_export_quantized(const kt_layer *L, int proj, int8_t *q, float *scale);
void kt_layer_destroy(kt_layer *L);
size_t kt_layer_weight_bytes(const kt_layer *L);
int kt_layer_set_threads(kt_layer *L, int num_threads);

/* Forward. x, y [T, H] of x_dtype; ids [T, k] (KT_I32/KT_I64); weights [T, k] (KT_F32/KT_BF16).
 * lora may be NULL; it is copied, so the caller's struct need not outlive the call (its
 * buffers must, until kt_wait returns). keep != 0 keeps what backward needs.
 * Returns 0, or -1 if the layer is busy, -2 on OOM. */
int kt_submit_forward(kt_layer *L, int T, int k, const void *x, int x_dtype,
                      const void *ids, int ids_dtype, const void *weights, int w_dtype,
                      const kt_lora *lora, int keep, void *y);
/* Backward of the last kept forward. dy, dx [T, H] of the forward's x_dtype; dw [T, k] of
 * the forward's weight dtype. grads (may be NULL) has the forward lora's layout; LoRA
 * gradients are added into it. Returns 0, -1 busy, -2 OOM, -3 nothing kept. */
int kt_submit_backward(kt_layer *L, const void *dy, const kt_lora *grads, void *dx, void *dw);
/* Blocks until the submitted call is done. Returns 0, or -2 if it ran out of memory. */
int kt_wait(kt_layer *L);
int kt_layer_busy(const kt_layer *L);
int kt_layer_has_saved(const kt_layer *L);
void kt_layer_release_saved(kt_layer *L);
/* Bytes kept per token between a kept forward and its backward: x as bf16, gate/up
 * pre-activations as bf16, the scaled LoRA products X A^T (bf16, lora_ranks = sum of the
 * ranks of the projections with LoRA) and the routing. The layer keeps these buffers
 * (and bf16 copies of the LoRA factors) for reuse by later calls. */
size_t kt_saved_bytes_per_token(int H, int I, int k, int lora_ranks);

/* Per-phase profile (always on: one clock read per phase and thread, two per GEMM call).
 * A pass is a list of phases (pass_forward.c, pass_backward.c); each phase is one parallel loop. Per phase:
 * calls and tasks, wall seconds, thread seconds (threads x wall), busy seconds (threads
 * running tasks; thread - busy = idle at the phase's end barrier), and the thread seconds
 * and FLOPs of the GEMM calls inside its tasks, split into base-weight products and LoRA
 * products (machine FLOPs: the split-bf16 LoRA GEMMs count their 2x / 3x work). */
enum kt_phase {
    KT_PH_SETUP_FWD, KT_PH_CONVERT_X, KT_PH_COPY_LORA, KT_PH_GATHER_X, KT_PH_GATE_UP, KT_PH_QUANT_HH,
    KT_PH_DOWN_LORA, KT_PH_DOWN, KT_PH_COMBINE_Y,
    KT_PH_SETUP_BWD, KT_PH_CONVERT_DY, KT_PH_GATHER_DY, KT_PH_DHH, KT_PH_GRAD_DOWN_A, KT_PH_LORA_GRADS,
    KT_PH_QUANT_DGU, KT_PH_DX, KT_PH_COMBINE_DX, KT_PH_EXPORT_GRADS, KT_NPHASE
};
typedef struct {
    long calls, tasks;
    double wall, thread, busy;
    double base_s, base_flops, lora_s, lora_flops;
} kt_phase_stat;
typedef struct {
    long passes[2];     /* forward, backward */
    double pass_wall[2];
    kt_phase_stat ph[KT_NPHASE];
} kt_profile;
const char *kt_phase_name(int phase);
int kt_phase_is_backward(int phase);
void kt_layer_profile(const kt_layer *L, kt_profile *out);
void kt_layer_profile_reset(kt_layer *L);

/* Index of the first id outside [-1, E) among n ids, or -1 if all are valid. */
long kt_find_bad_id(const void *ids, int ids_dtype, long n, int E);
#endif
