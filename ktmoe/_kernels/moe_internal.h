/* moe_internal.h: the layer object shared by moe_layer.c (life cycle, routing, job
 * plumbing) and moe_passes.c (the forward/backward passes, compiled once per ISA). */
#ifndef KTMOE_MOE_INTERNAL_H
#define KTMOE_MOE_INTERNAL_H
#include "ktmoe.h"
#include "gemm.h"
#include <pthread.h>
#include <stddef.h>

/* Column chunk widths: one task = one expert x one chunk of output columns. */
#define KT_CHUNK_I 64   /* intermediate columns per gate/up task (plus the same up columns) */
#define KT_CHUNK_H 128  /* hidden columns per down / dx task */

/* LoRA factors copied (fp32, contiguous, hit experts only) for one call:
 * A[e] is [r, in], BT[e] is B transposed, [r, out]. Gradients use the same layout. */
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

struct kt_layer {
    int E, H, I, isa, num_threads;
    kt_bf16 *w_gate_up; /* [E, 2I, H] */
    kt_bf16 *w_down;    /* [E, H, I] */

    /* job plumbing */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int busy, status;
    int job_kind; /* 0 forward, 1 backward */

    /* arguments of the submitted call */
    const void *x, *ids, *weights, *dy;
    int x_dtype, ids_dtype, w_dtype, keep;
    void *y, *dx, *dw;
    kt_lora lora_in, grads_in;
    int has_lora, has_grads;

    /* state of a forward (kept for backward when keep) */
    int has_saved;
    kt_routing rt;
    kt_bf16 *xb;        /* [T, H] input as bf16 */
    kt_bf16 *gu;        /* [npos, 2I] gate (first I) and up pre-activations, bf16 */
    kt_lora_f32 lora[3];
    float scale;
};

/* moe_layer.c helpers used by the passes */
int kt_routing_build(kt_routing *rt, int E, int T, int k, const void *ids, int ids_dtype,
                     const void *weights, int w_dtype);
void kt_routing_free(kt_routing *rt);
void *kt_alloc(size_t bytes); /* 64-byte aligned, NULL on failure */
/* Per-thread scratch that grows as needed and lives as long as the thread. */
void *kt_scratch(int slot, size_t bytes);

/* The passes, one set per ISA (moe_passes.c). Return 0 or -2 (OOM). */
int kt_forward_portable(kt_layer *L);
int kt_backward_portable(kt_layer *L);
int kt_forward_avx512(kt_layer *L);
int kt_backward_avx512(kt_layer *L);
int kt_forward_amx(kt_layer *L);
int kt_backward_amx(kt_layer *L);
#endif
