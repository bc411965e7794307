/* routing.c: the routing of a call (design.md 1): the slots (t, j) with a valid expert id grouped
 * by expert into contiguous positions (kt_routing, moe_internal.h), built by the forward pass and
 * kept for the backward; the check of the ids before a call (kt_find_bad_id) and forgetting a kept
 * forward (kt_layer_release_saved). */
#include "moe_internal.h"
#include <stdlib.h>
#include <string.h>

static long id_at(const void *ids, int dtype, long i) {
    return dtype == KT_I64 ? (long)((const int64_t *)ids)[i] : (long)((const int32_t *)ids)[i];
}

long kt_find_bad_id(const void *ids, int ids_dtype, long n, int E) {
    for (long i = 0; i < n; i++) {
        long v = id_at(ids, ids_dtype, i);
        if (v < -1 || v >= E) return i;
    }
    return -1;
}

void kt_routing_free(kt_routing *rt) {
    free(rt->offset); free(rt->slot_of_pos); free(rt->pos_of_slot); free(rt->hit); free(rt->w);
    memset(rt, 0, sizeof *rt);
}

int kt_routing_build(kt_routing *rt, int E, int T, int k, const void *ids, int ids_dtype,
                     const void *weights, int w_dtype) {
    long n = (long)T * k;
    rt->T = T; rt->k = k;
    rt->offset = calloc((size_t)E + 1, sizeof(long));
    rt->pos_of_slot = kt_alloc(sizeof(long) * n);
    rt->slot_of_pos = kt_alloc(sizeof(int) * n);
    rt->hit = kt_alloc(sizeof(int) * E);
    rt->w = kt_alloc(sizeof(float) * n);
    if (!rt->offset || !rt->pos_of_slot || !rt->slot_of_pos || !rt->hit || !rt->w) {
        kt_routing_free(rt);
        return KT_ERR_NOMEM;
    }
    for (long s = 0; s < n; s++) {
        long e = id_at(ids, ids_dtype, s);
        if (e >= 0) rt->offset[e + 1]++;
        rt->w[s] = w_dtype == KT_BF16 ? kt_bf16_to_f32(((const kt_bf16 *)weights)[s])
                                      : ((const float *)weights)[s];
    }
    rt->nhit = 0;
    for (int e = 0; e < E; e++) {
        if (rt->offset[e + 1]) rt->hit[rt->nhit++] = e;
        rt->offset[e + 1] += rt->offset[e];
    }
    rt->npos = rt->offset[E];
    long *fill = calloc((size_t)E, sizeof(long));
    if (!fill) { kt_routing_free(rt); return KT_ERR_NOMEM; }
    for (long s = 0; s < n; s++) {
        long e = id_at(ids, ids_dtype, s);
        if (e < 0) { rt->pos_of_slot[s] = -1; continue; }
        long p = rt->offset[e] + fill[e]++;
        rt->pos_of_slot[s] = p;
        rt->slot_of_pos[p] = (int)s;
    }
    free(fill);
    return 0;
}

/* Forgets the kept forward; its buffers stay with the layer for the next call. */
void kt_layer_release_saved(kt_layer *L) {
    kt_routing_free(&L->rt);
    L->has_saved = 0;
}
