/* memory.h: the kernels' own allocations (memory.c): 64-byte aligned blocks (huge pages for big
 * ones), buffers reused between calls that only grow, the process-wide workspace of the running
 * job and the per-thread scratch of a task, each addressed by a slot named after its role. */
#ifndef KTMOE_MEMORY_H
#define KTMOE_MEMORY_H
#include <stddef.h>

void *kt_alloc(size_t bytes); /* 64-byte aligned, NULL on failure */

/* A buffer that is reused between calls and only grows. */
typedef struct { void *p; size_t n; } kt_buf;
void *kt_buf_get(kt_buf *b, size_t bytes); /* NULL on OOM */
void kt_buf_free(kt_buf *b);

/* Process-wide scratch for the transient buffers of the running job (jobs run one at a
 * time on the pool's worker 0, so one set serves every layer). */
enum { KT_WS_ROWS, KT_WS_HH, KT_WS_DGU, KT_WS_Q, KT_WS_DW, KT_WS_DYB, KT_WS_BLOCKS, KT_WS_AQ, KT_WS_SA,
       KT_WS_GRAD0, KT_WS_COUNT = KT_WS_GRAD0 + 6 };
void *kt_workspace(int slot, size_t bytes);

/* Per-thread scratch that grows as needed and lives as long as the thread: one slot per role,
 * so that the buffers one task holds at the same time never share a slot. */
enum kt_scratch_slot {
    KT_SCR_OUT,        /* a task's fp32 GEMM result; combine's fp32 row sums */
    KT_SCR_ROW,        /* combine: one row as fp32 */
    KT_SCR_IACC,       /* W8A8: the int32 sums of an int8 GEMM */
    KT_SCR_RWEIGHT,    /* the router weights of an expert's rows */
    KT_SCR_SPLIT_T,    /* a split-bf16 transpose of LoRA product rows */
    KT_SCR_LORA_OUT,   /* fp32 LoRA products before they are split */
    KT_SCR_SILU,       /* dHh: Hh of one chunk as fp32 */
    KT_SCR_XROWS,      /* LoRA gradients: an expert's x rows */
    KT_SCR_GRAD_OUT,   /* fp32 result of a LoRA gradient GEMM before it is folded */
    KT_SCR_FACTOR,     /* LoRA factor or gradient rows on their way in or out */
    KT_SCR_PANEL,      /* a weight panel expanded from quantized codes (bf16 or int8) */
    KT_SCR_SMALL,      /* small-M weight-only kernels: A's rows as fp32, or their accumulators */
    KT_SCR_ACT_Q,      /* W8A8: int8 codes of activation rows */
    KT_SCR_ACT_SCALE,  /* W8A8: their per-row scales */
    KT_SCR_ACT_F32,    /* W8A8: one activation row as fp32 while it is quantized */
    KT_SCR_COUNT
};
void *kt_scratch(int slot, size_t bytes);
#endif
